"""The decoder's key/value cache for generation: a ring buffer as long as the sliding window.

Columns are the token slots of a left-padded batch: the prompt takes columns `0 .. prompt - 1`,
generated tokens the columns after it. Column `c` lives in slot `c % length`, so a cache of
`length = min(sliding_window, total columns)` slots always holds the last `length` columns, which
is exactly what Mistral's window lets a query see. Each slot keeps the RoPE position of its token
and whether it holds a real token (left padding and never-written slots do not), so attention
over the cache needs no other bookkeeping: causality and the window are decided by positions.
"""

from __future__ import annotations

from typing import Any

import flax
import jax.numpy as jnp

from idefics_jax.config import TextConfig


@flax.struct.dataclass
class KVCache:
    keys: tuple[Any, ...]  # per layer [batch, length, kv_heads, head_dim], after RoPE
    values: tuple[Any, ...]  # per layer [batch, length, kv_heads, head_dim]
    positions: Any  # int32 [batch, length]: RoPE position of each slot's token
    valid: Any  # bool [batch, length]: the slot holds a real token
    index: Any  # int32 []: columns written so far (the next column)

    @classmethod
    def create(cls, config: TextConfig, batch: int, max_columns: int, dtype=jnp.float32) -> "KVCache":
        """An empty cache for `max_columns` columns (prompt + new tokens), ring-buffered to the window."""
        length = cache_length(config, max_columns)
        shape = (batch, length, config.num_key_value_heads, config.attention_head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
        return cls(keys=zeros, values=zeros, positions=jnp.zeros((batch, length), jnp.int32),
                   valid=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32))

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    def slots(self, seq: int):
        """(first kept column of the `seq` new ones, their slots): only the last `length` columns fit."""
        start = max(0, seq - self.length)
        return start, (self.index + jnp.arange(start, seq, dtype=jnp.int32)) % self.length

    def update(self, new_keys, new_values, positions, valid) -> "KVCache":
        """Writes `seq` new columns: new_keys / new_values per layer `[batch, seq, kv_heads, head_dim]`,
        positions int `[batch, seq]`, valid bool `[batch, seq]`."""
        seq = positions.shape[1]
        start, slots = self.slots(seq)
        write = lambda cache, new: cache.at[:, slots].set(new[:, start:].astype(cache.dtype))
        return self.replace(
            keys=tuple(write(c, n) for c, n in zip(self.keys, new_keys)),
            values=tuple(write(c, n) for c, n in zip(self.values, new_values)),
            positions=write(self.positions, positions.astype(jnp.int32)),
            valid=write(self.valid, valid.astype(bool)),
            index=self.index + seq,
        )


def cache_length(config: TextConfig, max_columns: int) -> int:
    window = config.sliding_window
    return max_columns if window is None else min(window, max_columns)
