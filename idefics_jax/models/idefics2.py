"""Idefics2: encode images (SigLIP -> projection -> Perceiver), splice them into the text, decode.

The fully autoregressive design: every image becomes `resampler_n_latents` (64) vectors that take
the places of the `<image>` tokens of the prompt, and the Mistral decoder reads the mixed sequence.
With `architecture="cross_attention"` an image keeps one `<image>` marker token in the text instead,
and gated cross-attention blocks between the decoder layers read its features
(`models/cross_attention.py`).

Shapes are static so that XLA compiles one program per input shape: images come as
`pixel_values [batch, images, height, width, 3]` (channels last) with a pixel mask
`[batch, images, height, width]`. Image slots whose pixels are all zero are padding (Hugging
Face's rule); they are encoded with the rest (static shapes) but never spliced in. Row `b`'s
image tokens take the latents of row `b`'s real images, in order.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from idefics_jax.config import Idefics2Config
from idefics_jax.models.connector import Connector
from idefics_jax.models.cross_attention import GatedCrossAttentionLayer, image_context
from idefics_jax.models.layers import dense
from idefics_jax.models.mistral import MistralModel
from idefics_jax.models.remat import remat_layer
from idefics_jax.models.vision import VisionTransformer, patch_attention_mask
from idefics_jax.sharding import constrain

Dtype = Any


def real_image_mask(pixel_values):
    """bool `[batch, images]`: an image slot is real unless every one of its values is 0."""
    return jnp.any(pixel_values != 0, axis=(-3, -2, -1))


def check_image_token_count(input_ids, pixel_values, image_token_id: int, image_seq_len: int):
    """Raises ValueError when a row's `<image>` tokens differ from its images x latents.

    Runs on concrete (host) inputs only; under `jax.jit` the caller (the processor, the packer)
    owns that invariant.
    """
    if isinstance(input_ids, jax.core.Tracer) or isinstance(pixel_values, jax.core.Tracer):
        return
    tokens = np.sum(np.asarray(input_ids) == image_token_id, axis=1)  # [batch]
    images = np.any(np.asarray(pixel_values) != 0, axis=(-3, -2, -1)).sum(axis=1)  # [batch]
    if tokens.sum() != int(images.sum()) * image_seq_len:
        raise ValueError(
            f"The prompt has {int(tokens.sum())} image tokens but there are {int(images.sum())} images x "
            f"{image_seq_len} latents = {int(images.sum()) * image_seq_len} image features"
        )
    for row, (t, i) in enumerate(zip(tokens, images)):
        if t != int(i) * image_seq_len:
            raise ValueError(
                f"Row {row} of the batch has {int(t)} image tokens but {int(i)} images x {image_seq_len} "
                f"latents = {int(i) * image_seq_len} image features"
            )


def splice_image_features(is_image, inputs_embeds, image_features, real_images):
    """Puts image latents at the `<image>` positions of each row.

    is_image bool [batch, seq]: the image-token positions; inputs_embeds [batch, seq, hidden];
    image_features [batch, images, latents, hidden]; real_images bool [batch, images].
    The k-th image token of row b takes latent k % latents of row b's (k // latents)-th real image.
    """
    batch, num_images, num_latents, hidden = image_features.shape
    # rows split over the batch axes, features whole, as the text embeddings are: a row's gather then
    # stays on its devices (features split along `embed` are replicated by the SPMD partitioner)
    image_features = constrain(image_features, "activation_batch", None, None, "activation_embed")
    rank = jnp.cumsum(is_image, axis=1) - 1  # [batch, seq]: index among the row's image tokens
    # slots of each row's real images, in order (padding slots last)
    real_slots = jax.vmap(lambda r: jnp.nonzero(r, size=num_images, fill_value=0)[0])(real_images)
    image_index = jnp.clip(rank // num_latents, 0, num_images - 1)
    slot = jnp.take_along_axis(real_slots, image_index, axis=1)  # [batch, seq]
    gathered = image_features[jnp.arange(batch)[:, None], slot, rank % num_latents]  # [batch, seq, hidden]
    return jnp.where(is_image[..., None], gathered.astype(inputs_embeds.dtype), inputs_embeds)


def neftune_noise(rng, embeds, text_mask, alpha: float):
    """NEFTune: uniform noise of scale alpha / sqrt(seq * hidden) on the text embeddings."""
    batch, seq, hidden = embeds.shape
    noise = jax.random.uniform(rng, embeds.shape, jnp.float32, -1.0, 1.0) * (alpha / np.sqrt(seq * hidden))
    return embeds + jnp.where(text_mask[..., None], noise, 0.0).astype(embeds.dtype)


class Idefics2Model(nn.Module):
    config: Idefics2Config
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool | str = False
    neftune_alpha: float = 0.0
    scan_layers: bool = False

    def setup(self):
        cfg = self.config
        kw = dict(attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
                  remat=self.remat)
        self.vision_model = VisionTransformer(cfg.vision, scan_layers=self.scan_layers, **kw)
        self.connector = Connector(cfg, **kw)
        self.text_model = MistralModel(cfg.text, scan_layers=self.scan_layers, **kw)
        if cfg.architecture == "cross_attention":
            if self.scan_layers:
                raise ValueError("architecture='cross_attention' places blocks between the decoder layers, which "
                                 "one scan over the layers cannot: set train.scan_layers=False")
            block = remat_layer(GatedCrossAttentionLayer, self.remat)
            blocks = -(-cfg.text.num_hidden_layers // cfg.cross_attention_every)  # before layers 0, every, 2 every...
            self.gated_cross_attn_layers = [block(cfg.text, self.attention_impl, dtype=self.dtype,
                                                  param_dtype=self.param_dtype) for _ in range(blocks)]

    def encode_images(self, pixel_values, pixel_attention_mask=None):
        """Vision tower + connector for every image slot.

        pixel_values [batch, images, height, width, 3]; pixel_attention_mask [batch, images, height,
        width]. Returns a dict: `vision_hidden_states [batch * images, patches, vision hidden]`,
        `patch_mask [batch * images, h, w]`, `image_features [batch, images, latents, hidden]`,
        `real_images [batch, images]`.
        """
        batch, num_images, height, width, channels = pixel_values.shape
        flat = pixel_values.reshape(batch * num_images, height, width, channels)
        if pixel_attention_mask is None:
            pixel_attention_mask = jnp.ones((batch, num_images, height, width), bool)
        pixel_mask = pixel_attention_mask.reshape(batch * num_images, height, width)
        patch_mask = patch_attention_mask(pixel_mask, self.config.vision.patch_size)  # [n, h, w]
        vision_hidden = self.vision_model(flat, patch_mask)  # [n, h * w, vision hidden]
        features = self.connector(vision_hidden, patch_mask)  # [n, image_seq_len, hidden]
        return {
            "vision_hidden_states": vision_hidden,
            "patch_mask": patch_mask,
            "image_features": features.reshape(batch, num_images, *features.shape[1:]),
            "real_images": real_image_mask(pixel_values),
        }

    def __call__(self, input_ids, *, attention_mask=None, pixel_values=None, pixel_attention_mask=None,
                 positions=None, segment_ids=None, image_token_mask=None, train: bool = False, cache=None):
        cfg = self.config
        cross = cfg.architecture == "cross_attention"
        embeds = self.text_model.embed(input_ids)  # [batch, seq, hidden]
        is_image = input_ids == cfg.image_token_id if image_token_mask is None else image_token_mask
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        if train and self.neftune_alpha > 0:
            embeds = neftune_noise(self.make_rng("neftune"), embeds, ~is_image, self.neftune_alpha)
        images = None
        if pixel_values is not None:
            if image_token_mask is None:
                check_image_token_count(input_ids, pixel_values, cfg.image_token_id, cfg.image_seq_len)
            images = self.encode_images(pixel_values, pixel_attention_mask)
            if not cross:
                embeds = splice_image_features(is_image, embeds, images["image_features"], images["real_images"])
        elif self.is_initializing():  # create the vision and connector parameters too
            patch = cfg.vision.patch_size
            images = self.encode_images(jnp.zeros((1, 1, patch, patch, cfg.vision.num_channels), self.dtype))
            images = jax.tree.map(lambda a: jnp.broadcast_to(a, (input_ids.shape[0], *a.shape[1:])), images)
        if not cross:
            return self.text_model(embeds, attention_mask=attention_mask, positions=positions,
                                   segment_ids=segment_ids, cache=cache)
        context = None if images is None else image_context(images["image_features"], images["real_images"],
                                                            is_image, positions, segment_ids)
        if cache is not None and cache.images is not None:  # generation: the images of earlier calls first
            context = cache.images if context is None else cache.images.concatenated(context)

        def before_layer(i, x):
            if context is None or i % cfg.cross_attention_every:
                return x
            return self.gated_cross_attn_layers[i // cfg.cross_attention_every](x, positions, segment_ids, context)

        out = self.text_model(embeds, attention_mask=attention_mask, positions=positions, segment_ids=segment_ids,
                              cache=cache, before_layer=before_layer)
        if cache is None:
            return out
        hidden, cache = out
        return hidden, cache.replace(images=context)


class Idefics2(nn.Module):
    """Idefics2ForConditionalGeneration: returns logits `[batch, seq, vocab]`.

        logits = Idefics2(config).apply({"params": params}, input_ids, attention_mask=...,
                                        pixel_values=..., pixel_attention_mask=...)

    input_ids int [batch, seq]; attention_mask [batch, seq] (0 = padding); pixel_values float
    [batch, images, height, width, 3]; pixel_attention_mask bool [batch, images, height, width];
    positions int [batch, seq] (default 0 .. seq - 1); segment_ids int [batch, seq] for packed rows.
    `dtype` is the compute dtype, `param_dtype` the parameters' dtype.
    """

    config: Idefics2Config
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool | str = False  # what each layer keeps for the backward pass: a policy of models/remat.py
    neftune_alpha: float = 0.0  # NEFTune noise on text embeddings when train=True (0: off)
    scan_layers: bool = False  # vision and text layers as one nn.scan each, parameters stacked (models/scan.py)

    def setup(self):
        kw = dict(attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
                  remat=self.remat, neftune_alpha=self.neftune_alpha, scan_layers=self.scan_layers)
        self.model = Idefics2Model(self.config, **kw)
        if not self.config.tie_word_embeddings:
            self.lm_head = dense(self.config.text.vocab_size, ("embed", "vocab"), use_bias=False,
                                 dtype=self.dtype, param_dtype=self.param_dtype,
                                 init_std=self.config.text.initializer_range)

    def hidden_states(self, input_ids, **kwargs):
        """The decoder's final (normed) hidden states `[batch, seq, hidden]`."""
        return self.model(input_ids, **kwargs)

    def logits(self, hidden):  # [batch, seq, hidden] -> [batch, seq, vocab]
        if self.config.tie_word_embeddings:
            return self.model.text_model.attend(hidden)
        return self.lm_head(hidden)

    def encode_images(self, pixel_values, pixel_attention_mask=None):
        return self.model.encode_images(pixel_values, pixel_attention_mask)

    def __call__(self, input_ids, *, attention_mask=None, pixel_values=None, pixel_attention_mask=None,
                 positions=None, segment_ids=None, image_token_mask=None, train: bool = False, cache=None):
        """image_token_mask bool [batch, seq]: where image latents go (default: the `<image>` tokens;
        generation passes the prompt's, so a generated `<image>` id stays an ordinary token).

        cache: a `KVCache` (generation): returns `(logits, cache)` with the new tokens written.
        """
        out = self.model(input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                         pixel_attention_mask=pixel_attention_mask, positions=positions,
                         segment_ids=segment_ids, image_token_mask=image_token_mask, train=train, cache=cache)
        if cache is None:
            return self.logits(out)
        hidden, cache = out
        return self.logits(hidden), cache


class Idefics3(Idefics2):
    """Idefics3ForConditionalGeneration: the same model with a config of `model_type="idefics3"` (a Llama
    decoder, the pixel-shuffle connector), called as `Idefics2`."""


class SmolVLM(Idefics2):
    """SmolVLMForConditionalGeneration: the same model with a config of `model_type="smolvlm"`."""
