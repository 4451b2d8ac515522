"""Dot-product attention for the U-Net: which implementation runs where, and a bounded-memory one.

``resolve_attention`` maps the ``model.attention`` setting to an implementation for this backend and
dtype; ``attention`` runs one call (cuDNN's fused kernel, XLA, or ``chunked_attention``, which bounds
the score tensor by computing blocks of queries and recomputing them in the backward pass).
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

ATTENTION_IMPLEMENTATIONS = {"auto": None, "cudnn": "cudnn", "xla": "xla", "chunked": "chunked"}
# 'auto' on a GPU or TPU (without cuDNN's fused attention): plain XLA attention while one call's score
# tensor [B, N, T, S] stays under this many elements (1 GiB in float32), chunked above it (XLA would
# materialise e.g. 17 GB of scores per layer for the 4096-token self-attention at batch 64 with 4 heads).
AUTO_CHUNK_ABOVE = 2 ** 28
# 'chunked' there: each block's scores hold at most this many elements (256 MiB in float32).
CHUNK_ELEMENTS = 2 ** 26
# On a CPU, 'auto' and 'chunked' use cache-sized blocks (4 MiB of scores) whenever a call's scores exceed
# one block. Measured on 2 cores, 4096-token self-attention, 4 heads of 8, batch 1: XLA forward 0.38 s and
# gradient 1.57 s; blocks of 2^20 elements 0.16 s and 0.80 s (2^18: 0.16 s, 0.75 s; 2^24: 0.30 s, 1.22 s).
CPU_CHUNK_ELEMENTS = 2 ** 20
# Fewest queries in a block (see `_blocks`). The gradient of the peer's --quick U-Net (32,64,128) at 64x64
# on 2 cores, batch 1: 2.8 s with 16, 32 or 64, 4.1 s with 128; batch 8 (one item per group): 21 s.
MIN_QUERY_BLOCK = 64


def resolve_attention(attention: str, dtype) -> str | None:
    """The attention implementation an `attention` setting means here.

    'auto' takes cuDNN's fused flash attention where it exists (a GPU backend, fp16/bf16
    compute), measured at 5x XLA's speed for tiny-sd's 4096-token self-attention on an H200;
    elsewhere (None) each call picks by size: XLA, or 'chunked' when its scores would exceed
    `CPU_CHUNK_ELEMENTS` (a CPU) or `AUTO_CHUNK_ABOVE` (a GPU in float32, a TPU) elements.
    """
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention={attention!r}: use one of {sorted(ATTENTION_IMPLEMENTATIONS)}")
    if attention == "auto" and jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if attention == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"attention='cudnn' needs a GPU (cuDNN); the backend here is {jax.default_backend()!r}: "
                         "use 'auto' (picks cuDNN on a GPU), 'xla' or 'chunked'")
    return ATTENTION_IMPLEMENTATIONS[attention]


def _divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of `n` that is <= `limit` (at least 1)."""
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def _blocks(q_shape, s: int, max_elements: int) -> tuple[int, int]:
    """(batch items, queries) per block of `chunked_attention`; (B, T) when every score fits one block.

    A block's scores [items, N, queries, S] hold at most `max_elements` where possible. The queries of a
    block are at least `MIN_QUERY_BLOCK` (every block adds its share of the key/value gradient, a tensor of
    the keys' size, so thousands of one-row blocks would cost more than they save); below that the batch is
    split instead, into groups of items that run one after the other.
    """
    b, t, n, _ = q_shape
    if b * n * t * s <= max_elements:
        return b, t
    queries = _divisor_at_most(t, max(1, max_elements // (b * n * s)))
    if queries < min(t, MIN_QUERY_BLOCK):
        queries = next(d for d in range(min(t, MIN_QUERY_BLOCK), t + 1) if t % d == 0)
    items = _divisor_at_most(b, max(1, max_elements // (n * queries * s)))
    return items, queries


_SIZED_AS: list[str] = []  # The backend `sized_as` names (innermost last); empty = the running one.


@contextlib.contextmanager
def sized_as(backend: str):
    """Inside the block, 'auto' and 'chunked' pick XLA or blocks of queries as they would on ``backend``
    ('gpu' or 'tpu': without cuDNN, as a program lowered on a CPU for an accelerator holds; 'cpu')."""
    if backend not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"sized_as({backend!r}): use 'cpu', 'gpu' or 'tpu'")
    _SIZED_AS.append(backend)
    try:
        yield
    finally:
        _SIZED_AS.pop()


def _sizing_backend() -> str:
    return _SIZED_AS[-1] if _SIZED_AS else jax.default_backend()


def _chunk_elements() -> int:
    return CPU_CHUNK_ELEMENTS if _sizing_backend() == "cpu" else CHUNK_ELEMENTS


def chunked_attention(q, k, v, *, max_elements: int | None = None):
    """`jax.nn.dot_product_attention` (XLA) over blocks of queries, recomputed in the backward pass.

    Each query row's softmax still runs over every key, so the result is the full attention's; only
    one block's scores [items, N, queries, S] exist at a time (forward and backward), at most
    `max_elements` of them where `_blocks` can (default: `CPU_CHUNK_ELEMENTS` on a CPU, else
    `CHUNK_ELEMENTS`). Everything in one block: plain XLA attention.

    Args:
      q: [B, T, N, H]; k, v: [B, S, N, H].
    Returns:
      [B, T, N, H].
    """
    return _attend_in_blocks(q, k, v, *_blocks(q.shape, k.shape[1], max_elements or _chunk_elements()))


def _attend_in_blocks(q, k, v, items: int, queries: int):
    """XLA attention in groups of `items` batch items, each `queries` queries at a time (see `_blocks`)."""
    b, t, n, h = q.shape
    if (items, queries) == (b, t):
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")

    def group(args):  # One group of batch items, its queries block by block.
        qg, kg, vg = args  # [items, T, N, H], [items, S, N, H] x 2
        attend = jax.checkpoint(lambda qb: jax.nn.dot_product_attention(qb, kg, vg, implementation="xla"))
        blocks = qg.reshape(items, t // queries, queries, n, h).swapaxes(0, 1)  # [T/queries, items, queries, N, H]
        return jax.lax.map(attend, blocks).swapaxes(0, 1).reshape(items, t, n, h)

    def split(x):  # [B, ...] -> [B/items, items, ...]
        return x.reshape((b // items, items) + x.shape[1:])

    if items == b:
        return group((q, k, v))
    return jax.lax.map(group, (split(q), split(k), split(v))).reshape(b, t, n, h)


def choose(q_shape, s: int, implementation: str | None) -> tuple[str, tuple[int, int] | None]:
    """What one call runs: ``(implementation, blocks)`` for queries ``q_shape`` [B, T, N, H] and ``s`` keys.

    ``implementation`` as `resolve_attention` returns it (None: pick by size); ``blocks`` are the
    (items, queries) of 'chunked' (see `_blocks`), None otherwise.
    """
    b, t, n, _ = q_shape
    if implementation is None:
        above = CPU_CHUNK_ELEMENTS if _sizing_backend() == "cpu" else AUTO_CHUNK_ABOVE
        implementation = "chunked" if b * n * t * s > above else "xla"
    if implementation != "chunked":
        return implementation, None
    blocks = _blocks(q_shape, s, _chunk_elements())
    if blocks == (b, t):
        return "xla", None  # One block holds every query: what runs is plain XLA attention.
    return "chunked", blocks


def attention(q, k, v, implementation: str | None):
    """Dot-product attention by `implementation` (see `resolve_attention`); q [B, T, N, H], k, v [B, S, N, H]."""
    implementation, blocks = choose(q.shape, k.shape[1], implementation)
    if implementation == "chunked":
        return _attend_in_blocks(q, k, v, *blocks)
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
