"""The one attention entry point of the model.

Every attention in Idefics2 (SigLIP's bidirectional self-attention, the Perceiver's latents over
[context; latents], Mistral's causal sliding-window attention) calls `dot_product_attention`.
The mask is described, not materialised, by the caller: key padding, causality, a sliding window
and packed-segment ids. That lets kernels that never build an `[q, kv]` mask (Pallas flash
attention, cuDNN, splash) replace the reference below without touching the model.

Implementations (`implementation=`, the model's `attention_impl`):
  "xla"     the pure-jnp reference below; always available, the ground truth of every test.
  "chunked" the reference computed per chunk of 128-256 queries, each chunk against only the keys
            its causal / sliding-window mask can let it see (bounded by index, so not with explicit
            positions): the same numbers with about half the work at 512+ tokens, and each chunk's
            scores stay small. Any backend; "auto" takes it on CPU.
  "pallas"  idefics_jax's Pallas kernels (kernels/): flash attention, and Perceiver pooling for
            a single query tile; Triton on GPU, interpreted on CPU.
  "cudnn"   `jax.nn.dot_product_attention(implementation="cudnn")`: GPU, bfloat16 / float16.
  "splash"  jax's TPU splash attention (Pallas / Mosaic): TPU only.
  "auto"    the fastest of these for the call, as timed in benchmarks/RESULTS.md: on GPU xla for
            decode steps (fewer than 16 queries: a matrix-vector product), cuDNN for
            bidirectional attention in bfloat16 / float16 (the Perceiver; the vision tower too
            before Hopper), pallas for the rest (causal, windowed, packed: cuDNN needs them as a
            dense mask; on Hopper the vision tower too, where the Mosaic GPU kernels serve its
            head dim); splash on TPU; on CPU chunked for causal / windowed self-attention of 256+
            queries, xla otherwise.
An implementation that cannot serve a call (wrong backend, dtype, head dim, mask) falls back to
"xla" and logs why, once per reason; it never computes something else.
"""

from __future__ import annotations

import logging

import einops
import jax
import jax.numpy as jnp

from idefics_jax import kernels
from idefics_jax.kernels import splash
from idefics_jax.kernels.flash import default_blocks
from idefics_jax.kernels.masking import attention_mask

IMPLEMENTATIONS = ("auto", "xla", "chunked", "pallas", "cudnn", "splash")

DECODE_QUERIES = 16  # calls with fewer queries than this are decode steps (a KV cache, a matvec)
CHUNK = (128, 256)  # "chunked": query chunks of q_len // 2 clamped to this range (the fastest on XLA:CPU)

log = logging.getLogger(__name__)
_logged: set[str] = set()


def _fallback(implementation: str, reason: str) -> str:
    message = f"attention: '{implementation}' cannot serve this call ({reason}); using 'xla'"
    if message not in _logged:  # once per distinct reason: shapes are traced once per jit anyway
        _logged.add(message)
        log.warning(message)
    return "xla"


def _auto(backend: str, query, *, causal: bool, positions: bool, segments: bool, windowed: bool) -> str:
    if backend == "tpu":
        return "splash" if not positions else "xla"
    if backend != "gpu":  # CPU
        long_masked = (causal or windowed) and not positions and query.shape[1] >= 2 * CHUNK[0]
        return "chunked" if long_masked else "xla"
    if query.shape[1] < DECODE_QUERIES:  # a decode step: a matrix-vector product
        return "xla"
    # cuDNN for plain (bidirectional) half-precision calls, except the vision tower's on Hopper, where
    # the Pallas flash kernels (Mosaic GPU) are faster forward and backward (benchmarks/RESULTS.md).
    # The Perceiver's few latent queries (Pallas' pooling kernel) stay cuDNN's until timed on a GPU.
    plain = not (causal or positions or segments)
    half = query.dtype in (jnp.bfloat16, jnp.float16)
    return "cudnn" if plain and half and query.shape[-1] % 8 == 0 and not _hopper_flash(query) else "pallas"


