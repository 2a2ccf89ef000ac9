"""Model configuration: vision / perceiver / text sub-configs, and Hugging Face `config.json`.

Field names are the Hugging Face names, so a key in an Idefics2 `config.json` maps one to one onto
a field here. Configs are frozen dataclasses (hashable, so they can sit on a Flax module).

    config = Idefics2Config.preset("tiny")
    config = Idefics2Config.from_hf_dict(json.load(open("config.json")))
    config = config.replace(text=config.text.replace(sliding_window=None))

An unknown or misspelled key is an error that names the key (and the closest known one).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from typing import Any, Mapping

from etils import epath

# Keys that Hugging Face's `PretrainedConfig` writes into every config.json and that do not change
# the network's function (generation defaults, bookkeeping, labels). They are accepted and dropped
# when reading a Hugging Face config; any other key we do not know is an error.
HF_GENERIC_KEYS = frozenset(
    """
    _name_or_path _commit_hash _attn_implementation _attn_implementation_autoset
    _attn_implementation_internal transformers_version architectures auto_map model_type
    torch_dtype dtype use_bfloat16 return_dict output_hidden_states output_attentions torchscript
    tf_legacy_loss pruned_heads chunk_size_feed_forward is_encoder_decoder is_decoder
    cross_attention_hidden_size add_cross_attention tie_encoder_decoder finetuning_task id2label
    label2id tokenizer_class prefix sep_token_id decoder_start_token_id task_specific_params
    problem_type max_length min_length do_sample early_stopping num_beams num_beam_groups
    diversity_penalty temperature top_k top_p typical_p repetition_penalty length_penalty
    no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids num_return_sequences
    output_scores return_dict_in_generate forced_bos_token_id forced_eos_token_id
    remove_invalid_values exponential_decay_length_penalty suppress_tokens begin_suppress_tokens
    use_cache initializer_range attention_dropout gradient_checkpointing output_router_logits
    """.split()
)


class ConfigError(ValueError):
    """A configuration key or value that we cannot use."""


def _check_keys(cls, data: Mapping[str, Any], where: str, ignore: frozenset = frozenset()):
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key in known or key in ignore:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"Unknown key '{key}' in {where}.{hint} Known keys: {sorted(known)}")


class _Config:
    """Shared helpers: strict construction from a dict, `replace`, and `to_dict`."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str | None = None):
        where = where or cls.__name__
        _check_keys(cls, data, where)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        _check_keys(type(self), changes, type(self).__name__)
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class VisionConfig(_Config):
    """SigLIP vision tower, as Idefics2 uses it (native aspect ratio, up to `image_size` px)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 980
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    def validate(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        _check_act(self.hidden_act, "vision hidden_act")


@dataclasses.dataclass(frozen=True)
class PerceiverConfig(_Config):
    """Perceiver resampler: `resampler_n_latents` latents attend over [image context; latents].

    Its width and RMSNorm epsilon are the text model's (as in Hugging Face's Idefics2Config).
    """

    hidden_act: str = "silu"
    resampler_n_latents: int = 64
    resampler_depth: int = 3
    resampler_n_heads: int = 16
    resampler_head_dim: int = 96
    num_key_value_heads: int = 4
    initializer_range: float = 0.02

    def validate(self):
        if self.resampler_n_heads % self.num_key_value_heads:
            raise ConfigError(
                f"perceiver resampler_n_heads={self.resampler_n_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        _check_act(self.hidden_act, "perceiver hidden_act")


@dataclasses.dataclass(frozen=True)
class TextConfig(_Config):
    """The decoder: Mistral (Idefics2) or Llama (Idefics3, SmolVLM), one module with options: Llama is
    Mistral without the sliding window, with Llama 3's RoPE frequency scaling where its config has it."""

    vocab_size: int = 32003
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    model_type: str = "mistral"  # Hugging Face's name of the decoder: "mistral" or "llama"
    # RoPE: "default", or "llama3" (long wavelengths slowed by `rope_factor`, blended between the
    # low and high frequency factors of `rope_original_max_position_embeddings`), as Hugging Face's
    rope_type: str = "default"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.head_dim is None:  # resolved once, as Hugging Face's MistralConfig does
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim

    def validate(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"text num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"text sliding_window must be positive or None, got {self.sliding_window}")
        _check_choice("text model_type", self.model_type, TEXT_MODEL_TYPES)
        _check_choice("text rope_type", self.rope_type, ROPE_TYPES)
        _check_act(self.hidden_act, "text hidden_act")


CONNECTORS = ("perceiver", "mlp", "pixel_shuffle")
TEXT_MODEL_TYPES = ("mistral", "llama")
ROPE_TYPES = ("default", "llama3")
# Hugging Face model types: Idefics2, and its successors Idefics3 and SmolVLM (Llama decoder, pixel shuffle)
MODEL_TYPES = ("idefics2", "idefics3", "smolvlm")
TILED_MODEL_TYPES = ("idefics3", "smolvlm")  # their processors cut images into tiles of the tower's size
ARCHITECTURE_NAMES = {"idefics2": "Idefics2ForConditionalGeneration", "idefics3": "Idefics3ForConditionalGeneration",
                      "smolvlm": "SmolVLMForConditionalGeneration"}
ARCHITECTURES = ("fully_autoregressive", "cross_attention")
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu", "silu", "swish", "relu")


def _check_choice(key: str, value: str, choices: tuple[str, ...]):
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        raise ConfigError(f"{key} '{value}' is not one of {choices}" + (f"; did you mean '{close[0]}'?" if close else ""))


def _check_act(name: str, where: str):
    if name not in ACTIVATIONS:
        raise ConfigError(f"Unsupported activation '{name}' for {where}; supported: {ACTIVATIONS}")


@dataclasses.dataclass(frozen=True)
class Idefics2Config(_Config):
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    perceiver: PerceiverConfig = dataclasses.field(default_factory=PerceiverConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    image_token_id: int = 32001
    tie_word_embeddings: bool = False
    # how image features reach the decoder (models/connector.py): "perceiver" (Idefics2: a fixed set
    # of latents per image), "mlp" (no pooling: every patch projected) or "pixel_shuffle" (Idefics3:
    # r x r neighbouring patches concatenated, then projected). The last two take square images of
    # `vision.image_size` (data.image_sizing="square"): their token count follows from it.
    connector: str = "perceiver"
    pixel_shuffle_factor: int = 2
    # how the decoder reads them: "fully_autoregressive" (Idefics2: the image tokens take places in
    # the decoder's sequence) or "cross_attention" (Flamingo / Idefics1: one `<image>` marker token per
    # image; gated cross-attention blocks, before every `cross_attention_every`-th decoder layer,
    # let each text token attend to the features of the images marked before it in its segment)
    architecture: str = "fully_autoregressive"
    cross_attention_every: int = 4
    # the Hugging Face model this is: "idefics2", or "idefics3" / "smolvlm" (a Llama decoder and the
    # pixel-shuffle connector; no Perceiver): how config.json is read and written
    model_type: str = "idefics2"

    def __post_init__(self):
        self.vision.validate()
        self.perceiver.validate()
        self.text.validate()
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ConfigError(
                f"image_token_id={self.image_token_id} is outside the vocabulary "
                f"(vocab_size={self.text.vocab_size})"
            )
        _check_choice("connector", self.connector, CONNECTORS)
        _check_choice("architecture", self.architecture, ARCHITECTURES)
        _check_choice("model_type", self.model_type, MODEL_TYPES)
        if self.model_type != "idefics2" and (self.connector, self.architecture) != ("pixel_shuffle",
                                                                                   "fully_autoregressive"):
            raise ConfigError(f"model_type '{self.model_type}' is fully autoregressive with the pixel_shuffle connector; "
                              f"got connector '{self.connector}', architecture '{self.architecture}'")
        if self.cross_attention_every < 1:
            raise ConfigError(f"cross_attention_every={self.cross_attention_every} must be at least 1 (a gated "
                              f"cross-attention block before every n-th decoder layer)")
        side, r = self.vision.num_patches_per_side, self.pixel_shuffle_factor
        if self.connector == "pixel_shuffle" and (r < 1 or side % r):
            raise ConfigError(f"pixel_shuffle_factor={r} does not divide the {side} patches per side of a "
                              f"{self.vision.image_size} px image (patch_size {self.vision.patch_size})")

    @property
    def image_seq_len(self) -> int:
        """Tokens per image in the decoder's sequence: its features (fully autoregressive), or one
        marker token (cross-attention, whose blocks read the features)."""
        return 1 if self.architecture == "cross_attention" else self.image_features_len

    @property
    def image_features_len(self) -> int:
        """Feature vectors per image out of the connector: the Perceiver's latents, every patch of a
        `vision.image_size` square image ("mlp"), or those patches over r^2 ("pixel_shuffle")."""
        if self.connector == "perceiver":
            return self.perceiver.resampler_n_latents
        r = self.pixel_shuffle_factor if self.connector == "pixel_shuffle" else 1
        return (self.vision.num_patches_per_side // r) ** 2

    # -- our own dict form ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str | None = None) -> "Idefics2Config":
        where = where or "Idefics2Config"
        _check_keys(cls, data, where)
        data = dict(data)
        subs = {"vision": VisionConfig, "perceiver": PerceiverConfig, "text": TextConfig}
        for key, sub_cls in subs.items():
            if key in data and isinstance(data[key], Mapping):
                data[key] = sub_cls.from_dict(data[key], f"{where}.{key}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str) -> "Idefics2Config":
        if name not in PRESETS:
            close = difflib.get_close_matches(name, sorted(PRESETS), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"Unknown preset '{name}'.{hint} Presets: {sorted(PRESETS)}")
        return PRESETS[name]()

    # -- Hugging Face config.json --------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> "Idefics2Config":
        """Reads a Hugging Face Idefics2, Idefics3 or SmolVLM `config.json` (transformers 4.40+ and
        5.x layouts)."""
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"config.json has model_type={model_type!r}; expected one of {MODEL_TYPES} "
                              f"({', '.join(ARCHITECTURE_NAMES.values())} checkpoints)")
        top = {k: v for k, v in hf.items() if k not in ("vision_config", "perceiver_config", "text_config")}
        if model_type != "idefics2":  # the pixel-shuffle connector; the text config's pad id is the one we keep
            if "perceiver_config" in hf:
                raise ConfigError(f"config.json of model_type {model_type!r} has a perceiver_config; {model_type} has none")
            top = {k: v for k, v in top.items() if k not in ("pad_token_id", "_pad_token_id", "vocab_size")}
            top.update(connector="pixel_shuffle", pixel_shuffle_factor=top.pop("scale_factor", 2))
        _check_keys(cls, top, "config.json", ignore=HF_GENERIC_KEYS)

        vision = _strip(hf.get("vision_config") or {}, "config.json vision_config", VisionConfig)
        perceiver = dict(hf.get("perceiver_config") or {})
        # Hugging Face stores a copy of the text width / epsilon in the perceiver config.
        perceiver.pop("hidden_size", None)
        perceiver.pop("rms_norm_eps", None)
        perceiver = _strip(perceiver, "config.json perceiver_config", PerceiverConfig)
        text = _text_from_hf(hf.get("text_config") or {}, "mistral" if model_type == "idefics2" else "llama")

        top = {k: v for k, v in top.items() if k not in HF_GENERIC_KEYS}
        return cls(
            vision=VisionConfig(**vision),
            perceiver=PerceiverConfig(**perceiver),
            text=TextConfig(**text),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            model_type=model_type,
            **{k: v for k, v in top.items() if k != "tie_word_embeddings"},
        )

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """A `config.json` that transformers' `Idefics2Config` (`Idefics3Config`, `SmolVLMConfig` for
        those model types) reads; a connector other than the Perceiver, or the cross-attention
        architecture, in an idefics2 config is written as our own keys (`connector`,
        `pixel_shuffle_factor`, `architecture`, `cross_attention_every`), which `from_hf_dict` reads
        back and transformers does not know (`hf_architecture_error` says so)."""
        text = self.text.to_dict()
        rope = {"rope_type": text.pop("rope_type"), "rope_theta": text.pop("rope_theta")}
        llama3 = {key: text.pop(f"rope_{key}") for key in ("factor", "low_freq_factor", "high_freq_factor",
                                                            "original_max_position_embeddings")}
        if rope["rope_type"] == "llama3":
            rope.update(llama3)
        if text["model_type"] == "llama":  # no window; Llama's options that we do not have, off
            text.pop("sliding_window")
            text.update(attention_bias=False, mlp_bias=False)
        text.update(rope_parameters=rope, tie_word_embeddings=self.tie_word_embeddings)
        vision = self.vision.to_dict()
        vision.update(model_type=f"{self.model_type}_vision")
        common = {
            "architectures": [ARCHITECTURE_NAMES[self.model_type]],
            "model_type": self.model_type,
            "dtype": dtype,
            "image_token_id": self.image_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_cache": True,
            "vision_config": vision,
            "text_config": text,
        }
        if self.model_type != "idefics2":
            return {**common, "scale_factor": self.pixel_shuffle_factor, "pad_token_id": self.text.pad_token_id}
        perceiver = self.perceiver.to_dict()
        perceiver.update(
            model_type="idefics2_perceiver",
            hidden_size=self.text.hidden_size,
            rms_norm_eps=self.text.rms_norm_eps,
        )
        return {
            **common,
            "perceiver_config": perceiver,
            **({} if self.connector == "perceiver" else
               {"connector": self.connector, "pixel_shuffle_factor": self.pixel_shuffle_factor}),
            **({} if self.architecture == "fully_autoregressive" else
               {"architecture": self.architecture, "cross_attention_every": self.cross_attention_every}),
        }

    def hf_architecture_error(self) -> str | None:
        """Why transformers' Idefics2 (Idefics3, SmolVLM) cannot hold this model, or None when it can."""
        if self.model_type != "idefics2":  # checked on construction: what Idefics3 and SmolVLM are
            return None
        if self.architecture != "fully_autoregressive":
            return (f"architecture '{self.architecture}' has no Hugging Face Idefics2 counterpart (Idefics2 is fully "
                    f"autoregressive; Idefics1's gated cross-attention model differs in its towers and blocks); "
                    f"the model is saved in our checkpoint format only")
        if self.connector != "perceiver":
            return (f"connector '{self.connector}' has no Hugging Face Idefics2 counterpart (its connector is the "
                    f"Perceiver); the model is saved in our checkpoint format only")
        return None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "Idefics2Config":
        """A local path or a gs:// URL."""
        return cls.from_hf_dict(json.loads(epath.Path(path).read_text()))

    def to_json_file(self, path: str | os.PathLike, dtype: str = "float32"):
        epath.Path(path).write_text(json.dumps(self.to_hf_dict(dtype), indent=2, sort_keys=True) + "\n")


# Backbone sizes, for asking "a better language model or a better vision encoder, at the same
# budget": width, depth and heads only; the image size, vocabulary and context stay the config's.
VISION_SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "small": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
    "siglip-base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "siglip-so400m": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
}
TEXT_SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8),
}


