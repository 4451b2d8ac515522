"""Class-conditional U-Net (Stable-Diffusion-1.x family, e.g. segmind/tiny-sd) in Flax, NHWC.

The parameter tree is identical (names, nesting, shapes) to diffusers' `FlaxUNet2DConditionModel`, so
checkpoints convert with diffusers' own PyTorch->Flax renaming. The numerics follow the PyTorch
`UNet2DConditionModel` (the implementation the checkpoints were trained with), which differs from
diffusers' Flax port in three places: GroupNorm groups come from `norm_num_groups` (Flax hard-codes 32),
the spatial transformer's GroupNorm uses epsilon 1e-6 (Flax: 1e-5), and the GEGLU feed-forward uses the
exact GELU (Flax: the tanh approximation).

The model returns `(eps, features)`: `features` holds the down-path activations the alignment loss can
pick from (`down_{i}`, `down_{i}_shortcut`, `mid`); see `UNet`.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from fadjax.models import weights

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = (None, "UNetMidBlock2DCrossAttn")
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


def _chunk_elements() -> int:
    return CPU_CHUNK_ELEMENTS if jax.default_backend() == "cpu" else CHUNK_ELEMENTS


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


_RECORDERS: list[collections.Counter] = []


@contextlib.contextmanager
def record_attention():
    """Counts the implementation every attention call picks while tracing inside the block.

    Yields a `collections.Counter` ({'xla': 6, 'chunked': 6}, ...). Only tracing counts: a function
    jit has already traced and cached is not traced again.
    """
    counts: collections.Counter = collections.Counter()
    _RECORDERS.append(counts)
    try:
        yield counts
    finally:
        _RECORDERS.remove(counts)


def attention(q, k, v, implementation: str | None):
    """Dot-product attention by `implementation` (see `resolve_attention`); q [B, T, N, H], k, v [B, S, N, H]."""
    b, t, n, _ = q.shape
    if implementation is None:
        above = CPU_CHUNK_ELEMENTS if jax.default_backend() == "cpu" else AUTO_CHUNK_ABOVE
        implementation = "chunked" if b * n * t * k.shape[1] > above else "xla"
    blocks = _blocks(q.shape, k.shape[1], _chunk_elements()) if implementation == "chunked" else None
    if blocks == (b, t):
        implementation = "xla"  # One block holds every query: what runs is plain XLA attention.
    for counts in _RECORDERS:
        counts[implementation] += 1
    if implementation == "chunked":
        return _attend_in_blocks(q, k, v, *blocks)
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)

# diffusers config.json keys that never change the math, whatever their value. `upcast_attention` only
# matters in half precision, and `jax.nn.dot_product_attention` always takes its softmax in float32.
_IGNORED_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "dtype",
    "use_memory_efficient_attention", "split_head_dim", "upcast_attention",
    "addition_embed_type_num_heads",
})
# diffusers config.json keys accepted only at the value that gives the SD-1.x math implemented here.
_FIXED_KEYS = {
    "act_fn": "silu", "center_input_sample": False, "only_cross_attention": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-5, "dual_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "projection_class_embeddings_input_dim": None,
    "class_embeddings_concat": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The math-relevant keys of a diffusers U-Net `config.json` (defaults are diffusers' defaults).

    `attention_head_dim` is, as in every SD-1.x config and as diffusers reads it, the NUMBER of attention
    heads per block (int or one per down block); `num_attention_heads`, when set, takes its place.
    """
    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    cross_attention_dim: int = 1280
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    dropout: float = 0.0
    transformer_layers_per_block: int = 1

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"down_block_types {self.down_block_types}, up_block_types {self.up_block_types} and "
                             f"block_out_channels {self.block_out_channels} must have the same length")
        for key, value, allowed in (("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
                                    ("up_block_types", self.up_block_types, UP_BLOCK_TYPES)):
            bad = [v for v in value if v not in allowed]
            if bad:
                raise ValueError(f"unsupported {key} {bad}: supported are {allowed}")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"unsupported mid_block_type {self.mid_block_type!r}: supported are {MID_BLOCK_TYPES}")
        for key in ("layers_per_block", "transformer_layers_per_block", "cross_attention_dim", "norm_num_groups"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"unsupported {key} {value!r}: must be a positive int")
        heads = self.num_heads
        if len(heads) != n:
            raise ValueError(f"attention heads {heads} must be one int or one per down block ({n})")
        for i, channels in enumerate(self.block_out_channels):
            if channels % self.norm_num_groups:
                raise ValueError(f"block_out_channels[{i}]={channels} is not divisible by "
                                 f"norm_num_groups={self.norm_num_groups}")
            if channels % heads[i]:
                raise ValueError(f"block_out_channels[{i}]={channels} is not divisible by {heads[i]} heads")

    @property
    def num_heads(self) -> tuple[int, ...]:
        """Attention heads of each down block (up blocks use them reversed, the mid block the last)."""
        heads = self.num_attention_heads or self.attention_head_dim
        return (heads,) * len(self.block_out_channels) if isinstance(heads, int) else tuple(heads)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        """Builds a config from a diffusers `config.json` dict.

        Keys that do not change the math are ignored; a key this implementation does not know, or a value
        of a known key that would change the math (another block type, class/addition embeddings, ...),
        raises ValueError naming it.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key in fields:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            elif key in _FIXED_KEYS:
                fixed = _FIXED_KEYS[key]
                values = value if isinstance(value, (list, tuple)) else [value]
                if not all(v == fixed for v in values):
                    raise ValueError(f"unsupported U-Net config: {key}={value!r} (only {fixed!r} is implemented)")
            elif key not in _IGNORED_KEYS:
                raise ValueError(f"unsupported U-Net config key {key!r} (value {value!r})")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (tuples as lists), readable by `from_dict`."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def tiny_sd_config(**overrides) -> UNetConfig:
    """segmind/tiny-sd's U-Net (BK-SDM-Tiny, 323.4M parameters at 4 channels), with field overrides."""
    base = UNetConfig(
        sample_size=64, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        mid_block_type=None, block_out_channels=(320, 640, 1280), layers_per_block=1,
        attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32)
    return dataclasses.replace(base, **overrides)


