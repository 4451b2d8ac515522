"""Pieces every training stage shares: devices, optimizer, checkpoints, logs, progress."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fadjax import checkpoints
from fadjax import config_lib
from fadjax import distributed
from fadjax import workdir as workdir_lib

DATA_AXIS = "data"


class TrainState(train_state.TrainState):
    """Flax TrainState plus an EMA of the parameters and BatchNorm statistics (both optional)."""

    ema_params: Any = None
    batch_stats: Any = None


class NonFiniteLossError(RuntimeError):
    """Raised the moment a step produced a non-finite loss or gradient."""


def log_topology() -> None:
    """Logs the process/device topology (what runs where)."""
    logging.info("JAX %s on %s: process %d of %d, %d local / %d global devices: %s",
                 jax.__version__, jax.default_backend(), jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count(),
                 ", ".join(sorted({d.device_kind for d in jax.devices()})))


# ----------------------------------------------------------------------------- devices

@dataclasses.dataclass
class Parallel:
    """How the global batch is spread over devices.

    ``sharded``: one ``jit`` over a 1-D mesh of every device (all processes), the batch split on
    the ``data`` axis, everything else replicated. ``pmap``: the classic per-device program over the
    local devices with ``lax.pmean`` of the gradients.
    """

    mode: str
    mesh: Mesh
    num_devices: int

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch_sharded(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(DATA_AXIS))

    def put_replicated(self, tree):
        """Places host values on every device: replicated (sharded) or stacked per device (pmap)."""
        if self.mode == "pmap":
            n = self.num_devices
            stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree)
            return jax.device_put(stacked, self.batch_sharded)
        target = self.replicated

        def put(x):
            if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(target, x.ndim):
                return x
            if jax.process_count() > 1:
                return jax.make_array_from_process_local_data(target, np.asarray(x))
            return jax.device_put(x, target)

        return jax.tree.map(put, tree)

    def abstract_replicated(self, tree):
        """``put_replicated``'s placement without values: ``jax.ShapeDtypeStruct`` leaves with its shapes and
        shardings (for lowering a step on abstract inputs)."""
        def spec(x):
            x = jax.ShapeDtypeStruct(np.shape(x), x.dtype) if hasattr(x, "dtype") else np.asarray(x)
            shape = ((self.num_devices,) if self.mode == "pmap" else ()) + tuple(x.shape)
            sharding = self.batch_sharded if self.mode == "pmap" else self.replicated
            return jax.ShapeDtypeStruct(shape, x.dtype, sharding=sharding)
        return jax.tree.map(spec, tree)

    def unreplicate(self, tree):
        """The one copy of a replicated pytree (the first device's under pmap)."""
        if self.mode == "pmap":
            return jax.tree.map(lambda x: x[0], tree)
        return tree


def make_parallel(config, global_batch: int) -> Parallel:
    """Builds the device mesh and checks that the batch splits evenly, before anything compiles."""
    if config.parallel == "pmap":
        if jax.process_count() > 1:
            raise config_lib.ConfigError("config.parallel: 'pmap' runs on one process; use 'sharded' with several processes")
        devices = jax.local_devices()
    else:
        devices = jax.devices()
    if config.get("num_devices") is not None:
        if config.num_devices > len(devices):
            raise config_lib.ConfigError(
                f"config.num_devices: {config.num_devices} requested, {len(devices)} available")
        devices = devices[: config.num_devices]
    n = len(devices)
    if global_batch % n:
        raise config_lib.ConfigError(
            f"config.train.batch_size: {global_batch} does not divide over {n} devices "
            f"({config.parallel}); use a multiple of {n}")
    return Parallel(config.parallel, Mesh(np.asarray(devices), (DATA_AXIS,)), n)


# ----------------------------------------------------------------------------- optimizer

def run_length(train_cfg, steps_per_epoch: int) -> int:
    """Total optimizer steps from ``train.num_steps`` or ``train.num_epochs``."""
    if train_cfg.num_steps is not None:
        return int(train_cfg.num_steps)
    return int(train_cfg.num_epochs) * steps_per_epoch


def lr_hparams(o, *, steps_per_epoch: int, total_steps: int) -> dict[str, np.ndarray]:
    """The numbers of ``config.optim``'s learning-rate schedule, as float32 scalars.

    They are runtime arguments of a compiled step (see :func:`learning_rate`), not constants inside
    it: runs that differ only in their length or learning rate share one compiled program (and the
    persistent compilation cache's entry).
    """
    f = np.float32
    return {"lr": f(o.lr), "warmup": f(o.warmup_steps), "total": f(total_steps),
            "steps_per_epoch": f(steps_per_epoch), "gamma": f(o.step_gamma),
            "epochs": f(max(math.ceil(total_steps / steps_per_epoch), 1))}


def learning_rate(schedule: str, step, hp: dict):
    """The learning rate at ``step`` of ``schedule`` (``config.optim.schedule``) with numbers ``hp``.

    ``constant``; ``cosine`` (per step, to 0 at the last step); ``cosine_epoch`` (cosine annealing
    stepped once per epoch, as torch ``CosineAnnealingLR(T_max=epochs)``); ``step_epoch`` (``lr *
    gamma ** epoch``). With ``warmup`` steps the rate first rises linearly from 0 and the schedule
    then starts at ``step - warmup`` (optax ``join_schedules``).
    """
    if schedule not in config_lib.LR_SCHEDULES:
        raise config_lib.ConfigError(f"config.optim.schedule: unknown {schedule!r}")
    step = jnp.asarray(step).astype(jnp.float32)
    lr, warm = hp["lr"], hp["warmup"]
    s = jnp.maximum(step - warm, 0.0)
    if schedule == "constant":
        main = lr
    elif schedule == "cosine":
        decay = jnp.maximum(hp["total"] - warm, 1.0)
        main = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(s, decay) / decay))
    elif schedule == "cosine_epoch":
        epoch = jnp.minimum(jnp.floor(s / hp["steps_per_epoch"]), hp["epochs"])
        main = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / hp["epochs"]))
    else:  # step_epoch
        main = lr * hp["gamma"] ** jnp.floor(s / hp["steps_per_epoch"])
    return jnp.where(step < warm, lr * step / jnp.maximum(warm, 1.0), main)


