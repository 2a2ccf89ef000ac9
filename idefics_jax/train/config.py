"""The training config: one `ml_collections.ConfigDict` per stage, built on `base_config()`.

Sections: `model` (the full model config, from a preset, every field overridable), `data`
(sources, packing, batch), `optimizer`, `train` (steps, checkpoints, logging, freezing, remat,
NEFTune), `mesh`. A stage file in `configs/` returns `get_config()`; the command line overrides
any key (`--config.train.steps=100`); a key that does not exist is an error naming it.
"""

from __future__ import annotations

import ml_collections

from idefics_jax.config import Idefics2Config
from idefics_jax.distributed import DEFAULT_COMPILATION_CACHE


def model_section(preset: str) -> ml_collections.ConfigDict:
    model = Idefics2Config.preset(preset)
    return ml_collections.ConfigDict({
        "vision": model.vision.to_dict(), "perceiver": model.perceiver.to_dict(), "text": model.text.to_dict(),
        "image_token_id": model.image_token_id, "tie_word_embeddings": model.tie_word_embeddings,
        # the paper's connector choices (idefics_jax/config.py): perceiver | mlp | pixel_shuffle
        "connector": model.connector, "pixel_shuffle_factor": model.pixel_shuffle_factor,
        # fully_autoregressive | cross_attention (gated blocks before every n-th decoder layer)
        "architecture": model.architecture, "cross_attention_every": model.cross_attention_every,
        # the Hugging Face model type it exports as: idefics2, or idefics3 / smolvlm (pixel_shuffle connector,
        # text.model_type=llama)
        "model_type": model.model_type,
        # backbone sizes (idefics_jax/config.py VISION_SIZES, TEXT_SIZES): "" keeps vision / text as set
        "vision_size": "", "text_size": "",
        "dtype": "bfloat16", "param_dtype": "float32", "attention_impl": "auto",
        # a Hugging Face directory or an idefics_jax checkpoint (may be gs://...) to start from ("": random)
        "init_from": "",
        # the towers to take from init_from, comma-separated ("vision,text"; "": all): the others start fresh
        "init_towers": "",
    })


def base_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = model_section(preset)
    c.data = ml_collections.ConfigDict({
        "dir": "",  # sources' paths are relative to this; "" with synthetic=True: WORKDIR/data
        "synthetic": False,  # generate the synthetic data set into `dir` when it is missing
        "synthetic_num": 2000,
        "synthetic_easy": False,  # single words / 2-digit numbers in large type (tiny CPU runs)
        # a sentencepiece .model or a tokenizer.json ("": the synthetic data's, the data directory's, or
        # model.init_from's)
        "tokenizer": "",
        # name -> idefics_jax.data.pipeline.SourceConfig's other fields (path, format, weight, ...), so
        # that each is a key: --config.data.sources.pairs.path=...; mixed in name order
        "sources": {},
        "seq_len": 2048,
        "image_slots": 8,
        # every source's images: "keep_aspect" (up to its longest_edge) or "square" (longest_edge x
        # longest_edge; what the mlp and pixel_shuffle connectors take, at model.vision.image_size)
        "image_sizing": "keep_aspect",
        "buckets": [(980, 980)],
        "batch_size": 8,  # global, across hosts
        "num_workers": 0,
        "read_threads": 16,  # per source: threads reading + encoding records (grain's ReadOptions)
        "read_buffer": 500,  # per source: records read ahead
        "strict": False,  # raise on the first record that cannot be used (default: skip it, counted and logged)
        "seed": 0,
        "eval_source": "",  # held-out conversations for exact-match evaluation
    })
    c.optimizer = ml_collections.ConfigDict({
        "learning_rate": 1e-4, "warmup_steps": 100, "end_lr_ratio": 0.1, "weight_decay": 0.1,
        "b1": 0.9, "b2": 0.95, "eps": 1e-8, "grad_clip": 1.0, "accum_steps": 1,
        # per-tower factors on the learning rate (vision, connector, text)
        "lr_multipliers": {"vision": 1.0, "connector": 1.0, "text": 1.0},
    })
    c.train = ml_collections.ConfigDict({
        "steps": 1000, "seed": 0, "log_every": 10, "checkpoint_every": 200, "keep_checkpoints": 3,
        "keep_period": 0,  # also keep every N-th step's checkpoint for good (0: no)
        "async_checkpoints": True, "freeze": [], "scan_layers": False, "neftune_alpha": 0.0,
        # what trains, by name: frozen | lora | full ("": train.freeze and train.lora as set); see
        # idefics_jax/checkpoints/workdir.py
        "regime": "",
        # what each layer keeps for the backward pass: none, full, minimal, save_qkv_proj,
        # minimal_offloaded, qkv_proj_offloaded (idefics_jax/models/remat.py)
        "remat": "none",
        "eval_every": 0, "eval_samples": 50, "max_new_tokens": 16,
        # held-out images split into 4 crops + the whole, as a run trained with splitting reads them
        "eval_split": False,
        # a jax.profiler trace of `profile_steps` steps from this one into WORKDIR/profile (0: off)
        "profile_first_step": 0, "profile_steps": 3,
        # compiled programs kept between runs: a resumed run skips compilation ("": off)
        "compilation_cache": DEFAULT_COMPILATION_CACHE,
        # LoRA / DoRA adapters (rank 0: off); adapted towers' own weights stay frozen
        "lora": ml_collections.ConfigDict({
            "rank": 0, "alpha": 16.0, "dora": False, "towers": ["vision", "text"],
            "targets": r"(q_proj|k_proj|v_proj|o_proj|out_proj|gate_proj|up_proj|down_proj|fc1|fc2)$",
        }),
    })
    # sizes within one slice (ICI; -1: the rest), and how many slices each axis spans (DCN)
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1,
                                        "dcn_data": 1, "dcn_fsdp": 1, "dcn_tensor": 1})
    return c