def with_backbone_sizes(config: Idefics2Config, vision: str = "", text: str = "") -> Idefics2Config:
    """`config` with its vision tower and / or decoder of a named size (`VISION_SIZES`, `TEXT_SIZES`;
    "" keeps the config's own)."""
    if vision:
        _check_choice("vision_size", vision, tuple(VISION_SIZES))
        config = config.replace(vision=config.vision.replace(**VISION_SIZES[vision]))
    if text:
        _check_choice("text_size", text, tuple(TEXT_SIZES))
        config = config.replace(text=config.text.replace(head_dim=None, **TEXT_SIZES[text]))
    return config


def tile_side(model) -> int:
    """The side of the tiles a model's processor cuts images into: the vision tower's image size for
    Idefics3 and SmolVLM, 0 for Idefics2's processing. `model`: an `Idefics2Config` or a training
    config's model section."""
    return model.vision.image_size if model.model_type in TILED_MODEL_TYPES else 0


def model_config(section) -> Idefics2Config:
    """The model a training config's `model` section (an `ml_collections.ConfigDict`) describes: its
    towers resized by `vision_size` / `text_size` when set; its other keys (dtypes, attention,
    init_from) are the trainer's."""
    keys = ("vision", "perceiver", "text", "image_token_id", "tie_word_embeddings", "connector", "pixel_shuffle_factor",
            "architecture", "cross_attention_every", "model_type")
    config = Idefics2Config.from_dict({k: section[k].to_dict() if hasattr(section[k], "to_dict") else section[k]
                                       for k in keys if k in section}, where="config.model")
    return with_backbone_sizes(config, section.get("vision_size", ""), section.get("text_size", ""))