def make_optimizer(o) -> optax.GradientTransformation:
    """Adam's update direction (AdamW's with ``weight_decay`` > 0), after optional global-norm clipping.

    The learning rate is not part of it: the step multiplies the update by ``-learning_rate(...)``
    (see :func:`apply_gradients_if_finite`), which with this chain is exactly ``optax.adam(w)``.
    """
    parts = []
    if o.grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
    parts.append(optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps))
    if o.weight_decay > 0:
        parts.append(optax.add_decayed_weights(o.weight_decay))
    return optax.chain(*parts)


def ema_decay_at(step, ema_decay: float, *, warmup: bool):
    """The EMA decay used at ``step`` (0-based): ``min(ema_decay, (1 + step) / (10 + step))`` with warm-up.

    Without warm-up a short run's EMA is mostly its random initialisation (decay 0.999 leaves
    0.999^1000 = 37% of the initial draw after 1000 steps); with it the EMA follows the parameters
    closely at first (0.1 at step 0, 0.5 at step 8, 0.9 at step 80) and settles at ``ema_decay``.
    """
    ema_decay = jnp.asarray(ema_decay, jnp.float32)
    if not warmup:
        return ema_decay
    step = jnp.asarray(step).astype(jnp.float32)
    return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def power_ema_gamma(sigma_rel: float) -> float:
    """EDM2's power-function EMA exponent for a relative length ``sigma_rel`` (Karras et al. 2024, eq. 3:
    ``sigma_rel = sqrt((g + 1) / ((g + 2)^2 (g + 3)))``), solved for ``g`` (a cubic, one real root > 0).

    Raises:
      ValueError: ``sigma_rel`` outside (0, 0.28) (at ``g`` -> 0 it tends to ``sqrt(1/12)`` = 0.289).
    """
    if not 0.0 < sigma_rel < 0.28:
        raise ValueError(f"ema sigma_rel must be in (0, 0.28), got {sigma_rel}")
    # (g + 2)^2 (g + 3) sigma_rel^2 - (g + 1) = 0.
    s2 = sigma_rel ** 2
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    real = [r.real for r in roots if abs(r.imag) < 1e-9 and r.real > 0]
    return float(max(real))


def power_ema_decay_at(step, gamma):
    """The power-function EMA's decay at ``step`` (0-based): ``(1 - 1 / (step + 1)) ** (gamma + 1)``.

    The average's length grows with the run (its weight on the past is a power of the step, EDM2), so
    a short fine-tuning and a long training each average over the same share of their own steps; the
    first update copies the parameters (decay 0).
    """
    t = jnp.asarray(step).astype(jnp.float32) + 1.0
    return (1.0 - 1.0 / t) ** (jnp.asarray(gamma, jnp.float32) + 1.0)


