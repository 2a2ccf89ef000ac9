"""Checkpoints of every kind, in one place.

- `hf`: Hugging Face safetensors <-> parameters, by the rule table in `names`;
- `params`: our parameter checkpoints (orbax `params/` + `config.json`), and the parameter tree a
  config describes;
- `train_state`: a training run's checkpoints (params, optimizer state, data iterator), and its
  parameters alone;
- `workdir`: a training workdir's model (adapters merged) and its export to Hugging Face;
- `processor`: the tokenizer and image-processing files that travel with the weights;
- `loading`: `load(path)` tells the kinds apart and returns what inference needs.
"""

from idefics_jax.checkpoints.hf import load_hf_checkpoint, save_hf_checkpoint
from idefics_jax.checkpoints.loading import LoadedModel, checkpoint_kind, load
from idefics_jax.checkpoints.params import (CheckpointError, ParamsReader, abstract_params, load_checkpoint,
                                           save_checkpoint)
from idefics_jax.checkpoints.processor import copy_processor_files, image_processor_from, save_image_processor
from idefics_jax.checkpoints.train_state import Checkpointer
from idefics_jax.checkpoints.workdir import export_hf, restore_workdir

__all__ = ["CheckpointError", "Checkpointer", "ParamsReader", "LoadedModel", "abstract_params", "checkpoint_kind",
           "copy_processor_files", "export_hf", "image_processor_from", "load", "load_checkpoint",
           "load_hf_checkpoint", "restore_workdir", "save_checkpoint", "save_hf_checkpoint", "save_image_processor"]