def _text_from_hf(section: Mapping[str, Any], expected: str) -> dict[str, Any]:
    """A Hugging Face `text_config` (Mistral for Idefics2, Llama for its successors) as TextConfig fields."""
    text = dict(section)
    text_type = text.get("model_type", expected)
    if text_type != expected:
        raise ConfigError(f"config.json text_config has model_type={text_type!r}; expected {expected!r}")
    rope = text.pop("rope_parameters", None) or text.pop("rope_scaling", None)
    text.pop("rope_scaling", None)
    if rope:
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"text_config rope type {rope_type!r} is not supported (only {ROPE_TYPES})")
        if "rope_theta" in rope:
            text["rope_theta"] = rope["rope_theta"]
        if rope_type == "llama3":
            text.update(rope_type=rope_type, rope_factor=rope["factor"], rope_low_freq_factor=rope["low_freq_factor"],
                        rope_high_freq_factor=rope["high_freq_factor"],
                        rope_original_max_position_embeddings=rope["original_max_position_embeddings"])
    # Hugging Face Mistral configs may carry `layer_types`; all Mistral layers are alike.
    layer_types = text.pop("layer_types", None)
    if layer_types and len(set(layer_types)) > 1:
        raise ConfigError(f"text_config layer_types={sorted(set(layer_types))}: mixed layer types unsupported")
    text.pop("tie_word_embeddings", None)
    if text_type == "llama":
        for key in ("attention_bias", "mlp_bias"):
            if text.pop(key, False):
                raise ConfigError(f"text_config {key}=true: Llama decoders with biases are not supported")
        if text.pop("pretraining_tp", 1) != 1:
            raise ConfigError("text_config pretraining_tp other than 1 is not supported")
        text.setdefault("sliding_window", None)  # Llama attends to the whole context
    return {**_strip(text, "config.json text_config", TextConfig), "model_type": text_type}


