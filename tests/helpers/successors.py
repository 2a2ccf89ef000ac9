"""Tiny random Idefics3 and SmolVLM models made with transformers (tests/test_idefics3.py,
tests/test_successor_stack.py)."""

from __future__ import annotations

import torch

from conftest import IMAGE_TOKEN_ID

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56,
              patch_size=7)
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16, rope_theta=500000.0)


def build_hf(model_type: str, seed: int, vocab_size: int = 128, image_token_id: int = IMAGE_TOKEN_ID,
             pad_token_id: int = 0):
    """A random Idefics3 (Llama 3 RoPE, separate LM head) or SmolVLM (default RoPE, tied embeddings),
    float32, eager attention, its norms perturbed so that the comparison sees them."""
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, SmolVLMConfig,
                              SmolVLMForConditionalGeneration)

    text = dict(model_type="llama", vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                pad_token_id=pad_token_id)
    if model_type == "idefics3":
        config = Idefics3Config(vision_config=VISION, text_config={**text, "rope_parameters": LLAMA3_ROPE},
                                scale_factor=2, image_token_id=image_token_id)
        cls = Idefics3ForConditionalGeneration
    else:
        config = SmolVLMConfig(vision_config=VISION, text_config={**text, "tie_word_embeddings": True},
                               scale_factor=4, image_token_id=image_token_id, tie_word_embeddings=True)
        cls = SmolVLMForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
            if name.endswith("bias"):
                param.add_(0.02 * torch.randn_like(param))
    model.config._attn_implementation = "eager"
    return model.eval()
