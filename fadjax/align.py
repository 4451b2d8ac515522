"""Feature alignment (paper §IV): L_align = mean(1 - cos(W_p pool(f_e(x_t)), pool(f_d(x_t)))).

Pure functions the train step calls. The projection W_p is a plain `{'kernel', 'bias'}` dict
(PyTorch Linear layout transposed: `kernel` is `[in, out]`) trained with the U-Net.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def init_projection(rng: jax.Array, in_dim: int, out_dim: int) -> dict[str, jax.Array]:
    """W_p initialised like PyTorch's nn.Linear: kernel and bias ~ U(-1/sqrt(in_dim), 1/sqrt(in_dim)).

    Args:
      rng: PRNG key.
      in_dim: Expert feature width D_e (2048 for ResNet-50).
      out_dim: U-Net feature width D_u (1280 for tiny-sd's last down block).

    Returns:
      `{'kernel': [in_dim, out_dim], 'bias': [out_dim]}` float32.
    """
    kernel_rng, bias_rng = jax.random.split(rng)
    bound = 1.0 / math.sqrt(in_dim)
    return {
        "kernel": jax.random.uniform(kernel_rng, (in_dim, out_dim), jnp.float32, -bound, bound),
        "bias": jax.random.uniform(bias_rng, (out_dim,), jnp.float32, -bound, bound),
    }


def project(params: dict[str, jax.Array], f: jax.Array) -> jax.Array:
    """`f @ kernel + bias` over the last axis."""
    return f @ params["kernel"] + params["bias"]


def spatial_pool(f: jax.Array) -> jax.Array:
    """Global average over H, W of a `[B, H, W, C]` map; a `[B, C]` vector is returned as is."""
    if f.ndim == 4:
        return jnp.mean(f, axis=(1, 2))
    if f.ndim == 2:
        return f
    raise ValueError(f"expected features [B, H, W, C] or [B, C], got shape {f.shape}")


def _norm(x: jax.Array, eps: float) -> jax.Array:
    # max(||x||, eps) with a finite gradient at x = 0.
    return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1), eps * eps))


def cosine_alignment_loss(
    proj_params: dict[str, jax.Array], expert_feat: jax.Array, unet_feat: jax.Array, eps: float = 1e-8
) -> jax.Array:
    """mean over the batch of `1 - cos(W_p pool(expert_feat), pool(unet_feat))`, in float32.

    The expert is frozen: its features are under `stop_gradient`, so gradients reach only W_p
    and the U-Net side. The cosine is `a.b / (max(|a|, eps) max(|b|, eps))` (torch's
    `F.cosine_similarity`).

    Args:
      proj_params: W_p from `init_projection` (`kernel` `[D_e, D_u]`).
      expert_feat: `[B, D_e]` or `[B, h, w, D_e]`.
      unet_feat: `[B, h, w, D_u]` or `[B, D_u]`.
      eps: Floor of the norms.

    Returns:
      Scalar float32 in [0, 2].
    """
    expert = jax.lax.stop_gradient(spatial_pool(expert_feat.astype(jnp.float32)))  # [B, D_e]
    unet = spatial_pool(unet_feat.astype(jnp.float32))  # [B, D_u]
    if expert.shape[0] != unet.shape[0]:
        raise ValueError(f"batch sizes differ: expert {expert_feat.shape} vs U-Net {unet_feat.shape}")
    kernel = proj_params["kernel"]
    if kernel.shape != (expert.shape[-1], unet.shape[-1]):
        raise ValueError(
            f"projection kernel {kernel.shape} does not map expert width {expert.shape[-1]} "
            f"to U-Net width {unet.shape[-1]}"
        )
    projected = project(jax.tree.map(lambda p: p.astype(jnp.float32), proj_params), expert)  # [B, D_u]
    cos = jnp.sum(projected * unet, axis=-1) / (_norm(projected, eps) * _norm(unet, eps))  # [B]
    return jnp.mean(1.0 - cos)