def apply_gradients_if_finite(state: TrainState, grads, loss, *, lr, ema_decay=None,
                              ema_warmup: bool = False, ema_power=None, **extra):
    """Applies the update ``-lr * tx(grads)`` (and the EMA) only when loss and gradients are finite.

    A non-finite step leaves the state as it was; the returned flag lets the host stop the run
    naming that step, with the last good parameters intact. The EMA's decay follows
    :func:`ema_decay_at` of the state's step, or :func:`power_ema_decay_at` when ``ema_power`` (the
    exponent gamma) is given. ``lr``, ``ema_decay`` and ``ema_power`` may be traced values.
    """
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(state):
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
        new = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state, **extra)
        if ema_decay is not None or ema_power is not None:
            decay = (power_ema_decay_at(state.step, ema_power) if ema_power is not None
                     else ema_decay_at(state.step, ema_decay, warmup=ema_warmup))
            new = new.replace(ema_params=jax.tree.map(
                lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, new.params))
        return new

    # A conditional, not a select of old and new: XLA then updates the donated state in place (a select
    # made it copy every parameter, Adam moment and EMA leaf first: 11.1 -> 8.0 ms at the cpu preset's size).
    new = jax.lax.cond(finite, update, lambda state: state, state)
    # The step counter always advances so the host can name the failing step.
    new = new.replace(step=state.step + 1)
    return new, finite, grad_norm


def summarise_steps(buf: list[dict], par: Parallel, *, step: int, ckpt: checkpoints.Checkpointer) -> dict[str, float]:
    """Means of the metrics of the steps in ``buf`` (the last ending at ``step``).

    Raises:
      NonFiniteLossError: naming the first step whose loss or gradient was not finite (its update
        was not applied) and the last checkpoint, which holds only finite parameters.
    """
    rows = jax.device_get(buf)
    if par.mode == "pmap":
        rows = [{k: v[0] for k, v in r.items()} for r in rows]
    first = step - len(rows) + 1
    bad = [i for i, r in enumerate(rows) if r["finite"] < 1]
    if bad:
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {first + bad[0]} (loss {rows[bad[0]]['loss']}); stopped; "
            f"the last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}")
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "finite"}


@contextlib.contextmanager
def guarded_workdir(workdir: pathlib.Path, config, *, what: str):
    """The run's hold on ``workdir``: its lock, SIGTERM's stop flag, and the config-drift check.

    Yields the config changes accepted on resume (with those recorded before) for ``run.json``.
    """
    with workdir_lib.WorkdirLock(workdir, what=what), workdir_lib.install_preemption():
        changes = []
        if checkpoints.saved_steps(workdir / "checkpoints"):
            changes = workdir_lib.check_config_drift(workdir, config,
                                                     allow=bool(config.train.get("allow_config_change", False)))
        yield changes


class MetricWriter:
    """``metrics.jsonl`` (one JSON object per logged step) and TensorBoard events, process 0 only."""

    def __init__(self, workdir: pathlib.Path, *, resume_step: int = 0):
        self.enabled = distributed.is_main_process()
        self.path = workdir / "metrics.jsonl"
        self._tb = None
        if not self.enabled:
            return
        if self.path.exists():  # Drop lines logged after the checkpoint we resume from.
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(workdir / "tb"))
        except ImportError:  # TensorBoard events are optional.
            logging.info("tensorboardX not installed: no TensorBoard events")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A tqdm bar with ETA on a terminal (process 0); periodic log lines otherwise."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool = True):
        self.bar = None
        if enabled and distributed.is_main_process() and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, n: int, postfix: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Timer:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


class Phases:
    """Wall time of a run's set-up, phase by phase: ``with phases("init"): ...``; each end is logged.

    ``times`` (seconds by phase, in order) goes into the stage's summary, so a slow start shows where
    its time went (data, models, expert, init, restore, placement, compile).
    """

    def __init__(self, stage: str):
        self.stage = stage
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.times[name] = round(self.times.get(name, 0.0) + dt, 3)
        logging.info("%s set-up: %s took %.1fs", self.stage, name, dt)


def run_init(fn: Callable, *args):
    """``jax.jit(fn)(*args)`` for a program that draws every parameter at random (model init).

    Such a program holds one random draw per parameter array and its compile time grows with their
    number (jax-ml/jax#1756), while it runs once, in milliseconds. On a CPU it is therefore compiled
    without backend optimisation (measured on 2 cores for a 241-array U-Net: 19.8 s -> 9.3 s; the
    draws are the same). On a GPU the draws are lowered to JAX's CUDA threefry kernel instead
    (``jax_threefry_gpu_kernel_lowering``, the same bits by construction), set for this call and this
    thread only; should that fail, the plain lowering runs. Pass keys as ``args`` (not closed over):
    models of one architecture then share the compiled program (and the persistent cache's entry).
    """
    if jax.default_backend() == "gpu":
        try:
            from jax._src import config as jax_config  # The flag's thread-local context manager.
            with jax_config.threefry_gpu_kernel_lowering(True):
                return jax.block_until_ready(jax.jit(fn)(*args))
        except Exception as e:  # noqa: BLE001  (an optimisation only: fall back to the default lowering)
            logging.warning("init with the CUDA threefry kernel failed (%s); using XLA's lowering", repr(e)[:200])
    if jax.default_backend() == "cpu":
        compiled = jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})
        return jax.block_until_ready(compiled(*args))
    return jax.block_until_ready(jax.jit(fn)(*args))