def timestep_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [B] -> [B, dim] in float32 (diffusers `get_timestep_embedding`)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
    sin, cos = jnp.sin(args), jnp.cos(args)
    return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)  # [B, dim]


def _conv(features: int, kernel: int, dtype, name: str, stride: int = 1) -> nn.Conv:
    padding = "VALID" if kernel == 1 else ((1, 1), (1, 1))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
                   param_dtype=jnp.float32, name=name)


def _group_norm(groups: int, dtype, name: str, epsilon: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, name=name)


def _dense(features: int, dtype, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


class ResnetBlock(nn.Module):
    """norm-silu-conv, + time projection, norm-silu-dropout-conv, + (1x1-projected) input."""
    out_channels: int
    groups: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb, deterministic: bool = True):
        # x [B, H, W, Cin], temb [B, T] -> ([B, H, W, Cout], shortcut [B, H, W, Cout] or None)
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(nn.silu(_group_norm(self.groups, self.dtype, "norm1")(x)))
        h = h + _dense(self.out_channels, self.dtype, "time_emb_proj")(nn.silu(temb))[:, None, None, :]
        h = nn.silu(_group_norm(self.groups, self.dtype, "norm2")(h))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
        shortcut = None
        if x.shape[-1] != self.out_channels:
            x = shortcut = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return h + x, shortcut


class Attention(nn.Module):
    """Multi-head attention (self when `context` is None) through `jax.nn.dot_product_attention`."""
    heads: int
    implementation: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        # x [B, T, C], context [B, S, D] -> [B, T, C]
        b, t, c = x.shape
        context = x if context is None else context
        head_dim = c // self.heads
        q = _dense(c, self.dtype, "to_q", use_bias=False)(x).reshape(b, t, self.heads, head_dim)  # [B, T, N, H]
        k = _dense(c, self.dtype, "to_k", use_bias=False)(context).reshape(b, -1, self.heads, head_dim)  # [B, S, N, H]
        v = _dense(c, self.dtype, "to_v", use_bias=False)(context).reshape(b, -1, self.heads, head_dim)  # [B, S, N, H]
        out = attention(q, k, v, self.implementation)  # [B, T, N, H]
        return _dense(c, self.dtype, "to_out_0")(out.reshape(b, t, c))


