"""Greedy decoding by full recomputation, and exact-match evaluation on conversation records.

`greedy_generate` runs one jitted forward pass over a fixed `[batch, prompt + max_new_tokens]`
buffer per new token (no KV cache), so it is simple, exact and slow: the reference that cached
generation is compared with, and the evaluator of small models during training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from idefics_jax.data.image_processing import ImageProcessor
from idefics_jax.data.image_tokens import END_OF_UTTERANCE
from idefics_jax.data.processor import Processor, apply_chat_template


def greedy_generate(model, params, input_ids, attention_mask, pixel_values=None, pixel_attention_mask=None, *,
                    max_new_tokens: int, stop_ids: Sequence[int] = ()) -> np.ndarray:
    """input_ids / attention_mask `[batch, prompt]`, left padded -> new tokens `[batch, max_new_tokens]`
    (after a stop token: the pad id 0)."""
    batch, prompt = input_ids.shape
    total = prompt + max_new_tokens
    ids = np.zeros((batch, total), np.int32)
    mask = np.zeros((batch, total), np.int32)
    ids[:, :prompt], mask[:, :prompt] = input_ids, attention_mask

    image_mask = np.zeros((batch, total), bool)
    image_mask[:, :prompt] = input_ids == model.config.image_token_id  # generated ids are plain tokens

    @jax.jit
    def next_token(ids, mask, pixel_values, pixel_attention_mask, t):
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        logits = model.apply({"params": params}, ids, attention_mask=mask, positions=positions,
                              pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask,
                              image_token_mask=image_mask)
        return jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False), axis=-1)

    done = np.zeros(batch, bool)
    for t in range(prompt, total):
        token = np.asarray(next_token(ids, mask, pixel_values, pixel_attention_mask, t))
        token = np.where(done, 0, token)
        ids[:, t], mask[:, t] = token, ~done
        done |= np.isin(token, list(stop_ids))
        if done.all():
            break
    return ids[:, prompt:]


def exact_match_eval(model, params, records: Sequence[dict], base_dir: str, processor: Processor, *,
                     max_new_tokens: int = 16, batch_size: int = 16) -> dict:
    """Exact match of the greedy answer with the last assistant turn of each conversation record."""
    tokenizer = processor.tokenizer
    stop = [tokenizer.token_id(END_OF_UTTERANCE), tokenizer.eos_id]
    results = []
    for start in range(0, len(records), batch_size):
        chunk = list(records[start:start + batch_size])
        prompts, images, answers = [], [], []
        for record in chunk:
            messages = record["messages"]
            *context, answer = messages
            if answer["role"] != "assistant":
                raise ValueError(f"record {record.get('id')}: the last turn must be the assistant's answer")
            prompts.append(apply_chat_template([_message(m) for m in context], add_generation_prompt=True))
            images.append([str(Path(base_dir) / ref) for ref in record.get("images", [])])
            answers.append(answer["content"])
        while len(prompts) < batch_size:  # a fixed batch: one compiled program
            prompts.append(prompts[-1])
            images.append(images[-1])
        inputs = processor(prompts, images)
        new = greedy_generate(model, params, inputs["input_ids"], inputs["attention_mask"],
                              inputs.get("pixel_values"), inputs.get("pixel_attention_mask"),
                              max_new_tokens=max_new_tokens, stop_ids=stop)
        for row, answer, record in zip(new, answers, chunk):
            text = tokenizer.decode([t for t in row if t not in stop and t != 0], skip_special_tokens=True).strip()
            results.append({"id": record.get("id"), "answer": answer, "prediction": text,
                            "correct": text == answer.strip()})
    accuracy = float(np.mean([r["correct"] for r in results])) if results else 0.0
    return {"exact_match": accuracy, "n": len(results), "results": results}


def _message(message: dict) -> dict:
    content = message["content"]
    if isinstance(content, str):
        parts, text = [], content
        while "<image>" in text:
            before, text = text.split("<image>", 1)
            if before:
                parts.append({"type": "text", "text": before})
            parts.append({"type": "image"})
        if text:
            parts.append({"type": "text", "text": text})
        return {"role": message["role"], "content": parts}
    return message


def load_records(directory: str | Path, limit: int | None = None) -> list[dict]:
    path = Path(directory) / "data.jsonl" if Path(directory).is_dir() else Path(directory)
    records = [json.loads(line) for line in open(path) if line.strip()]
    return records[:limit] if limit else records


def eval_processor(tokenizer, image_seq_len: int, longest_edge: int, shortest_edge: int) -> Processor:
    return Processor(tokenizer, ImageProcessor(longest_edge=longest_edge, shortest_edge=shortest_edge), image_seq_len)
