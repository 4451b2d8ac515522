"""Diffusion samplers, each one compiled loop over a whole batch.

The maths is diffusers' (0.39), for a model that predicts the noise (``prediction="epsilon"``) or the
velocity (``"v_prediction"``); the model's raw output is guided (guidance is linear in it) and then
turned into ``(x0, eps)`` for the step (:func:`fadjax.diffusion.split_prediction`):

* ``ddpm``: ``DDPMScheduler`` defaults, ``variance_type="fixed_small"`` (the posterior variance
  ``beta_tilde``), ``clip_sample=True`` (predicted ``x0`` clipped to ``[-1, 1]``),
  ``timestep_spacing="leading"``. With ``steps=None`` it runs all ``T`` training steps
  ``T-1, ..., 0`` (the paper); fewer steps use the leading spacing of ``set_timesteps``.
* ``ddim``: ``DDIMScheduler`` defaults: ``timestep_spacing="leading"`` (``t_i = i * (T // steps)``,
  ``steps_offset=0``), ``set_alpha_to_one=True`` (the step after ``t=0`` has ``alpha_bar = 1``),
  ``clip_sample=True``, ``eta=0`` (deterministic) unless given, ``use_clipped_model_output=False``.
* ``dpmpp_2m``: DPM-Solver++(2M) (Lu et al. 2022), the multistep second-order solver of the data
  (``x0``) prediction: ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
  solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero")`` with the schedule's betas
  as ``trained_betas``. Its first and last steps are first order (the last one lands on ``sigma = 0``,
  i.e. returns the predicted ``x0``). Timesteps are its default ``timestep_spacing="linspace"``
  (``linspace(0, T-1, steps+1)`` rounded, largest ``steps``), or with ``karras_sigmas`` the Karras
  sigmas and the timestep interpolated from each sigma, rounded (as diffusers does for
  ``trained_betas``). No clipping.
* ``euler`` and ``heun``: EDM's deterministic sampler (Karras et al. 2022, Algorithm 1 without churn)
  on the Karras sigmas (``rho = 7``, from the schedule's largest to its smallest sigma, then 0):
  ``EulerDiscreteScheduler(use_karras_sigmas=True)`` and ``HeunDiscreteScheduler(use_karras_sigmas=True)``
  with ``trained_betas``. They integrate the probability-flow ODE in the variance-exploding variable
  ``x / sqrt(abar) = x0 + sigma * eps``, starting from ``sigma_max * noise``; the model sees
  ``x / sqrt(sigma^2 + 1)`` and a fractional timestep (interpolated from ``sigma`` in log-sigma, which
  the U-Net's sinusoidal time embedding accepts). Heun corrects every step but the last with a second
  model call at the step's end (``2 * steps - 1`` model calls). No clipping; ``karras_sigmas`` is
  ignored (always Karras).

Sigmas are ``sigma = sqrt((1 - abar) / abar)`` (diffusers' and EDM's units). The samplers that step
on sigmas (``dpmpp_2m``, ``euler``, ``heun``) convert the model's output at the step's sigma, with
``abar = 1 / (1 + sigma^2)`` in the formulas of ``split_prediction`` (a Karras sigma is generally not
one of the table's).

Classifier-free guidance can be limited to an interval of noise levels (Kynkäänniemi et al. 2024,
"Applying guidance in a limited interval improves sample and distribution quality in diffusion
models"): with ``guidance_interval=(lo, hi)`` the guided output is used where
``lo < sigma <= hi`` and the plain conditional one elsewhere, where only the conditional branch is
evaluated (``lax.cond``: the model is compiled in both branches, so compiling takes longer).

Our images live in ``[0, 1]`` (as in the reference code) or ``[-1, 1]``; DDPM/DDIM keep diffusers'
clip of the predicted ``x0`` to ``[-1, 1]``, and converting to uint8 clips to ``[0, 1]``.

Randomness is per image, so the batch size never changes the result: image ``j`` of seed ``s``
uses ``key_j = fold_in(key(s), j)``; ``split(key_j)`` gives its initial-noise key and its step
key, and the noise added at timestep ``t`` is drawn from ``fold_in(step_key, t)``. Every draw
has the shape of one image and is vmapped over the batch's keys. ``dpmpp_2m``, ``euler``, ``heun``
and ``ddim`` with ``eta=0`` draw only the initial noise.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fadjax.diffusion import PREDICTIONS, Schedule, split_prediction

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "euler", "heun")
SIGMA_SAMPLERS = ("dpmpp_2m", "euler", "heun")  # Step on sigmas rather than on the table's timesteps.
DEFAULT_DDIM_STEPS = 50
# Steps when none are given (DDPM: all T). 25 for the higher-order samplers: DPM-Solver++(2M) and Euler
# need 25 model calls, Heun 49 (about DDIM's 50).
DEFAULT_STEPS = {"ddim": DEFAULT_DDIM_STEPS, "dpmpp_2m": 25, "euler": 25, "heun": 25}
KARRAS_RHO = 7.0  # EDM's rho (Karras et al. 2022, eq. 5).

EpsFn = Callable[[object, jax.Array, jax.Array, jax.Array], jax.Array]


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")


def resolve_steps(num_train_timesteps: int, sampler: str = "ddpm", steps: int | None = None) -> int:
    """The number of sampler steps ``steps`` means (``None``: ``T`` for DDPM, else :data:`DEFAULT_STEPS`).

    Raises:
      ValueError: an unknown sampler, or ``steps`` outside ``[1, T]``.
    """
    _check_sampler(sampler)
    if steps is None:
        steps = num_train_timesteps if sampler == "ddpm" else DEFAULT_STEPS[sampler]
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    return int(steps)


def timesteps(num_train_timesteps: int, sampler: str = "ddpm", steps: int | None = None) -> np.ndarray:
    """Descending timesteps of a sampler's ``set_timesteps(steps)``, before any Karras conversion.

    Args:
      num_train_timesteps: ``T`` of the schedule.
      sampler: one of :data:`SAMPLERS`.
      steps: number of sampling steps; ``None`` = ``T`` for DDPM, else :data:`DEFAULT_STEPS`.

    Returns:
      ``[steps]`` timesteps, largest first. ``ddpm``/``ddim``: int32, "leading" spacing
      (``arange(steps) * (T // steps)`` reversed). ``dpmpp_2m``: int32, "linspace" spacing (the largest
      ``steps`` of ``linspace(0, T-1, steps+1)`` rounded). ``euler``/``heun``: float32
      ``linspace(0, T-1, steps)`` reversed; the timesteps these (and ``dpmpp_2m`` with Karras sigmas)
      feed the model come from :func:`sigma_schedule`.
    """
    steps = resolve_steps(num_train_timesteps, sampler, steps)
    if sampler == "dpmpp_2m":
        return np.linspace(0, num_train_timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int32)
    if sampler in ("euler", "heun"):
        return np.linspace(0, num_train_timesteps - 1, steps, dtype=np.float32)[::-1].copy()
    ratio = num_train_timesteps // steps
    return (np.arange(steps, dtype=np.int64) * ratio)[::-1].astype(np.int32)


# ----------------------------------------------------------------------------- sigmas

def schedule_sigmas(schedule: Schedule) -> jax.Array:
    """``[T]`` float32 ``sigma_t = sqrt((1 - abar_t) / abar_t)``, increasing with ``t``."""
    abar = schedule.alphas_cumprod
    return jnp.sqrt((1.0 - abar) / abar)


def karras_schedule(schedule: Schedule, steps: int, rho: float = KARRAS_RHO) -> jax.Array:
    """``[steps]`` sigmas of Karras et al. (2022, eq. 5), from the schedule's largest sigma to its smallest.

    ``sigma_i = (sigma_max^(1/rho) + i / (steps - 1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
    (``steps = 1``: ``sigma_max`` only, as ``np.linspace(0, 1, 1)`` gives diffusers).
    """
    sig = schedule_sigmas(schedule)
    lo, hi = sig[0] ** (1.0 / rho), sig[-1] ** (1.0 / rho)
    ramp = jnp.asarray(np.linspace(0.0, 1.0, steps), jnp.float32)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(schedule: Schedule, sigmas: jax.Array) -> jax.Array:
    """Fractional timesteps of ``sigmas``: linear interpolation of ``t`` in ``log sigma_t`` (diffusers'
    ``_sigma_to_t``), clamped to ``[0, T-1]``."""
    log_table = jnp.log(schedule_sigmas(schedule))  # [T], increasing
    log_s = jnp.log(jnp.maximum(sigmas, 1e-10))
    # Index of the last table entry <= log_s (0 when none), so that [low, low + 1] brackets it.
    low = jnp.clip(jnp.searchsorted(log_table, log_s, side="right") - 1, 0, log_table.shape[0] - 2)
    w = jnp.clip((log_table[low] - log_s) / (log_table[low] - log_table[low + 1]), 0.0, 1.0)
    return low.astype(jnp.float32) + w


def sigma_schedule(schedule: Schedule, sampler: str, steps: int | None = None, *,
                   karras_sigmas: bool = False) -> tuple[jax.Array, jax.Array]:
    """Timesteps and sigmas of a sigma-stepping sampler (``dpmpp_2m``, ``euler``, ``heun``).

    Args:
      schedule: the training schedule.
      sampler: one of :data:`SIGMA_SAMPLERS`.
      steps: sampler steps (``None``: :data:`DEFAULT_STEPS`).
      karras_sigmas: ``dpmpp_2m`` only: the Karras sigmas instead of the linspace timesteps' own
        (``euler``/``heun`` always use Karras sigmas).

    Returns:
      ``(ts, sigmas)``: ``[steps]`` timesteps fed to the model (int32 for ``dpmpp_2m``, float32 for
      ``euler``/``heun``) and ``[steps + 1]`` float32 sigmas, the last 0.
    """
    if sampler not in SIGMA_SAMPLERS:
        raise ValueError(f"sampler {sampler!r} does not step on sigmas; expected one of {SIGMA_SAMPLERS}")
    n = resolve_steps(schedule.num_steps, sampler, steps)
    if sampler == "dpmpp_2m" and not karras_sigmas:
        ts = jnp.asarray(timesteps(schedule.num_steps, sampler, n))
        sig = schedule_sigmas(schedule)[ts]
    else:
        sig = karras_schedule(schedule, n)
        ts = sigma_to_t(schedule, sig)
        if sampler == "dpmpp_2m":  # diffusers rounds them for trained_betas (and integer-only models).
            ts = jnp.round(ts).astype(jnp.int32)
    return ts, jnp.concatenate([sig, jnp.zeros((1,), sig.dtype)])


def _split_at_sigma(x: jax.Array, sigma: jax.Array, out: jax.Array, prediction: str) -> jax.Array:
    """Predicted ``x0`` from the output at variance-preserving ``x`` and noise level ``sigma``
    (``split_prediction``'s formulas with ``sqrt(abar) = 1 / sqrt(1 + sigma^2)``)."""
    alpha = 1.0 / jnp.sqrt(sigma ** 2 + 1.0)
    sigma_vp = sigma * alpha
    if prediction == "epsilon":
        return (x - sigma_vp * out) / alpha
    return alpha * x - sigma_vp * out


def _denoise_ve(x: jax.Array, sigma: jax.Array, out: jax.Array, prediction: str) -> jax.Array:
    """Predicted ``x0`` from the output at variance-exploding ``x = x0 + sigma * eps`` (the model saw
    ``x / sqrt(1 + sigma^2)``), in the form of diffusers' Euler and Heun schedulers."""
    if prediction == "epsilon":
        return x - sigma * out
    return out * (-sigma / jnp.sqrt(sigma ** 2 + 1.0)) + x / (sigma ** 2 + 1.0)


# ----------------------------------------------------------------------------- DDPM and DDIM steps

def _bcast(v: jax.Array, ndim: int) -> jax.Array:
    return jnp.reshape(v, jnp.shape(v) + (1,) * (ndim - jnp.ndim(v)))


def ddpm_step(schedule: Schedule, x: jax.Array, model_output: jax.Array, t: jax.Array, prev_t: jax.Array,
              noise: jax.Array, *, clip_sample: bool = True, prediction: str = "epsilon") -> jax.Array:
    """One ``DDPMScheduler.step`` ("fixed_small" variance).

    Args:
      schedule: the training schedule.
      x: current samples ``x_t`` ``[B, H, W, C]``.
      model_output: the (guided) model output, shaped like ``x``: the noise or ``v`` (``prediction``).
      t: current timestep (scalar or ``[B]`` int).
      prev_t: next timestep of the chain (``-1`` after the last one: ``alpha_bar = 1``).
      noise: standard normal noise shaped like ``x`` (unused when ``t == 0``).
      clip_sample: clip the predicted ``x0`` to ``[-1, 1]``.
      prediction: what the model predicts, one of :data:`fadjax.diffusion.PREDICTIONS`.

    Returns:
      ``x_{prev_t}``, shaped like ``x``.
    """
    abar = _bcast(schedule.alphas_cumprod[t], x.ndim)
    abar_prev = _bcast(jnp.where(prev_t >= 0, schedule.alphas_cumprod[jnp.maximum(prev_t, 0)], 1.0), x.ndim)
    alpha_t = abar / abar_prev
    beta_t = 1.0 - alpha_t
    x0, _ = split_prediction(schedule, x, t, model_output, prediction)
    if clip_sample:
        x0 = jnp.clip(x0, -1.0, 1.0)
    x0_coeff = jnp.sqrt(abar_prev) * beta_t / (1.0 - abar)
    xt_coeff = jnp.sqrt(alpha_t) * (1.0 - abar_prev) / (1.0 - abar)
    mean = x0_coeff * x0 + xt_coeff * x
    variance = jnp.maximum((1.0 - abar_prev) / (1.0 - abar) * beta_t, 1e-20)
    std = jnp.where(_bcast(t, x.ndim) > 0, jnp.sqrt(variance), 0.0)
    return (mean + std * noise).astype(x.dtype)


def ddim_step(schedule: Schedule, x: jax.Array, model_output: jax.Array, t: jax.Array, prev_t: jax.Array,
              noise: jax.Array | None = None, *, eta: float = 0.0, clip_sample: bool = True,
              prediction: str = "epsilon") -> jax.Array:
    """One ``DDIMScheduler.step`` (``set_alpha_to_one=True``).

    Args:
      schedule: the training schedule.
      x: current samples ``x_t`` ``[B, H, W, C]``.
      model_output: the (guided) model output, shaped like ``x``: the noise or ``v`` (``prediction``).
      t: current timestep (scalar or ``[B]`` int).
      prev_t: ``t - T // steps`` (negative after the last step: ``alpha_bar = 1``).
      noise: standard normal noise shaped like ``x``; needed only when ``eta > 0``.
      eta: weight of the stochastic part (0 = deterministic DDIM, 1 = DDPM-like variance).
      clip_sample: clip the predicted ``x0`` to ``[-1, 1]`` (the predicted noise is not recomputed).
      prediction: what the model predicts, one of :data:`fadjax.diffusion.PREDICTIONS`.

    Returns:
      ``x_{prev_t}``, shaped like ``x``.
    """
    abar = _bcast(schedule.alphas_cumprod[t], x.ndim)
    abar_prev = _bcast(jnp.where(prev_t >= 0, schedule.alphas_cumprod[jnp.maximum(prev_t, 0)], 1.0), x.ndim)
    x0, eps = split_prediction(schedule, x, t, model_output, prediction)
    if clip_sample:
        x0 = jnp.clip(x0, -1.0, 1.0)
    variance = (1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev)
    std = eta * jnp.sqrt(variance)
    out = jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1.0 - abar_prev - std ** 2) * eps
    if eta > 0:
        out = out + std * noise
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------- randomness and guidance

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
               guidance_scale: float = 1.0, null_label: int | None = None,
               active: jax.Array | None = None) -> jax.Array:
    """The model's output (noise or ``v``), with classifier-free guidance when ``guidance_scale != 1``.

    Guidance evaluates the conditional and unconditional branches in one call on a doubled
    batch: ``out = out_uncond + s * (out_cond - out_uncond)`` (linear, so the same for any prediction).

    Args:
      eps_fn: the model function (see :func:`sample`).
      params: its parameters.
      x: ``[B, H, W, C]`` model input.
      t: ``[B]`` timesteps.
      labels: ``[B]`` class labels.
      guidance_scale: the guidance scale ``s``.
      null_label: the unconditional label (required when ``s != 1``).
      active: traced bool scalar: guide only where it is true (the conditional output alone, one model
        call on ``B`` images, otherwise); ``None`` = always guide.
    """
    if guidance_scale == 1.0:
        return eps_fn(params, x, t, labels)
    if null_label is None:
        raise ValueError("classifier-free guidance needs a null label: the run must have trained with "
                         "label dropout (cond.label_dropout > 0)")
    b = x.shape[0]

    def guided():
        both = eps_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                      jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
        cond, uncond = both[:b], both[b:]
        return uncond + guidance_scale * (cond - uncond)

    if active is None:
        return guided()
    return jax.lax.cond(active, guided, lambda: eps_fn(params, x, t, labels))


def check_guidance_interval(interval) -> tuple[float, float] | None:
    """``interval`` (a pair, or the config's ``"lo,hi"``) as ``(lo, hi)`` floats with ``0 <= lo < hi``
    (``hi`` may be ``inf``); None (or "none") stays None.

    Raises:
      ValueError: not a pair of numbers with ``0 <= lo < hi``.
    """
    from fadjax.config_lib import parse_guidance_interval
    try:
        return parse_guidance_interval(interval)
    except ValueError as e:
        raise ValueError(f"guidance_interval {e}") from None


def _in_interval(sigma: jax.Array, interval: jax.Array | None) -> jax.Array | None:
    """Whether guidance applies at noise level ``sigma`` (``lo < sigma <= hi``, ``interval = [lo, hi]``);
    None = everywhere."""
    if interval is None:
        return None
    return (sigma > interval[0]) & (sigma <= interval[1])


# ----------------------------------------------------------------------------- the compiled loops

@functools.partial(jax.jit, static_argnames=("eps_fn", "shape", "sampler", "steps", "eta", "guidance_scale",
                                             "null_label", "clip_sample", "prediction", "karras_sigmas"))
def _sample_jit(eps_fn, params, schedule, labels, keys, guidance_interval=None, *, shape, sampler, steps, eta,
                guidance_scale, null_label, clip_sample, prediction="epsilon", karras_sigmas=False):
    # guidance_interval: None or a traced [2] (lo, hi), so every interval shares one compilation.
    b = labels.shape[0]

    def model(x, t, sigma):  # t: scalar timestep of the whole batch; sigma: its noise level.
        return guided_eps(eps_fn, params, x, jnp.full((b,), t, t.dtype), labels, guidance_scale=guidance_scale,
                          null_label=null_label, active=_in_interval(sigma, guidance_interval))

    x_init = initial_noise(keys, shape)
    if sampler in ("ddpm", "ddim"):
        ts = timesteps(schedule.num_steps, sampler, steps)
        if sampler == "ddpm":
            prev = np.append(ts[1:], -1).astype(np.int32)
        else:
            prev = (ts - schedule.num_steps // len(ts)).astype(np.int32)
        ts, prev = jnp.asarray(ts), jnp.asarray(prev)
        table_sigmas = schedule_sigmas(schedule)

        def body(i, x):  # x: [B, H, W, C]
            t, pt = ts[i], prev[i]
            out = model(x, t, table_sigmas[t])
            if sampler == "ddpm":
                return ddpm_step(schedule, x, out, t, pt, _step_noise(keys, t, shape), clip_sample=clip_sample,
                                 prediction=prediction)
            noise = _step_noise(keys, t, shape) if eta > 0 else None
            return ddim_step(schedule, x, out, t, pt, noise, eta=eta, clip_sample=clip_sample, prediction=prediction)

        return jax.lax.fori_loop(0, len(ts), body, x_init)

    ts, sig = sigma_schedule(schedule, sampler, steps, karras_sigmas=karras_sigmas)
    if sampler == "dpmpp_2m":
        return _dpmpp_2m_loop(model, ts, sig, x_init, prediction)
    return _edm_loop(model, ts, sig, x_init, prediction, heun=sampler == "heun")


def _dpmpp_2m_loop(model, ts, sig, x_init, prediction):
    """DPM-Solver++(2M) on variance-preserving ``x`` (diffusers' midpoint form, first order at both ends)."""
    n = ts.shape[0]
    alpha = 1.0 / jnp.sqrt(sig ** 2 + 1.0)  # [n+1]
    sigma_vp = sig * alpha
    lam = jnp.log(alpha) - jnp.log(sigma_vp)  # log-SNR / 2; +inf at the final sigma 0.
    h = lam[1:] - lam[:-1]  # [n]
    ratio = sigma_vp[1:] / sigma_vp[:-1]  # 0 on the last step: it returns the predicted x0.
    phi = alpha[1:] * (jnp.exp(-h) - 1.0)
    idx = jnp.arange(n)
    second = (idx > 0) & (idx < n - 1)  # Step 0 has no history; the last step is first order (sigma 0).
    r0 = jnp.where(second, jnp.concatenate([jnp.ones((1,), h.dtype), h[:-1]]) / jnp.where(second, h, 1.0), 1.0)
    c1 = jnp.where(second, 0.5 * phi / r0, 0.0)  # Weight of the first difference D1 = (m0 - m1) / r0.

    def body(i, carry):
        x, m1 = carry
        m0 = _split_at_sigma(x, sig[i], model(x, ts[i], sig[i]), prediction)
        x = ratio[i] * x - phi[i] * m0 - c1[i] * (m0 - m1)
        return x.astype(x_init.dtype), m0

    x, _ = jax.lax.fori_loop(0, n, body, (x_init, jnp.zeros_like(x_init)))
    return x


def _edm_loop(model, ts, sig, x_init, prediction, *, heun: bool):
    """EDM's deterministic Euler (``heun=False``) or Heun sampler on ``x0 + sigma * eps``."""
    n = ts.shape[0]

    def denoised(x, i):  # x0 predicted at sigma[i] (model input x / sqrt(sigma^2 + 1)).
        s = sig[i]
        return _denoise_ve(x, s, model(x / jnp.sqrt(s ** 2 + 1.0), ts[i], s), prediction)

    def body(i, x):
        s, dt = sig[i], sig[i + 1] - sig[i]
        d = (x - denoised(x, i)) / s
        x_euler = x + d * dt
        if not heun:
            return x_euler

        def correct():  # Heun: the mean of the slopes at both ends of the step.
            d2 = (x_euler - denoised(x_euler, i + 1)) / sig[i + 1]
            return x + (d + d2) / 2.0 * dt

        # The last step ends at sigma 0, where the slope is undefined: Euler (EDM's Algorithm 1).
        return jax.lax.cond(i < n - 1, correct, lambda: x_euler)

    return jax.lax.fori_loop(0, n, body, x_init * sig[0])


def sample(eps_fn: EpsFn, params, schedule: Schedule, labels, *, shape: Sequence[int],
           keys: jax.Array | None = None, seed: int | None = None, image_ids: Sequence[int] | None = None,
           sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0,
           guidance_scale: float = 1.0, null_label: int | None = None, clip_sample: bool = True,
           prediction: str = "epsilon", karras_sigmas: bool = False,
           guidance_interval: tuple[float, float] | None = None) -> jax.Array:
    """Draws a batch of images with one jitted ``fori_loop`` over the sampler's steps.

    Args:
      eps_fn: pure ``eps_fn(params, x [B,H,W,C], t [B], labels [B] int32) -> output``: the model's raw
        output (the noise, or ``v`` with ``prediction="v_prediction"``). ``t`` is int32, except for
        ``euler``/``heun`` which pass fractional float32 timesteps. Compilations are cached per
        ``eps_fn`` object, so pass the same function each call.
      params: parameters passed to ``eps_fn``.
      schedule: the training schedule.
      labels: ``[B]`` int class labels.
      shape: shape of one image ``(H, W, C)``.
      keys: ``[B]`` per-image PRNG keys (see :func:`image_keys`); or give ``seed`` and ``image_ids``.
      seed: seed shared by the batch (with ``image_ids``).
      image_ids: ``[B]`` global image indices (with ``seed``).
      sampler: one of :data:`SAMPLERS` (see the module docstring).
      steps: sampler steps; ``None`` = all training steps (DDPM), 50 (DDIM), 25 (``dpmpp_2m``, ``euler``,
        ``heun``). Heun calls the model ``2 * steps - 1`` times (twice a step but the last).
      eta: DDIM's stochasticity (ignored by the others).
      guidance_scale: classifier-free guidance scale; 1 = plain conditional sampling.
      null_label: label of the unconditional branch (required when ``guidance_scale != 1``).
      clip_sample: DDPM/DDIM: clip each predicted ``x0`` to ``[-1, 1]`` (diffusers' default); the
        other samplers never clip.
      prediction: what ``eps_fn`` predicts, one of :data:`fadjax.diffusion.PREDICTIONS`.
      karras_sigmas: ``dpmpp_2m``: step on the Karras sigmas (``euler``/``heun`` always do; ignored by
        DDPM/DDIM).
      guidance_interval: ``(sigma_lo, sigma_hi)``: guide only where ``sigma_lo < sigma_t <= sigma_hi``
        (``sigma = sqrt((1 - abar) / abar)``), plain conditional elsewhere; None = at every step.

    Returns:
      ``[B, H, W, C]`` float32 samples (not clipped; images are meant to lie in the model's range).

    Raises:
      ValueError: an unknown sampler or prediction, bad steps or interval, missing keys or null label.
    """
    _check_sampler(sampler)
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
    if keys is None:
        if seed is None or image_ids is None:
            raise ValueError("give either keys or both seed and image_ids")
        keys = image_keys(seed, image_ids)
    labels = jnp.asarray(labels, jnp.int32)
    if keys.shape != labels.shape:
        raise ValueError(f"one key per label expected: keys {keys.shape}, labels {labels.shape}")
    if guidance_scale != 1.0 and null_label is None:
        raise ValueError("guidance_scale != 1 needs null_label (a run trained with label dropout)")
    resolve_steps(schedule.num_steps, sampler, steps)  # Validates steps before tracing.
    interval = check_guidance_interval(guidance_interval)
    if guidance_scale == 1.0:
        interval = None  # Nothing to limit: one compilation for every interval.
    interval = None if interval is None else jnp.asarray(interval, jnp.float32)
    return _sample_jit(eps_fn, params, schedule, labels, keys, interval, shape=tuple(int(s) for s in shape),
                       sampler=sampler, steps=steps, eta=float(eta), guidance_scale=float(guidance_scale),
                       null_label=None if null_label is None else int(null_label), clip_sample=bool(clip_sample),
                       prediction=prediction, karras_sigmas=bool(karras_sigmas) and sampler == "dpmpp_2m")


def to_uint8(x: jax.Array | np.ndarray) -> np.ndarray:
    """Clips ``[0, 1]`` images and converts them to uint8 (round to nearest)."""
    return np.asarray(np.round(np.clip(np.asarray(x, np.float32), 0.0, 1.0) * 255.0), np.uint8)