class GEGLU(nn.Module):
    """Dense to 2 x hidden, value * GELU(gate) (exact GELU, as PyTorch diffusers)."""
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        value, gate = jnp.split(_dense(2 * self.hidden, self.dtype, "proj")(x), 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        # x [B, T, C] -> [B, T, C], hidden width 4C
        c = x.shape[-1]
        return _dense(c, self.dtype, "net_2")(GEGLU(4 * c, self.dtype, name="net_0")(x))


class BasicTransformerBlock(nn.Module):
    """LayerNorm + self-attention, LayerNorm + cross-attention, LayerNorm + GEGLU feed-forward."""
    heads: int
    implementation: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        def norm(name):
            return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        # cuDNN's fused attention only pays (and, in its backward pass, only works) for long key sequences:
        # with 'cudnn' the cross-attention over the few context tokens uses XLA.
        cross = "xla" if self.implementation == "cudnn" else self.implementation
        x = x + Attention(self.heads, self.implementation, self.dtype, name="attn1")(norm("norm1")(x))
        x = x + Attention(self.heads, cross, self.dtype, name="attn2")(norm("norm2")(x), context)
        return x + FeedForward(self.dtype, name="ff")(norm("norm3")(x))


class Transformer2D(nn.Module):
    """GroupNorm, proj_in (1x1 conv or dense), transformer blocks over H*W tokens, proj_out, + input."""
    heads: int
    groups: int
    depth: int = 1
    use_linear_projection: bool = False
    implementation: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        # x [B, H, W, C], context [B, S, D] -> [B, H, W, C]
        b, h, w, c = x.shape
        proj = _dense if self.use_linear_projection else (lambda f, dt, name: _conv(f, 1, dt, name))
        y = _group_norm(self.groups, self.dtype, "norm", epsilon=1e-6)(x)
        y = proj(c, self.dtype, "proj_in")(y).reshape(b, h * w, c)  # [B, HW, C]
        for i in range(self.depth):
            y = BasicTransformerBlock(self.heads, self.implementation, self.dtype, name=f"transformer_blocks_{i}")(
                y, context)
        y = proj(c, self.dtype, "proj_out")(y.reshape(b, h, w, c))  # [B, H, W, C]
        return y + x


class _Resample(nn.Module):
    """3x3 conv after nearest 2x upsampling (`up`) or with stride 2 (down)."""
    channels: int
    up: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.up:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
        return _conv(self.channels, 3, self.dtype, "conv", stride=1 if self.up else 2)(x)


class _BlockSettings(nn.Module):
    """Fields shared by the down, mid and up blocks."""
    out_channels: int
    num_layers: int
    heads: int
    cross_attention: bool
    resample: bool
    groups: int
    depth: int = 1
    use_linear_projection: bool = False
    dropout: float = 0.0
    implementation: str | None = None
    dtype: Any = jnp.float32

    def resnet(self, i: int) -> ResnetBlock:
        return ResnetBlock(self.out_channels, self.groups, self.dropout, self.dtype, name=f"resnets_{i}")

    def attention(self, i: int) -> Transformer2D:
        return Transformer2D(self.heads, self.groups, self.depth, self.use_linear_projection, self.implementation,
                             self.dtype, name=f"attentions_{i}")


class DownBlock(_BlockSettings):
    """(CrossAttn)DownBlock2D: resnet (+ transformer) layers, then a stride-2 conv unless last."""

    @nn.compact
    def __call__(self, x, temb, context, deterministic: bool = True):
        # x [B, H, W, Cin] -> (h [B, H', W', C], skips, shortcut of the first resnet or None)
        skips, first_shortcut = [], None
        for i in range(self.num_layers):
            x, shortcut = self.resnet(i)(x, temb, deterministic)
            if i == 0:
                first_shortcut = shortcut
            if self.cross_attention:
                x = self.attention(i)(x, context)
            skips.append(x)
        if self.resample:
            x = _Resample(self.out_channels, up=False, dtype=self.dtype, name="downsamplers_0")(x)  # [B, H/2, W/2, C]
            skips.append(x)
        return x, skips, first_shortcut


class UpBlock(_BlockSettings):
    """(CrossAttn)UpBlock2D: layer i concatenates skip -1-i on channels; then upsamples unless last."""

    @nn.compact
    def __call__(self, x, skips, temb, context, deterministic: bool = True):
        # x [B, H, W, Cprev], `num_layers` skips [B, H, W, Cskip] (latest last) -> [B, 2H, 2W, C]
        for i, skip in enumerate(reversed(skips)):
            x = jnp.concatenate([x, skip], axis=-1)  # [B, H, W, Cprev + Cskip]
            x, _ = self.resnet(i)(x, temb, deterministic)
            if self.cross_attention:
                x = self.attention(i)(x, context)
        if self.resample:
            x = _Resample(self.out_channels, up=True, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class MidBlock(_BlockSettings):
    """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) x num_layers."""

    @nn.compact
    def __call__(self, x, temb, context, deterministic: bool = True):
        x, _ = self.resnet(0)(x, temb, deterministic)
        for i in range(self.num_layers):
            x = self.attention(i)(x, context)
            x, _ = self.resnet(i + 1)(x, temb, deterministic)
        return x


class TimestepEmbedding(nn.Module):
    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _dense(self.dim, self.dtype, "linear_2")(nn.silu(_dense(self.dim, self.dtype, "linear_1")(x)))


class UNet(nn.Module):
    """Conditional U-Net; parameter tree == diffusers `FlaxUNet2DConditionModel`.

    Attributes:
      config: the architecture.
      dtype: compute dtype (params stay float32).
      attention: 'auto' ('cudnn' on a GPU in fp16/bf16, else XLA or, for calls whose scores would pass
        `CPU_CHUNK_ELEMENTS` on a CPU or `AUTO_CHUNK_ABOVE` elsewhere, 'chunked'), 'cudnn' (cuDNN flash attention for self-attention; GPU,
        fp16/bf16 only; cross-attention then uses XLA, since cuDNN rejects the gradient of a 1-token key
        sequence), 'xla' (scores materialised) or 'chunked' (`chunked_attention`: bounded memory, any backend).
    """
    config: UNetConfig
    dtype: Any = jnp.float32
    attention: str = "auto"

    def setup(self):
        cfg = self.config
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r}: use one of {sorted(ATTENTION_IMPLEMENTATIONS)}")
        channels, heads, n = cfg.block_out_channels, cfg.num_heads, len(cfg.block_out_channels)
        shared = dict(groups=cfg.norm_num_groups, depth=cfg.transformer_layers_per_block,
                      use_linear_projection=cfg.use_linear_projection, dropout=cfg.dropout,
                      implementation=resolve_attention(self.attention, self.dtype), dtype=self.dtype)
        self.conv_in = _conv(channels[0], 3, self.dtype, "conv_in")
        self.time_embedding = TimestepEmbedding(4 * channels[0], self.dtype)
        self.down_blocks = [
            DownBlock(channels[i], cfg.layers_per_block, heads[i], kind == "CrossAttnDownBlock2D",
                      resample=i < n - 1, **shared)
            for i, kind in enumerate(cfg.down_block_types)]
        self.mid_block = (None if cfg.mid_block_type is None
                          else MidBlock(channels[-1], 1, heads[-1], True, False, **shared))
        self.up_blocks = [
            UpBlock(channels[n - 1 - i], cfg.layers_per_block + 1, heads[n - 1 - i], kind == "CrossAttnUpBlock2D",
                    resample=i < n - 1, **shared)
            for i, kind in enumerate(cfg.up_block_types)]
        self.conv_norm_out = _group_norm(cfg.norm_num_groups, self.dtype, "conv_norm_out")
        self.conv_out = _conv(cfg.out_channels, 3, self.dtype, "conv_out")

    def __call__(self, x, t, context, *, train: bool = False):
        """Predicts the noise and returns the down-path features.

        Args:
          x: noisy images [B, H, W, in_channels] float32; H, W divisible by 2**(num down blocks - 1).
          t: timesteps [B] int32 (or a scalar, used for the whole batch).
          context: cross-attention context [B, S, cross_attention_dim].
          train: enables dropout (needs a 'dropout' rng when config.dropout > 0).

        Returns:
          (eps [B, H, W, out_channels] float32, features): `down_{i}` (output of down block i, after its
          downsampler), `down_{i}_shortcut` (down block i's first resnet's 1x1 conv_shortcut, where it has
          one), `mid` (with a mid block), `up_{i}` (output of up block i, after its upsampler); all float32.
        """
        cfg = self.config
        b, h, w, c = x.shape
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if h % factor or w % factor:
            raise ValueError(f"image size {h}x{w} is not divisible by {factor} (2 ** (down blocks - 1))")
        if c != cfg.in_channels:
            raise ValueError(f"input has {c} channels, the U-Net expects in_channels={cfg.in_channels}")
        t = jnp.broadcast_to(jnp.asarray(t), (b,))  # [B]
        temb = self.time_embedding(timestep_embedding(
            t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift))  # [B, 4C0]
        deterministic = not train
        features = {}

        x = self.conv_in(x)  # [B, H, W, C0]
        skips = [x]
        for i, block in enumerate(self.down_blocks):
            x, block_skips, shortcut = block(x, temb, context, deterministic)  # [B, H/2^i', W/2^i', Ci]
            skips += block_skips
            features[f"down_{i}"] = x
            if shortcut is not None:
                features[f"down_{i}_shortcut"] = shortcut
        if self.mid_block is not None:
            x = features["mid"] = self.mid_block(x, temb, context, deterministic)
        for i, block in enumerate(self.up_blocks):
            x = features[f"up_{i}"] = block(x, tuple(skips[-block.num_layers:]), temb, context, deterministic)
            del skips[-block.num_layers:]
        x = self.conv_out(nn.silu(self.conv_norm_out(x)))  # [B, H, W, out_channels]

        eps = x.astype(jnp.float32)
        assert eps.shape == (b, h, w, cfg.out_channels), eps.shape
        return eps, {k: v.astype(jnp.float32) for k, v in features.items()}


def _dummy_inputs(config: UNetConfig, image_size: int, batch: int):
    x = jnp.zeros((batch, image_size, image_size, config.in_channels), jnp.float32)
    return x, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch, 1, config.cross_attention_dim), jnp.float32)