def _hopper_flash(query) -> bool:
    """Whether a plain call would take the Mosaic GPU flash kernels (a Hopper GPU, their head dims;
    not the Perceiver's few latents, which take the pooling kernel)."""
    return query.shape[1] > kernels.MAX_LATENTS and default_blocks("gpu", query.shape[-1]).forward == "mgpu"


def select_implementation(implementation: str, query, key, *, causal: bool, positions: bool,
                          segments: bool, sliding_window: int | None = None, backend: str | None = None) -> str:
    """The implementation that will compute this call: the one asked for, or "xla" (logged)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"Unknown attention implementation '{implementation}'; available: {IMPLEMENTATIONS}")
    backend = backend or jax.default_backend()
    if implementation == "auto":
        implementation = _auto(backend, query, causal=causal, positions=positions, segments=segments,
                               windowed=sliding_window is not None)
    head_dim = query.shape[-1]
    if implementation == "pallas":
        if backend not in ("gpu", "cpu", "tpu"):
            return _fallback("pallas", f"its kernels lower through Triton (GPU) or Mosaic (TPU), or run interpreted "
                                       f"(CPU), not on '{backend}'")
        if head_dim > 256:
            return _fallback("pallas", f"head dim {head_dim} > 256")
        if backend == "tpu" and head_dim > 128 and head_dim % 128:
            return _fallback("pallas", f"head dim {head_dim}: the TPU kernels take up to 128 or multiples of 128")
    elif implementation == "cudnn":
        if backend != "gpu":
            return _fallback("cudnn", f"cuDNN needs a GPU, the backend is '{backend}'")
        if query.dtype not in (jnp.bfloat16, jnp.float16) or key.dtype != query.dtype:
            return _fallback("cudnn", f"cuDNN attention takes bfloat16 / float16, got {query.dtype}")
        if head_dim % 8 or head_dim > 128:
            return _fallback("cudnn", f"cuDNN attention needs a head dim that is a multiple of 8 up to 128, "
                                      f"got {head_dim}")
    elif implementation == "chunked":
        if not causal and sliding_window is None:
            return _fallback("chunked", "no causal or windowed mask: every chunk would see every key")
        if positions:
            return _fallback("chunked", "explicit positions (generation with a cache): chunks are bounded by index")
        if query.shape[1] > key.shape[1]:
            return _fallback("chunked", f"more queries ({query.shape[1]}) than keys ({key.shape[1]})")
    elif implementation == "splash":
        if backend != "tpu":
            return _fallback("splash", f"splash attention is TPU-only, the backend is '{backend}'")
        if positions:
            return _fallback("splash", "explicit positions (generation with a cache): splash masks by index")
        if (causal or sliding_window is not None) and query.shape[1] != key.shape[1]:
            return _fallback("splash", f"causal / windowed splash needs equal query / key lengths, got {query.shape[1]} "
                                       f"and {key.shape[1]}")
    return implementation


def dot_product_attention(
    query,  # [batch, q_len, heads, head_dim]
    key,  # [batch, kv_len, kv_heads, head_dim]
    value,  # [batch, kv_len, kv_heads, head_dim]
    *,
    scale: float | None = None,
    kv_mask=None,
    causal: bool = False,
    sliding_window: int | None = None,
    q_positions=None,
    kv_positions=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    implementation: str = "xla",
):
    """Multi-head attention with grouped-query heads; returns `[batch, q_len, heads, head_dim]`.

    `heads` must be a multiple of `kv_heads` (GQA: each group of `heads // kv_heads` query heads
    shares one key/value head). A query with no visible key returns zeros, never NaN.
    """
    with jax.named_scope("attention"):  # named in the program, for profiles read per op class
        return _attention(query, key, value, scale=scale, kv_mask=kv_mask, causal=causal,
                          sliding_window=sliding_window, q_positions=q_positions, kv_positions=kv_positions,
                          q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, implementation=implementation)


def _attention(query, key, value, *, scale, kv_mask, causal, sliding_window, q_positions, kv_positions,
               q_segment_ids, kv_segment_ids, implementation):
    batch, q_len, heads, head_dim = query.shape
    kv_len, kv_heads = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    scale = head_dim**-0.5 if scale is None else scale
    mask_kw = dict(kv_mask=kv_mask, causal=causal, sliding_window=sliding_window,
                   q_positions=q_positions, kv_positions=kv_positions,
                   q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    positions = q_positions is not None or kv_positions is not None
    segments = q_segment_ids is not None or kv_segment_ids is not None
    implementation = select_implementation(implementation, query, key, causal=causal, positions=positions,
                                           segments=segments, sliding_window=sliding_window)
    if implementation == "pallas":
        tpu = jax.default_backend() == "tpu"  # Mosaic kernels; Triton's on GPU, interpreted on CPU
        pooling = not (causal or sliding_window or positions or segments) and q_len <= kernels.MAX_LATENTS
        if pooling:  # one query tile over a long context: the Perceiver's shape
            pool = kernels.perceiver_pooling_tpu if tpu else kernels.perceiver_pooling
            return pool(query, key, value, kv_mask=kv_mask, scale=scale)
        flash = kernels.flash_attention_tpu if tpu else kernels.flash_attention
        return flash(query, key, value, scale=scale, **mask_kw)
    if implementation == "cudnn":
        return _cudnn_attention(query, key, value, scale, mask_kw)
    if implementation == "splash":
        return _splash_attention(query, key, value, scale, mask_kw)
    if implementation == "chunked":
        return _chunked_attention(query, key, value, scale, mask_kw)
    return _xla_attention(query, key, value, attention_mask(q_len, kv_len, **mask_kw), scale)


def _cudnn_attention(query, key, value, scale, mask_kw, implementation: str = "cudnn"):
    """cuDNN's fused attention. A plain causal / sliding-window mask over equal lengths is passed as
    such; padding keys alone as sequence lengths (cuDNN's fast path) whenever every row's keys are a
    prefix, decided at run time (the vision tower's padding is one when an image fills its slot's
    width); anything else (segments, positions, other padding, fewer queries than keys with a causal
    mask) as a boolean mask. Rows with no visible key are zeroed, as the reference does (cuDNN would
    average them). `implementation`: jax's, "xla" computes the same call on any backend (tests)."""
    q_len, kv_len = query.shape[1], key.shape[1]
    causal, window, kv_mask = mask_kw["causal"], mask_kw["sliding_window"], mask_kw["kv_mask"]
    plain = all(mask_kw[k] is None for k in ("q_positions", "kv_positions", "q_segment_ids"))
    # jax's is_causal aligns the first query with the first key; ours aligns the last with the last
    aligned = q_len == kv_len or not (causal or window is not None)
    local = None
    if window is not None:  # cuDNN's window looks back only: causal, or the call goes the dense way
        local = (window - 1, 0 if causal else window - 1)

    def call(mask=None, lengths=None, local=local):
        return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale, is_causal=causal and mask is None,
                                            key_value_seq_lengths=lengths, local_window_size=local,
                                            implementation=implementation)

    def dense():
        mask = attention_mask(q_len, kv_len, **mask_kw)
        out = call(mask, local=None)
        return jnp.where(jnp.any(mask, axis=-1)[:, 0, :, None, None], out, 0).astype(out.dtype)

    if plain and aligned and kv_mask is None:
        return call()
    if plain and aligned and (window is None or causal):
        lengths = jnp.sum(kv_mask, axis=-1, dtype=jnp.int32)  # [batch]
        prefix = jnp.all(kv_mask == (jnp.arange(kv_len) < lengths[:, None]))

        def by_lengths():
            out = call(lengths=lengths)
            first = jnp.arange(q_len) - (window - 1) if window is not None else jnp.zeros(q_len, jnp.int32)
            sees = jnp.maximum(first, 0)[None] < lengths[:, None]  # [batch, q_len]: a key left in its window
            return jnp.where(sees[:, :, None, None], out, 0).astype(out.dtype)

        return jax.lax.cond(prefix, by_lengths, dense)
    return dense()


