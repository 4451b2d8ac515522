"""Class-conditional U-Net (Stable-Diffusion-1.x family, e.g. segmind/tiny-sd) in Flax, NHWC.

The parameter tree is identical (names, nesting, shapes) to diffusers' `FlaxUNet2DConditionModel`, so
checkpoints convert with diffusers' own PyTorch->Flax renaming. The numerics follow the PyTorch
`UNet2DConditionModel` (the implementation the checkpoints were trained with), which differs from
diffusers' Flax port in three places: GroupNorm groups come from `norm_num_groups` (Flax hard-codes 32),
the spatial transformer's GroupNorm uses epsilon 1e-6 (Flax: 1e-5), and the GEGLU feed-forward uses the
exact GELU (Flax: the tanh approximation).

The model returns `(eps, features)`: `features` holds the activations the alignment loss can pick from
(`down_{i}`, `down_{i}_shortcut`, `mid`, `up_{i}`); see `UNet`. The architecture is a `UNetConfig`
(`unet_config.py`), attention runs through `attention.py`, and diffusers checkpoints load through
`unet_convert.py`.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fadjax.models import attention as attention_lib
from fadjax.models.group_norm import GroupNorm
from fadjax.models.unet_config import UNetConfig


def timestep_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [B] -> [B, dim] in float32 (diffusers `get_timestep_embedding`)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
    sin, cos = jnp.sin(args), jnp.cos(args)
    return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)  # [B, dim]


def _conv_params(module: nn.Module, size: int, cin: int, cout: int):
    """nn.Conv's parameters (its names, shapes and initialisers), cast to the module's dtype."""
    kernel = module.param("kernel", nn.linear.default_kernel_init, (size, size, cin, cout), jnp.float32)
    bias = module.param("bias", nn.initializers.zeros_init(), (cout,), jnp.float32)
    return kernel.astype(module.dtype), bias.astype(module.dtype)


class _Conv1x1(nn.Module):
    """nn.Conv's 1x1 parameters (``kernel`` [1, 1, Cin, Cout], ``bias``) applied as a matrix product over
    channels: the same values, 2-3x faster forward+backward than XLA's CPU convolution (2 cores)."""
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel, bias = _conv_params(self, 1, x.shape[-1], self.features)
        return jnp.einsum("bhwc,cd->bhwd", x.astype(self.dtype), kernel[0, 0]) + bias


def _conv(features: int, kernel: int, dtype, name: str, stride: int = 1) -> nn.Module:
    if kernel == 1 and stride == 1:
        return _Conv1x1(features, dtype, name=name)
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((1, 1), (1, 1)), dtype=dtype,
                   param_dtype=jnp.float32, name=name)


def _group_norm(groups: int, dtype, name: str, epsilon: float = 1e-5, silu: bool = False) -> GroupNorm:
    """flax's GroupNorm (its parameters, its values), then SiLU when ``silu``, with a faster gradient."""
    return GroupNorm(num_groups=groups, epsilon=epsilon, silu=silu, dtype=dtype, name=name)


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
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(_group_norm(self.groups, self.dtype, "norm1", silu=True)(x))
        h = h + _dense(self.out_channels, self.dtype, "time_emb_proj")(nn.silu(temb))[:, None, None, :]
        h = _group_norm(self.groups, self.dtype, "norm2", silu=True)(h)
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
        out = attention_lib.attention(q, k, v, self.implementation)  # [B, T, N, H]
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


def upsample_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``conv3x3(nearest_upsample_2x(x), kernel)`` (padding 1, no bias) in 16/36 of its multiply-adds.

    After a nearest 2x upsampling each output pixel of the 3x3 conv sees only a 2x2 window of ``x``:
    output row ``2i`` reads rows ``i-1`` (tap 0) and ``i`` (taps 1+2), row ``2i+1`` reads rows ``i`` (taps
    0+1) and ``i+1`` (tap 2), and likewise for columns. So one 2x2 conv of the padded ``x`` with the four
    phases' summed kernels as 4 x Cout outputs, then interleaving the phases, gives the same result
    without ever building the 4x larger upsampled image (the sub-pixel convolution).

    Args:
      x: ``[B, H, W, Cin]``.
      kernel: ``[3, 3, Cin, Cout]`` (HWIO, flax's layout), the parameter of the conv after upsampling.

    Returns:
      ``[B, 2H, 2W, Cout]``.
    """
    def fold(k, axis):  # The two phases' 2-tap kernels along `axis`: (tap 0, taps 1+2), (taps 0+1, tap 2).
        t0, t1, t2 = (jnp.take(k, i, axis=axis) for i in range(3))
        return jnp.stack([t0, t1 + t2], axis=axis), jnp.stack([t0 + t1, t2], axis=axis)

    b, h, w, _ = x.shape
    cout = kernel.shape[-1]
    phases = [p for rows in fold(kernel, 0) for p in fold(rows, 1)]
    k2 = jnp.concatenate(phases, axis=-1)  # [2, 2, Cin, 4 Cout], phases (row, col) = 00, 01, 10, 11
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = jax.lax.conv_general_dilated(xp, k2, (1, 1), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))  # [B, H+1, W+1, 4 Cout]
    y = jnp.stack([jnp.stack([out[:, a:a + h, c:c + w, (2 * a + c) * cout:(2 * a + c + 1) * cout]
                              for c in (0, 1)], axis=3) for a in (0, 1)], axis=2)  # [B, H, 2, W, 2, Cout]
    return y.reshape(b, 2 * h, 2 * w, cout)


class _UpsampleConv(nn.Module):
    """nn.Conv's parameters (3x3 ``kernel``, ``bias``) applied after a nearest 2x upsampling, by :func:`upsample_conv`."""
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel, bias = _conv_params(self, 3, x.shape[-1], self.features)
        return upsample_conv(x.astype(self.dtype), kernel) + bias


class _Resample(nn.Module):
    """3x3 conv after nearest 2x upsampling (`up`) or with stride 2 (down)."""
    channels: int
    up: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.up:
            return _UpsampleConv(self.channels, self.dtype, name="conv")(x)  # [B, 2H, 2W, C]
        return _conv(self.channels, 3, self.dtype, "conv", stride=2)(x)


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
        if self.attention not in attention_lib.ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r}: use one of {sorted(attention_lib.ATTENTION_IMPLEMENTATIONS)}")
        channels, heads, n = cfg.block_out_channels, cfg.num_heads, len(cfg.block_out_channels)
        shared = dict(groups=cfg.norm_num_groups, depth=cfg.transformer_layers_per_block,
                      use_linear_projection=cfg.use_linear_projection, dropout=cfg.dropout,
                      implementation=attention_lib.resolve_attention(self.attention, self.dtype), dtype=self.dtype)
        self.conv_in = _conv(channels[0], 3, self.dtype, "conv_in")
        self.time_embedding = TimestepEmbedding(4 * channels[0], self.dtype)
        if cfg.class_embed_type == "projection":
            self.class_embedding = TimestepEmbedding(4 * channels[0], self.dtype)
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
        self.conv_norm_out = _group_norm(cfg.norm_num_groups, self.dtype, "conv_norm_out", silu=True)
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
        if cfg.class_embed_type == "projection":
            temb = temb + self.class_embedding(context.mean(axis=1).astype(self.dtype))  # [B, 4C0]
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
        x = self.conv_out(self.conv_norm_out(x))  # [B, H, W, out_channels]

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
