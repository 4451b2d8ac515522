"""DDPM and DDIM ancestral samplers, each one compiled loop over a whole batch.

The maths is diffusers' (0.39) with epsilon prediction:

* ``ddpm``: ``DDPMScheduler`` defaults, ``variance_type="fixed_small"`` (the posterior variance
  ``beta_tilde``), ``clip_sample=True`` (predicted ``x0`` clipped to ``[-1, 1]``),
  ``timestep_spacing="leading"``. With ``steps=None`` it runs all ``T`` training steps
  ``T-1, ..., 0`` (the paper); fewer steps use the leading spacing of ``set_timesteps``.
* ``ddim``: ``DDIMScheduler`` defaults: ``timestep_spacing="leading"`` (``t_i = i * (T // steps)``,
  ``steps_offset=0``), ``set_alpha_to_one=True`` (the step after ``t=0`` has ``alpha_bar = 1``),
  ``clip_sample=True``, ``eta=0`` (deterministic) unless given, ``use_clipped_model_output=False``.

Our images live in ``[0, 1]`` (as in the reference code); the clip of the predicted ``x0`` to
``[-1, 1]`` is kept as diffusers does it, and converting to uint8 clips to ``[0, 1]``.

Randomness is per image, so the batch size never changes the result: image ``j`` of seed ``s``
uses ``key_j = fold_in(key(s), j)``; ``split(key_j)`` gives its initial-noise key and its step
key, and the noise added at timestep ``t`` is drawn from ``fold_in(step_key, t)``. Every draw
has the shape of one image and is vmapped over the batch's keys.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fadjax.diffusion import Schedule, predict_x0

SAMPLERS = ("ddpm", "ddim")
DEFAULT_DDIM_STEPS = 50

EpsFn = Callable[[object, jax.Array, jax.Array, jax.Array], jax.Array]


def timesteps(num_train_timesteps: int, sampler: str = "ddpm", steps: int | None = None) -> np.ndarray:
    """Descending timesteps of a sampler, with diffusers' "leading" spacing.

    Args:
      num_train_timesteps: ``T`` of the schedule.
      sampler: ``ddpm`` or ``ddim``.
      steps: number of sampling steps; ``None`` = ``T`` for DDPM, 50 for DDIM.

    Returns:
      ``[steps]`` int32 timesteps, largest first (``arange(steps) * (T // steps)`` reversed).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    if steps is None:
        steps = num_train_timesteps if sampler == "ddpm" else DEFAULT_DDIM_STEPS
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    ratio = num_train_timesteps // steps
    return (np.arange(steps, dtype=np.int64) * ratio)[::-1].astype(np.int32)


def _bcast(v: jax.Array, ndim: int) -> jax.Array:
    return jnp.reshape(v, jnp.shape(v) + (1,) * (ndim - jnp.ndim(v)))


def ddpm_step(schedule: Schedule, x: jax.Array, eps: jax.Array, t: jax.Array, prev_t: jax.Array,
              noise: jax.Array, *, clip_sample: bool = True) -> jax.Array:
    """One ``DDPMScheduler.step`` (epsilon prediction, "fixed_small" variance).

    Args:
      schedule: the training schedule.
      x: current samples ``x_t`` ``[B, H, W, C]``.
      eps: predicted noise, shaped like ``x``.
      t: current timestep (scalar or ``[B]`` int).
      prev_t: next timestep of the chain (``-1`` after the last one: ``alpha_bar = 1``).
      noise: standard normal noise shaped like ``x`` (unused when ``t == 0``).
      clip_sample: clip the predicted ``x0`` to ``[-1, 1]``.

    Returns:
      ``x_{prev_t}``, shaped like ``x``.
    """
    abar = _bcast(schedule.alphas_cumprod[t], x.ndim)
    abar_prev = _bcast(jnp.where(prev_t >= 0, schedule.alphas_cumprod[jnp.maximum(prev_t, 0)], 1.0), x.ndim)
    alpha_t = abar / abar_prev
    beta_t = 1.0 - alpha_t
    x0 = predict_x0(schedule, x, jnp.broadcast_to(t, x.shape[:1]), eps)
    if clip_sample:
        x0 = jnp.clip(x0, -1.0, 1.0)
    x0_coeff = jnp.sqrt(abar_prev) * beta_t / (1.0 - abar)
    xt_coeff = jnp.sqrt(alpha_t) * (1.0 - abar_prev) / (1.0 - abar)
    mean = x0_coeff * x0 + xt_coeff * x
    variance = jnp.maximum((1.0 - abar_prev) / (1.0 - abar) * beta_t, 1e-20)
    std = jnp.where(_bcast(t, x.ndim) > 0, jnp.sqrt(variance), 0.0)
    return (mean + std * noise).astype(x.dtype)


def ddim_step(schedule: Schedule, x: jax.Array, eps: jax.Array, t: jax.Array, prev_t: jax.Array,
              noise: jax.Array | None = None, *, eta: float = 0.0, clip_sample: bool = True) -> jax.Array:
    """One ``DDIMScheduler.step`` (epsilon prediction, ``set_alpha_to_one=True``).

    Args:
      schedule: the training schedule.
      x: current samples ``x_t`` ``[B, H, W, C]``.
      eps: predicted noise, shaped like ``x``.
      t: current timestep (scalar or ``[B]`` int).
      prev_t: ``t - T // steps`` (negative after the last step: ``alpha_bar = 1``).
      noise: standard normal noise shaped like ``x``; needed only when ``eta > 0``.
      eta: weight of the stochastic part (0 = deterministic DDIM, 1 = DDPM-like variance).
      clip_sample: clip the predicted ``x0`` to ``[-1, 1]``.

    Returns:
      ``x_{prev_t}``, shaped like ``x``.
    """
    abar = _bcast(schedule.alphas_cumprod[t], x.ndim)
    abar_prev = _bcast(jnp.where(prev_t >= 0, schedule.alphas_cumprod[jnp.maximum(prev_t, 0)], 1.0), x.ndim)
    x0 = predict_x0(schedule, x, jnp.broadcast_to(t, x.shape[:1]), eps)
    if clip_sample:
        x0 = jnp.clip(x0, -1.0, 1.0)
    variance = (1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev)
    std = eta * jnp.sqrt(variance)
    out = jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1.0 - abar_prev - std ** 2) * eps
    if eta > 0:
        out = out + std * noise
    return out.astype(x.dtype)


def image_keys(seed: int | Sequence[int] | jax.Array, image_ids: Sequence[int] | jax.Array) -> jax.Array:
    """Per-image keys ``fold_in(key(seed_j), image_id_j)`` (``seed`` scalar or one per image).

    Returns:
      A ``[B]`` array of typed PRNG keys.
    """
    ids = jnp.asarray(image_ids, jnp.uint32)
    seeds = jnp.broadcast_to(jnp.asarray(seed, jnp.uint32), ids.shape)
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, ids)