def _chunked_attention(query, key, value, scale, mask_kw):
    """The reference over query chunks `[start, end)`, each against keys `[lo, hi)`: the last key a
    causal chunk can see is its last query's (queries align with the last keys, as in the reference),
    and a sliding window `w` hides every key more than `w - 1` before the chunk's first query. The
    keys cut off are exactly those the mask would hide, so the result is the reference's."""
    q_len, kv_len = query.shape[1], key.shape[1]
    offset, window = kv_len - q_len, mask_kw["sliding_window"]
    chunk = min(max(q_len // 2, CHUNK[0]), CHUNK[1])
    take = lambda x, s: None if x is None else x[:, s]
    outs = []
    for start in range(0, q_len, chunk):
        end = min(start + chunk, q_len)
        # not causal: windowed (the selector sends nothing else here), keys up to w - 1 after the last query
        hi = end + offset if mask_kw["causal"] else min(kv_len, end + offset + window - 1)
        lo = 0 if window is None else max(0, start + offset - window + 1)
        keys = slice(lo, hi)
        mask = attention_mask(
            end - start, hi - lo, kv_mask=take(mask_kw["kv_mask"], keys), causal=mask_kw["causal"],
            sliding_window=window, q_positions=jnp.arange(start + offset, end + offset, dtype=jnp.int32)[None],
            kv_positions=jnp.arange(lo, hi, dtype=jnp.int32)[None],
            q_segment_ids=take(mask_kw["q_segment_ids"], slice(start, end)),
            kv_segment_ids=take(mask_kw["kv_segment_ids"], keys))
        outs.append(_xla_attention(query[:, start:end], key[:, keys], value[:, keys], mask, scale))
    return jnp.concatenate(outs, axis=1)  # [batch, q_len, heads, head_dim]


def _splash_attention(query, key, value, scale, mask_kw):
    return splash.splash_attention(query, key, value, scale=scale, **mask_kw)


_MASKED = -1e30  # a masked score: finite, so that subtracting the row's maximum never gives NaN


@jax.custom_jvp
def softmax(scores):
    """Softmax over the last axis, differentiated as `p * (t - sum(p * t))` from the saved
    probabilities: one pass over `[q, kv]` per direction (autodiff through exp / sum makes several)."""
    return jax.nn.softmax(scores, axis=-1)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
    probs = softmax(primals[0])
    return probs, probs * (tangents[0] - jnp.sum(probs * tangents[0], axis=-1, keepdims=True))


def _xla_attention(query, key, value, mask, scale):
    """Reference: scores in float32, masked scores replaced by -1e30 (exactly zero weight after the
    softmax; a select, not an added bias, which XLA:CPU would broadcast over the heads and write
    out), weights cast back to the value dtype; a query with no visible key returns zeros.

    Scores are laid out `[batch, heads, q_len, kv_len]`, the inputs transposed to
    `[batch, heads, len, head_dim]` first: for GQA the key / value heads are repeated to the query
    heads (XLA:CPU runs 4-D batched matmuls and reductions several times faster than the grouped 5-D
    form, and faster still on operands already in that layout). Decode steps (few queries against a
    long cache) keep the grouped form, which reads each cached key / value head once.
    """
    batch, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    groups = heads // kv_heads
    if groups > 1 and q_len < DECODE_QUERIES:  # [batch, kv_heads, groups, q_len, kv_len]
        q = query.reshape(batch, q_len, kv_heads, groups, head_dim)
        scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, key, preferred_element_type=jnp.float32)
        weights = softmax(jnp.where(mask[:, :, None], scores * jnp.float32(scale), _MASKED)).astype(value.dtype)
        out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, value).reshape(batch, q_len, heads, head_dim)
    else:
        if groups > 1:
            key, value = jnp.repeat(key, groups, axis=2), jnp.repeat(value, groups, axis=2)
        q, k, v = (einops.rearrange(t, "b s h d -> b h s d") for t in (query, key, value))
        scores = jnp.matmul(q, jnp.swapaxes(k, -1, -2), preferred_element_type=jnp.float32)
        weights = softmax(jnp.where(mask, scores * jnp.float32(scale), _MASKED)).astype(value.dtype)
        out = einops.rearrange(jnp.matmul(weights, v), "b h q d -> b q h d")
    visible = jnp.any(mask, axis=-1)[:, 0, :, None, None]  # [batch or 1, q_len, 1, 1]
    return jnp.where(visible, out, 0).astype(out.dtype)
