"""DDPM noise schedules and the forward (noising) process.

The paper trains with diffusers' ``DDPMScheduler(num_train_timesteps=1000,
beta_schedule="squaredcos_cap_v2")``: Nichol & Dhariwal's cosine schedule,
``alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2) ** 2`` and
``beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999)``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("squaredcos_cap_v2", "linear", "scaled_linear")


class Schedule(NamedTuple):
    """Per-timestep constants of a discrete DDPM, each ``[T]`` float32."""

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]


def make_betas(num_steps: int, beta_schedule: str = "squaredcos_cap_v2", *,
               beta_start: float = 1e-4, beta_end: float = 0.02, max_beta: float = 0.999) -> np.ndarray:
    """Betas of a named schedule, computed in float64 like diffusers, returned as float32.

    Args:
      num_steps: number of training timesteps ``T``.
      beta_schedule: ``squaredcos_cap_v2`` (cosine), ``linear`` or ``scaled_linear``.
      beta_start: first beta of the linear schedules.
      beta_end: last beta of the linear schedules.
      max_beta: cap of the cosine schedule's betas.

    Returns:
      ``[num_steps]`` float32 betas.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if beta_schedule == "squaredcos_cap_v2":
        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                 for i in range(num_steps)]
        betas = np.asarray(betas, np.float64)
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=np.float64) ** 2
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected one of {BETA_SCHEDULES}")
    return betas.astype(np.float32)


def make_schedule(num_steps: int = 1000, beta_schedule: str = "squaredcos_cap_v2", **kwargs) -> Schedule:
    """The schedule's betas, alphas and cumulative products (float32, like diffusers)."""
    betas = make_betas(num_steps, beta_schedule, **kwargs)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, dtype=np.float32)
    return Schedule(jnp.asarray(betas), jnp.asarray(alphas), jnp.asarray(alphas_cumprod))


def _per_example(v: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """Gathers ``v[t]`` and reshapes it to broadcast against a ``[B, ...]`` tensor of rank ``ndim``."""
    return v[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Draws ``x_t ~ q(x_t | x_0)``: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.

    Args:
      schedule: the DDPM schedule.
      x0: clean images ``[B, H, W, C]``.
      t: integer timesteps ``[B]``.
      noise: standard normal noise shaped like ``x0``.

    Returns:
      The noisy images ``x_t``, same shape and dtype as ``x0``.
    """
    abar = _per_example(schedule.alphas_cumprod, t, x0.ndim)
    return (jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise).astype(x0.dtype)


def predict_x0(schedule: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """Inverts ``q_sample`` for a predicted noise: ``(x_t - sqrt(1 - abar) eps) / sqrt(abar)``."""
    abar = _per_example(schedule.alphas_cumprod, t, x_t.ndim)
    return (x_t - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)


# Ranges images can be diffused in (config ``diffusion.data_range``). Data and samples are in [0, 1]
# outside the model; "[-1,1]" maps them affinely to [-1, 1] for the diffusion process.
DATA_RANGES = ("[0,1]", "[-1,1]")


def _check_range(data_range: str) -> None:
    if data_range not in DATA_RANGES:
        raise ValueError(f"unknown data_range {data_range!r}; expected one of {DATA_RANGES}")


def to_model_range(x: jax.Array, data_range: str) -> jax.Array:
    """Images in [0, 1] -> the range they are diffused in."""
    _check_range(data_range)
    return x if data_range == "[0,1]" else 2.0 * x - 1.0


def from_model_range(x: jax.Array, data_range: str) -> jax.Array:
    """Inverse of :func:`to_model_range`: diffused images (or noisy ``x_t``) -> the [0, 1] scale."""
    _check_range(data_range)
    return x if data_range == "[0,1]" else 0.5 * (x + 1.0)


# What the U-Net predicts (config ``diffusion.prediction``): "epsilon" (the noise, DDPM and the paper) or
# "v_prediction" (``v = sqrt(abar) eps - sqrt(1 - abar) x0``, Salimans & Ho 2022), diffusers' names.
PREDICTIONS = ("epsilon", "v_prediction")


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def v_target(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """The velocity ``v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0`` (diffusers' ``get_velocity``)."""
    abar = _per_example(schedule.alphas_cumprod, t, x0.ndim)
    return jnp.sqrt(abar) * noise - jnp.sqrt(1.0 - abar) * x0


def training_target(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array, prediction: str) -> jax.Array:
    """What the model is trained to output: the noise (``epsilon``) or :func:`v_target`."""
    _check_prediction(prediction)
    return noise if prediction == "epsilon" else v_target(schedule, x0, t, noise)


def split_prediction(schedule: Schedule, x_t: jax.Array, t: jax.Array, out: jax.Array,
                     prediction: str) -> tuple[jax.Array, jax.Array]:
    """The model's output ``out`` at ``(x_t, t)`` as ``(x0, eps)``, computed directly from ``out`` for each
    prediction type (as diffusers' schedulers do: v's x0 = ``sqrt(abar) x_t - sqrt(1-abar) v``, no division).

    ``t`` is ``[B]`` int (or a scalar, broadcast over the batch).
    """
    _check_prediction(prediction)
    t = jnp.broadcast_to(t, x_t.shape[:1])
    abar = _per_example(schedule.alphas_cumprod, t, x_t.ndim)
    if prediction == "epsilon":
        return (x_t - jnp.sqrt(1.0 - abar) * out) / jnp.sqrt(abar), out
    return jnp.sqrt(abar) * x_t - jnp.sqrt(1.0 - abar) * out, jnp.sqrt(abar) * out + jnp.sqrt(1.0 - abar) * x_t


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` at integer timesteps ``t``."""
    abar = schedule.alphas_cumprod[t]
    return abar / (1.0 - abar)


# Per-example weighting of the denoising MSE (config ``diffusion.loss_weighting``): "none" (the plain mean,
# DDPM and the paper) or "min_snr" (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting":
# ``min(SNR, gamma) / SNR`` on the epsilon MSE, ``min(SNR, gamma) / (SNR + 1)`` on the v MSE; both equal
# ``min(SNR, gamma)`` times the x0 MSE).
LOSS_WEIGHTINGS = ("none", "min_snr")


def loss_weight(schedule: Schedule, t: jax.Array, *, weighting: str, prediction: str, gamma: float = 5.0) -> jax.Array:
    """``[B]`` weight of each example's MSE at timesteps ``t`` (ones for ``weighting="none"``)."""
    _check_prediction(prediction)
    if weighting == "none":
        return jnp.ones(t.shape, jnp.float32)
    if weighting != "min_snr":
        raise ValueError(f"unknown loss_weighting {weighting!r}; expected one of {LOSS_WEIGHTINGS}")
    s = snr(schedule, t)
    clipped = jnp.minimum(s, gamma)
    return clipped / s if prediction == "epsilon" else clipped / (s + 1.0)