def _strip(section: Mapping[str, Any], where: str, cls) -> dict[str, Any]:
    """Drops Hugging Face bookkeeping keys, then errors on any key `cls` does not know."""
    _check_keys(cls, section, where, ignore=HF_GENERIC_KEYS)
    known = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in section.items() if k in known}


def idefics2_8b() -> Idefics2Config:
    """HuggingFaceM4/idefics2-8b: SigLIP-SO400M/14 at 980 px, Perceiver 64 latents, Mistral-7B."""
    return Idefics2Config(
        vision=VisionConfig(
            hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
            image_size=980, patch_size=14,
        ),
        perceiver=PerceiverConfig(
            resampler_n_latents=64, resampler_depth=3, resampler_n_heads=16, resampler_head_dim=96,
            num_key_value_heads=4,
        ),
        text=TextConfig(
            vocab_size=32003, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
            rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
        ),
        image_token_id=32001,
    )


def tiny() -> Idefics2Config:
    """A few-million-parameter Idefics2 of the same shape family, for CPU runs and tests."""
    return Idefics2Config(
        vision=VisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=112, patch_size=14,
        ),
        perceiver=PerceiverConfig(
            resampler_n_latents=64, resampler_depth=2, resampler_n_heads=4, resampler_head_dim=16,
            num_key_value_heads=2,
        ),
        text=TextConfig(
            vocab_size=1027, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            rms_norm_eps=1e-5, sliding_window=512,
        ),
        image_token_id=1025,
    )


