"""The decoder's key/value cache for generation: a ring buffer as long as the sliding window.

Columns are the token slots of a left-padded batch: the prompt takes columns `0 .. prompt - 1`,
generated tokens the columns after it. Column `c` lives in slot `c % length`, so a cache of
`length = min(sliding_window, total columns)` slots always holds the last `length` columns, which
is exactly what Mistral's window lets a query see. Each slot keeps the RoPE position of its token
and whether it holds a real token (left padding and never-written slots do not), so attention
over the cache needs no other bookkeeping: causality and the window are decided by positions.

Keys and values are stored heads-major, `[batch, kv_heads, length, head_dim]`, the layout of
attention's batched products (one per head). A decode step (one new column) writes its column into
the cache in place and then attends over the cache alone (`LayerCache.slot`), with no concatenated
copy of the cache: the slot it overwrites held a column the window already hides. Longer calls
attend over [cache; new columns] and write afterwards, since a chunk's later columns may overwrite
slots its earlier queries still see; the first call into a fresh cache (prefill) attends over its
own columns alone, as an uncached forward pass (any attention kernel can serve it).

A conversation keeps its cache between turns (`inference/conversation.py`): there the cache is as
long as the columns (it never wraps), so it can be cut back to the prefix the next turn shares
(`rewound`) and grown for the turn's new columns (`resized`); masking by stored positions keeps
the window exact in a cache longer than the window.
"""

from __future__ import annotations

from typing import Any

import einops
import flax
import jax
import jax.numpy as jnp

from idefics_jax.config import TextConfig


@flax.struct.dataclass
class KVCache:
    keys: tuple[Any, ...]  # per layer [batch, kv_heads, length, head_dim], after RoPE
    values: tuple[Any, ...]  # per layer [batch, kv_heads, length, head_dim]
    positions: Any  # int32 [batch, length]: RoPE position of each slot's token
    valid: Any  # bool [batch, length]: the slot holds a real token
    index: Any  # int32 []: columns written so far (the next column)
    # the cross-attention architecture's images (`models.cross_attention.ImageContext`), kept from the
    # call that brought them for every later token to attend to; None: no images, or the other architecture
    images: Any = None
    # static: nothing written yet, so the first call (prefill) attends over its own tokens alone, by
    # index, as a forward pass without a cache does (and with any attention kernel)
    fresh: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def create(cls, config: TextConfig, batch: int, max_columns: int, dtype=jnp.float32,
               length: int | None = None) -> "KVCache":
        """An empty cache for `max_columns` columns (prompt + new tokens), ring-buffered to the window;
        `length` (at least `max_columns`) instead: one that never wraps, however long the window."""
        if length is not None and length < max_columns:
            raise ValueError(f"A cache of {length} slots cannot hold {max_columns} columns without wrapping")
        length = cache_length(config, max_columns) if length is None else length
        shape = (batch, config.num_key_value_heads, length, config.attention_head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
        return cls(keys=zeros, values=zeros, positions=jnp.zeros((batch, length), jnp.int32),
                   valid=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32), fresh=True)

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    def slots(self, seq: int):
        """(first kept column of the `seq` new ones, their slots): only the last `length` columns fit."""
        start = max(0, seq - self.length)
        return start, (self.index + jnp.arange(start, seq, dtype=jnp.int32)) % self.length

    def layer(self, i: int, slot=None) -> "LayerCache":
        """Layer `i`'s view; `slot` (from `written`) makes it a decode step's, which writes first."""
        return LayerCache(self.keys[i], self.values[i], self.positions, self.valid, slot)

    def written(self, positions, valid) -> tuple["KVCache", Any]:
        """A decode step's bookkeeping, before its layers run: writes one new column's positions
        `[batch, 1]` and valid `[batch, 1]`; returns (this cache with them, the column's slot: int32
        `[]`), the keys and values still to be written by each layer (`LayerCache.write`)."""
        if positions.shape[1] != 1:
            raise ValueError(f"written() is for one new column, got {positions.shape[1]}")
        slot = self.index % self.length
        put = lambda cache, new: jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), slot, axis=1)
        cache = self.replace(positions=put(self.positions, positions), valid=put(self.valid, valid),
                             index=self.index + 1, fresh=False)
        return cache, slot

    def rewound(self, column) -> "KVCache":
        """This cache cut back to its first `column` columns (int32 `[]`): later slots stop being valid
        and the next call writes at `column`. Only for a cache that has not wrapped."""
        kept = jnp.arange(self.length, dtype=jnp.int32)[None, :] < column
        return self.replace(valid=self.valid & kept, index=jnp.asarray(column, jnp.int32))

    def resized(self, length: int) -> "KVCache":
        """This cache with `length` slots (static, at least its written columns): new slots are empty.
        Only for a cache that has not wrapped, whose slot `c` holds column `c`."""
        grow = length - self.length
        if grow < 0:
            raise ValueError(f"resized({length}) would drop slots of a {self.length}-slot cache")
        pad = lambda t, axis: jnp.pad(t, [(0, grow if a == axis else 0) for a in range(t.ndim)])
        return self.replace(keys=tuple(pad(k, 2) for k in self.keys), values=tuple(pad(v, 2) for v in self.values),
                            positions=pad(self.positions, 1), valid=pad(self.valid, 1))

    def update(self, new_keys, new_values, positions, valid) -> "KVCache":
        """Writes `seq` new columns: new_keys / new_values per layer `[batch, seq, kv_heads, head_dim]`,
        positions int `[batch, seq]`, valid bool `[batch, seq]`."""
        seq = positions.shape[1]
        start, slots = self.slots(seq)
        write = lambda cache, new: cache.at[:, slots].set(new[:, start:].astype(cache.dtype))
        heads_major = lambda new: einops.rearrange(new[:, start:], "b s h d -> b h s d")
        write_kv = lambda cache, new: cache.at[:, :, slots].set(heads_major(new).astype(cache.dtype))
        return self.replace(
            keys=tuple(write_kv(c, n) for c, n in zip(self.keys, new_keys)),
            values=tuple(write_kv(c, n) for c, n in zip(self.values, new_values)),
            positions=write(self.positions, positions.astype(jnp.int32)),
            valid=write(self.valid, valid.astype(bool)),
            index=self.index + seq,
            fresh=False,
        )


@flax.struct.dataclass
class LayerCache:
    """One decoder layer's part of a `KVCache`, as its attention sees it."""

    keys: Any  # [batch, kv_heads, length, head_dim]
    values: Any  # [batch, kv_heads, length, head_dim]
    positions: Any  # int32 [batch, length]
    valid: Any  # bool [batch, length]
    slot: Any = None  # int32 []: a decode step's column (positions / valid already written there)

    def write(self, keys, values) -> "LayerCache":
        """A decode step's new column `[batch, 1, kv_heads, head_dim]` twice, into its slot (in place)."""
        put = lambda cache, new: jax.lax.dynamic_update_slice_in_dim(
            cache, einops.rearrange(new, "b s h d -> b h s d").astype(cache.dtype), self.slot, axis=2)
        return self.replace(keys=put(self.keys, keys), values=put(self.values, values))


def cache_length(config: TextConfig, max_columns: int) -> int:
    window = config.sliding_window
    return max_columns if window is None else min(window, max_columns)