def init_params(module: UNet, rng: jax.Array, *, image_size: int, batch: int = 1) -> dict:
    """Randomly initialised float32 parameters for `module` (flax default initialisers)."""
    return jax.jit(module.init)(rng, *_dummy_inputs(module.config, image_size, batch))["params"]


def param_shapes(module: UNet, *, image_size: int | None = None) -> dict:
    """The parameter tree as `jax.ShapeDtypeStruct`s (nothing is allocated)."""
    size = image_size or 2 ** (len(module.config.block_out_channels) - 1)
    return jax.eval_shape(module.init, jax.random.key(0), *_dummy_inputs(module.config, size, 1))["params"]


# ---------------------------------------------------------------------------------------------------------
# Loading diffusers checkpoints.

class _NumpyTensor:
    """The one thing diffusers' converter needs from a PyTorch tensor: `.numpy()`."""

    def __init__(self, array: np.ndarray):
        self._array = array

    def numpy(self) -> np.ndarray:
        return self._array


class _ShapeOnlyModel:
    """Stands in for diffusers' Flax U-Net in its converter, which only reads the shapes of `init_weights`.

    The shapes come from `UNet`, whose tree equals `FlaxUNet2DConditionModel`'s; diffusers' Flax model
    itself cannot even be traced for configs whose channels are not multiples of 32 (it hard-codes 32
    GroupNorm groups).
    """

    def __init__(self, shapes: dict):
        self._shapes = shapes

    def init_weights(self, rng):
        del rng
        return self._shapes


