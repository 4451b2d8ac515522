"""Feature alignment: the paper's pooled loss (§IV) and a token-wise, REPA-style one.

``pooled`` (the paper): ``L = mean_b(1 - cos(P(pool(f_e)), pool(f_u)))``: one vector per image, the
expert's pooled feature mapped by the projector ``P`` into the U-Net feature's width. The projector
sits on the expert's side as in the paper's ``W_p``.

``tokens`` (REPA, Yu et al. 2024; U-REPA for U-Nets): ``L = mean_{b,i,j}(1 - cos(P(f_u)_{ij}, f_e_{ij}))``:
one cosine per spatial position, both maps brought to one grid (the finer one average-pooled to the
coarser when the sizes divide, else the U-Net's map resized bilinearly to the expert's grid). Here
the projector sits on the U-Net's side, as in REPA: the target is the frozen expert's own feature
geometry, so the U-Net is pulled towards what the expert sees at each position; a projector on the
expert's side could instead reshape the target until it is easy to match.

Projectors are plain parameter dicts trained with the U-Net: ``linear`` is ``{'kernel', 'bias'}``
(PyTorch Linear transposed, ``kernel`` ``[in, out]``); ``mlp`` is REPA's Linear-SiLU-Linear-SiLU-Linear,
``{'fc_0', 'fc_1', 'fc_2'}`` each a linear dict.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MODES = ("pooled", "tokens")
PROJECTORS = ("linear", "mlp")


def init_projection(rng: jax.Array, in_dim: int, out_dim: int) -> dict[str, jax.Array]:
    """A linear map initialised like PyTorch's nn.Linear: kernel and bias ~ U(-1/sqrt(in_dim), 1/sqrt(in_dim)).

    Args:
      rng: PRNG key.
      in_dim: input width (the paper: expert feature width D_e, 2048 for ResNet-50).
      out_dim: output width (the paper: U-Net feature width D_u, 1280 for tiny-sd's last down block).

    Returns:
      `{'kernel': [in_dim, out_dim], 'bias': [out_dim]}` float32.
    """
    kernel_rng, bias_rng = jax.random.split(rng)
    bound = 1.0 / math.sqrt(in_dim)
    return {
        "kernel": jax.random.uniform(kernel_rng, (in_dim, out_dim), jnp.float32, -bound, bound),
        "bias": jax.random.uniform(bias_rng, (out_dim,), jnp.float32, -bound, bound),
    }


def init_projector(rng: jax.Array, in_dim: int, out_dim: int, *, kind: str = "linear",
                   hidden: int = 256) -> dict:
    """A ``linear`` (:func:`init_projection`) or ``mlp`` projector from ``in_dim`` to ``out_dim``.

    ``mlp``: three linear layers ``in -> hidden -> hidden -> out`` with SiLU between them (REPA's,
    there with hidden 2048), each initialised like nn.Linear.
    """
    if kind == "linear":
        return init_projection(rng, in_dim, out_dim)
    if kind != "mlp":
        raise ValueError(f"projector {kind!r} is not one of {PROJECTORS}")
    dims = (in_dim, hidden, hidden, out_dim)
    keys = jax.random.split(rng, 3)
    return {f"fc_{i}": init_projection(keys[i], dims[i], dims[i + 1]) for i in range(3)}


def projector_dims(params: dict) -> tuple[int, int]:
    """(input width, output width) of a projector."""
    if "kernel" in params:
        return tuple(params["kernel"].shape)
    return params["fc_0"]["kernel"].shape[0], params["fc_2"]["kernel"].shape[1]


def project(params: dict, f: jax.Array) -> jax.Array:
    """The projector applied over the last axis (float32)."""
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    if "kernel" in params:
        return f @ params["kernel"] + params["bias"]
    for i in range(3):
        layer = params[f"fc_{i}"]
        f = f @ layer["kernel"] + layer["bias"]
        if i < 2:
            f = jax.nn.silu(f)
    return f


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


def _cosine(a: jax.Array, b: jax.Array, eps: float) -> jax.Array:
    """cos over the last axis: `a.b / (max(|a|, eps) max(|b|, eps))` (torch's `F.cosine_similarity`)."""
    return jnp.sum(a * b, axis=-1) / (_norm(a, eps) * _norm(b, eps))


def _check_dims(proj_params: dict, in_dim: int, out_dim: int, what: str) -> None:
    dims = projector_dims(proj_params)
    if dims != (in_dim, out_dim):
        raise ValueError(f"projector maps {dims[0]} -> {dims[1]}, but {what} needs {in_dim} -> {out_dim}")


def cosine_alignment_loss(
    proj_params: dict, expert_feat: jax.Array, unet_feat: jax.Array, eps: float = 1e-8
) -> jax.Array:
    """The paper's loss: mean over the batch of `1 - cos(P(pool(expert_feat)), pool(unet_feat))`, float32.

    The expert is frozen: its features are under `stop_gradient`, so gradients reach only the
    projector and the U-Net side.

    Args:
      proj_params: the projector (:func:`init_projector`), expert width D_e -> U-Net width D_u.
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
    _check_dims(proj_params, expert.shape[-1], unet.shape[-1], "expert width -> U-Net width (pooled)")
    projected = project(proj_params, expert)  # [B, D_u]
    return jnp.mean(1.0 - _cosine(projected, unet, eps))


def _avg_pool_to(f: jax.Array, size: tuple[int, int]) -> jax.Array:
    b, h, w, c = f.shape
    fh, fw = h // size[0], w // size[1]
    return f.reshape(b, size[0], fh, size[1], fw, c).mean(axis=(2, 4))


def common_grid(unet: jax.Array, expert: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Both `[B, h, w, C]` maps on one grid: the finer average-pooled to the coarser when its size is a
    multiple of the coarser's, else the U-Net's map resized bilinearly to the expert's grid."""
    (hu, wu), (he, we) = unet.shape[1:3], expert.shape[1:3]
    if (hu, wu) == (he, we):
        return unet, expert
    if hu >= he and wu >= we and hu % he == 0 and wu % we == 0:
        return _avg_pool_to(unet, (he, we)), expert
    if he >= hu and we >= wu and he % hu == 0 and we % wu == 0:
        return unet, _avg_pool_to(expert, (hu, wu))
    return jax.image.resize(unet, (unet.shape[0], he, we, unet.shape[3]), "bilinear"), expert


def token_alignment_loss(
    proj_params: dict, expert_feat: jax.Array, unet_feat: jax.Array, eps: float = 1e-8
) -> jax.Array:
    """Token-wise (REPA-style) loss: mean over batch and positions of `1 - cos(P(unet)_{ij}, expert_{ij})`.

    The projector acts on every U-Net token at the U-Net's resolution (U-Net width D_u -> expert
    width D_e); then both maps are brought to one grid (:func:`common_grid`).

    Args:
      proj_params: the projector, D_u -> D_e.
      expert_feat: `[B, h_e, w_e, D_e]` (a spatial expert feature: a ResNet stage, ViT tokens as a grid).
      unet_feat: `[B, h_u, w_u, D_u]`.

    Returns:
      Scalar float32 in [0, 2].
    """
    if expert_feat.ndim != 4 or unet_feat.ndim != 4:
        raise ValueError(f"token-wise alignment needs spatial maps [B, h, w, C]; got expert {expert_feat.shape}, "
                         f"U-Net {unet_feat.shape}")
    if expert_feat.shape[0] != unet_feat.shape[0]:
        raise ValueError(f"batch sizes differ: expert {expert_feat.shape} vs U-Net {unet_feat.shape}")
    _check_dims(proj_params, unet_feat.shape[-1], expert_feat.shape[-1], "U-Net width -> expert width (tokens)")
    expert = jax.lax.stop_gradient(expert_feat.astype(jnp.float32))
    projected = project(proj_params, unet_feat.astype(jnp.float32))  # [B, h_u, w_u, D_e]
    projected, expert = common_grid(projected, expert)
    return jnp.mean(1.0 - _cosine(projected, expert, eps))


def alignment_loss(mode: str, proj_params: dict, expert_feat: jax.Array, unet_feat: jax.Array) -> jax.Array:
    """The loss of ``align.mode``: :func:`cosine_alignment_loss` (pooled) or :func:`token_alignment_loss`."""
    if mode == "pooled":
        return cosine_alignment_loss(proj_params, expert_feat, unet_feat)
    if mode == "tokens":
        return token_alignment_loss(proj_params, expert_feat, unet_feat)
    raise ValueError(f"align.mode {mode!r} is not one of {MODES}")


def projector_io(mode: str, *, expert_dim: int, unet_dim: int) -> tuple[int, int]:
    """(input, output) widths of the projector of ``mode``: expert -> U-Net (pooled), U-Net -> expert (tokens)."""
    return (expert_dim, unet_dim) if mode == "pooled" else (unet_dim, expert_dim)