def smolvlm_256m() -> Idefics2Config:
    """HuggingFaceTB/SmolVLM-256M-Instruct's shape: SigLIP-B/16 at 512 px tiles, pixel shuffle 4 (64
    tokens per tile), SmolLM2-135M (a Llama decoder, untied head)."""
    return Idefics2Config(
        vision=VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=512, patch_size=16),
        text=TextConfig(vocab_size=49280, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                        rms_norm_eps=1e-5, rope_theta=100000.0, sliding_window=None, model_type="llama",
                        bos_token_id=1, eos_token_id=2, pad_token_id=2),
        image_token_id=49190, connector="pixel_shuffle", pixel_shuffle_factor=4, model_type="smolvlm",
    )


def smolvlm_tiny() -> Idefics2Config:
    """A SmolVLM of `tiny`'s size, for CPU runs and tests: 112 px tiles, pixel shuffle 4 (4 tokens per
    tile); the vocabulary of the synthetic data's tokenizer.json (`data/synthetic.py`, `<image>` = 3)."""
    c = tiny()
    return c.replace(text=c.text.replace(vocab_size=1024, sliding_window=None, model_type="llama", bos_token_id=0,
                                         eos_token_id=4, pad_token_id=1),
                     image_token_id=3, connector="pixel_shuffle", pixel_shuffle_factor=4, model_type="smolvlm")


PRESETS = {"idefics2-8b": idefics2_8b, "tiny": tiny, "smolvlm-256m": smolvlm_256m, "smolvlm-tiny": smolvlm_tiny}