def _resolve_folder(path) -> pathlib.Path:
    """The U-Net folder of a checkpoint folder: itself, or a pipeline folder's `unet/`."""
    folder = pathlib.Path(path)
    if not (folder / "config.json").is_file() and (folder / "unet").is_dir():
        folder = folder / "unet"  # a pipeline folder
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"missing {folder / 'config.json'} (a diffusers U-Net folder needs config.json and "
                                f"{weights.DIFFUSERS.safetensors}; a pipeline folder holds them in unet/)")
    return folder


def _convert(state: dict[str, np.ndarray], shapes: dict) -> dict:
    """Renames/transposes a PyTorch state dict into the Flax tree (`shapes`) with diffusers' own converter."""
    from diffusers.models.modeling_flax_pytorch_utils import \
        convert_pytorch_state_dict_to_flax  # pylint: disable=import-outside-toplevel
    return convert_pytorch_state_dict_to_flax({k: _NumpyTensor(v) for k, v in state.items()}, _ShapeOnlyModel(shapes))


def _check_tree(params: dict, expected: dict, source) -> None:
    got = {k: v.shape for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    want = {k: v.shape for k, v in traverse_util.flatten_dict(expected, sep="/").items()}
    missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    wrong = sorted(f"{k}: {got[k]} != {want[k]}" for k in want.keys() & got.keys() if got[k] != want[k])
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint {source} does not match the U-Net built from its config.json: "
                         f"missing {missing[:20]} ({len(missing)}), unexpected {unexpected[:20]} ({len(unexpected)}), "
                         f"wrong shapes {wrong[:20]} ({len(wrong)})")


