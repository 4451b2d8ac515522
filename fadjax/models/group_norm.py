"""GroupNorm (optionally followed by SiLU) with a hand-written gradient: the U-Net's norms, faster on a CPU.

The math and the parameters (``scale``, ``bias``) are flax's ``nn.GroupNorm`` (statistics in float32,
variance as E[x²] - E[x]², as flax's default ``use_fast_variance``). The difference is the backward pass.
Differentiating flax's version, XLA recomputes the normalisation inside each of the reductions of the
gradient (one per parameter and per statistic) over the full activation. Here the gradient is two sums
over the spatial positions, per image and channel (of g and of g * x̂), and one element-wise pass:

  x̂ = (x - μ) σ⁻¹,  z = γ x̂ + β,  y = silu(z) (or z);  g_z = g_y silu'(z)
  ∂β = Σ_{b,hw} g_z,  ∂γ = Σ_{b,hw} g_z x̂
  ∂x = σ⁻¹ (γ g_z - mean_group(γ g_z) - x̂ mean_group(γ g_z x̂))

Measured on 2 CPU cores (forward + backward of silu(GroupNorm), 8 groups): [32,32,32,48] 5.75 -> 4.20 ms,
[32,16,16,32] 0.84 -> 0.57 ms; equal to flax's within 1e-5 (``tests/test_unet.py``).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _group_mean(per_channel: jax.Array, groups: int, n: int) -> jax.Array:
    """[B, C] sums over the positions -> [B, G] means over each group's ``n`` elements."""
    b = per_channel.shape[0]
    return per_channel.reshape(b, groups, -1).sum(-1) / n


def _over_channels(per_group: jax.Array, channels: int) -> jax.Array:
    """[B, G] -> [B, 1, 1, C]: each group's value repeated over its channels."""
    return jnp.repeat(per_group, channels // per_group.shape[1], axis=1)[:, None, None, :]


def _stats(x: jax.Array, groups: int, eps: float):
    """Mean and 1/std of each (image, group), each [B, 1, 1, C] (repeated over the group's channels)."""
    b, h, w, c = x.shape
    flat = x.reshape(b, h * w, c)
    n = h * w * (c // groups)
    mean = _group_mean(jnp.sum(flat, axis=1), groups, n)
    mean_sq = _group_mean(jnp.sum(flat * flat, axis=1), groups, n)
    rstd = jax.lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0.0) + eps)
    return _over_channels(mean, c), _over_channels(rstd, c)


def _forward(x, scale, bias, groups, eps, silu):
    mean, rstd = _stats(x, groups, eps)
    z = (x - mean) * rstd * scale + bias
    return (z * jax.nn.sigmoid(z) if silu else z), (mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float, silu: bool) -> jax.Array:
    """``silu(GroupNorm(x))`` (or without the SiLU) for float32 ``x`` [B, H, W, C], ``scale``/``bias`` [C]."""
    return _forward(x, scale, bias, groups, eps, silu)[0]


def _fwd(x, scale, bias, groups, eps, silu):
    y, (mean, rstd) = _forward(x, scale, bias, groups, eps, silu)
    return y, (x, scale, bias, mean, rstd)


def _bwd(groups, eps, silu, res, g):
    x, scale, bias, mean, rstd = res
    b, h, w, c = x.shape
    xhat = (x - mean) * rstd
    if silu:
        z = xhat * scale + bias
        s = jax.nn.sigmoid(z)
        g = g * s * (1.0 + z * (1.0 - s))
    sum_g = jnp.sum(g.reshape(b, h * w, c), axis=1)  # [B, C]
    sum_gx = jnp.sum((g * xhat).reshape(b, h * w, c), axis=1)  # [B, C]
    n = h * w * (c // groups)
    mean_g = _group_mean(sum_g * scale, groups, n)  # [B, G]
    mean_gx = _group_mean(sum_gx * scale, groups, n)
    dx = rstd * (g * scale - _over_channels(mean_g, c) - xhat * _over_channels(mean_gx, c))
    return dx, jnp.sum(sum_gx, 0), jnp.sum(sum_g, 0)


group_norm.defvjp(_fwd, _bwd)


class GroupNorm(nn.Module):
    """flax ``nn.GroupNorm`` (same parameters, same values), then SiLU when ``silu``; see the module doc.

    Statistics and the normalisation are computed in float32; the output is cast to ``dtype``.
    """

    num_groups: int
    epsilon: float = 1e-5
    silu: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"{c} channels are not divisible by {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        y = group_norm(x.astype(jnp.float32), scale, bias, self.num_groups, float(self.epsilon), self.silu)
        return y.astype(self.dtype)