def initial_noise(keys: jax.Array, shape: Sequence[int]) -> jax.Array:
    """The starting ``x_T`` of each image, ``[B, *shape]`` float32 (from its key's first split)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.split(k)[0], tuple(shape), jnp.float32))(keys)


def _step_noise(keys: jax.Array, t: jax.Array, shape: Sequence[int]) -> jax.Array:
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(jax.random.split(k)[1], t),
                                                tuple(shape), jnp.float32))(keys)


def guided_eps(eps_fn: EpsFn, params, x: jax.Array, t: jax.Array, labels: jax.Array, *,
               guidance_scale: float = 1.0, null_label: int | None = None) -> jax.Array:
    """Noise prediction, with classifier-free guidance when ``guidance_scale != 1``.

    Guidance evaluates the conditional and unconditional branches in one call on a doubled
    batch: ``eps = eps_uncond + s * (eps_cond - eps_uncond)``.
    """
    if guidance_scale == 1.0:
        return eps_fn(params, x, t, labels)
    if null_label is None:
        raise ValueError("classifier-free guidance needs a null label: the run must have trained with "
                         "label dropout (cond.label_dropout > 0)")
    b = x.shape[0]
    both = eps_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                  jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
    cond, uncond = both[:b], both[b:]
    return uncond + guidance_scale * (cond - uncond)


@functools.partial(jax.jit, static_argnames=("eps_fn", "shape", "sampler", "steps", "eta",
                                             "guidance_scale", "null_label", "clip_sample"))
def _sample_jit(eps_fn, params, schedule, labels, keys, *, shape, sampler, steps, eta,
                guidance_scale, null_label, clip_sample):
    ts = timesteps(schedule.num_steps, sampler, steps)
    if sampler == "ddpm":
        prev = np.append(ts[1:], -1).astype(np.int32)
    else:
        prev = (ts - schedule.num_steps // len(ts)).astype(np.int32)
    ts, prev = jnp.asarray(ts), jnp.asarray(prev)
    b = labels.shape[0]

    def body(i, x):  # x: [B, H, W, C]
        t, pt = ts[i], prev[i]
        eps = guided_eps(eps_fn, params, x, jnp.full((b,), t, jnp.int32), labels,
                         guidance_scale=guidance_scale, null_label=null_label)
        if sampler == "ddpm":
            return ddpm_step(schedule, x, eps, t, pt, _step_noise(keys, t, shape), clip_sample=clip_sample)
        noise = _step_noise(keys, t, shape) if eta > 0 else None
        return ddim_step(schedule, x, eps, t, pt, noise, eta=eta, clip_sample=clip_sample)

    x = jax.lax.fori_loop(0, len(ts), body, initial_noise(keys, shape))
    return x


def sample(eps_fn: EpsFn, params, schedule: Schedule, labels, *, shape: Sequence[int],
           keys: jax.Array | None = None, seed: int | None = None, image_ids: Sequence[int] | None = None,
           sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0,
           guidance_scale: float = 1.0, null_label: int | None = None, clip_sample: bool = True) -> jax.Array:
    """Draws a batch of images with one jitted ``fori_loop`` over the sampler's timesteps.

    Args:
      eps_fn: pure ``eps_fn(params, x [B,H,W,C], t [B] int32, labels [B] int32) -> eps``.
        Compilations are cached per ``eps_fn`` object, so pass the same function each call.
      params: parameters passed to ``eps_fn``.
      schedule: the training schedule.
      labels: ``[B]`` int class labels.
      shape: shape of one image ``(H, W, C)``.
      keys: ``[B]`` per-image PRNG keys (see :func:`image_keys`); or give ``seed`` and ``image_ids``.
      seed: seed shared by the batch (with ``image_ids``).
      image_ids: ``[B]`` global image indices (with ``seed``).
      sampler: ``ddpm`` or ``ddim``.
      steps: sampling steps; ``None`` = all training steps (DDPM) or 50 (DDIM).
      eta: DDIM's stochasticity (ignored by DDPM).
      guidance_scale: classifier-free guidance scale; 1 = plain conditional sampling.
      null_label: label of the unconditional branch (required when ``guidance_scale != 1``).
      clip_sample: clip each predicted ``x0`` to ``[-1, 1]`` (diffusers' default).

    Returns:
      ``[B, H, W, C]`` float32 samples (not clipped; images are meant to lie in ``[0, 1]``).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    if keys is None:
        if seed is None or image_ids is None:
            raise ValueError("give either keys or both seed and image_ids")
        keys = image_keys(seed, image_ids)
    labels = jnp.asarray(labels, jnp.int32)
    if keys.shape != labels.shape:
        raise ValueError(f"one key per label expected: keys {keys.shape}, labels {labels.shape}")
    if guidance_scale != 1.0 and null_label is None:
        raise ValueError("guidance_scale != 1 needs null_label (a run trained with label dropout)")
    timesteps(schedule.num_steps, sampler, steps)  # Validates steps before tracing.
    return _sample_jit(eps_fn, params, schedule, labels, keys, shape=tuple(int(s) for s in shape),
                       sampler=sampler, steps=steps, eta=float(eta), guidance_scale=float(guidance_scale),
                       null_label=None if null_label is None else int(null_label), clip_sample=bool(clip_sample))


def to_uint8(x: jax.Array | np.ndarray) -> np.ndarray:
    """Clips ``[0, 1]`` images and converts them to uint8 (round to nearest)."""
    return np.asarray(np.round(np.clip(np.asarray(x, np.float32), 0.0, 1.0) * 255.0), np.uint8)