def from_pretrained(path, *, in_channels: int | None = None, out_channels: int | None = None, dtype=jnp.float32,
                    allow_pickle: bool = False, rng: jax.Array | None = None,
                    attention: str = "auto") -> tuple[UNet, dict]:
    """Loads a diffusers U-Net checkpoint (PyTorch weights) as `(UNet, float32 params)`.

    Args:
      path: a local diffusers U-Net folder (config.json + diffusion_pytorch_model.safetensors), a pipeline
        folder with a `unet/` subfolder, or, when no such local path exists, a Hugging Face Hub id "org/name"
        (only the U-Net files are downloaded).
      in_channels, out_channels: when given and different from the checkpoint's, conv_in / conv_out are
        replaced by freshly initialised convs (e.g. 1 for grayscale images); the rest is the checkpoint's.
      dtype: compute dtype of the returned module.
      allow_pickle: allow reading a pickled `diffusion_pytorch_model.bin` (with torch, weights_only=True)
        when there is no safetensors file. Unpickling can run arbitrary code.
      rng: key for the replaced convs (default: key 0).
      attention: attention implementation of the module, see `UNet`.

    Returns:
      (module, params).
    """
    names = ["config.json"] + weights.DIFFUSERS.patterns + ([weights.DIFFUSERS.pickle] if allow_pickle else [])
    folder = _resolve_folder(weights.resolve_checkpoint_dir(path, allow_patterns=names + [f"unet/{n}" for n in names]))
    ckpt_config = UNetConfig.from_dict(json.loads((folder / "config.json").read_text()))
    expected = param_shapes(UNet(ckpt_config))
    files = weights.find_weights(folder, allow_pickle=allow_pickle, names=weights.DIFFUSERS)
    params = _convert(weights.read_weights(files), expected)
    _check_tree(params, expected, folder)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)

    config = dataclasses.replace(
        ckpt_config,
        in_channels=ckpt_config.in_channels if in_channels is None else in_channels,
        out_channels=ckpt_config.out_channels if out_channels is None else out_channels)
    module = UNet(config, dtype=dtype, attention=attention)
    replaced = [name for name, old, new in (("conv_in", ckpt_config.in_channels, config.in_channels),
                                            ("conv_out", ckpt_config.out_channels, config.out_channels)) if old != new]
    if replaced:
        def init_io(m, x, h):
            return m.conv_in(x), m.conv_out(h)
        x = jnp.zeros((1, 8, 8, config.in_channels), jnp.float32)
        h = jnp.zeros((1, 8, 8, config.block_out_channels[0]), jnp.float32)
        rng = jax.random.key(0) if rng is None else rng
        fresh = module.init(rng, x, h, method=init_io)["params"]
        params = {**params, **{name: fresh[name] for name in replaced}}
        logging.info("U-Net %s: replaced %s with freshly initialised convs (channels in %d -> %d, out %d -> %d); "
                     "all other weights come from the checkpoint", folder, " and ".join(replaced),
                     ckpt_config.in_channels, config.in_channels, ckpt_config.out_channels, config.out_channels)
    return module, params
