"""The one training loop every stage runs: its compiled data-parallel step, resume, and the
log / evaluate / checkpoint / preemption loop.

A stage gives :func:`data_parallel_step` how to draw its global batch and compute its gradients,
and :func:`run` its compiled step, its checkpoint tree and, optionally, an evaluation; the loop
does the rest the same way for the expert and every diffusion model.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import logging

from fadjax import checkpoints
from fadjax import distributed
from fadjax import workdir as workdir_lib
from fadjax.data import host_feed
from fadjax.data import pipeline
from fadjax.train import common


def data_parallel_step(par: common.Parallel, *, draw: Callable, compute: Callable, finish: Callable,
                       localize: Callable | None = None):
    """The compiled step ``(state, data, consts) -> (state, metrics)`` for ``par`` (sharded or pmap).

    Args:
      par: the devices and how the batch is split over them.
      draw: ``draw(step, data) -> batch`` (a tuple of ``[B, ...]`` arrays): the GLOBAL batch of a step,
        from the device-resident ``data``; it depends only on the seed and the step, so every layout
        of devices sees the same batch.
      compute: ``compute(state, batch, consts) -> out`` (a pytree holding the gradients and the
        metrics) on the batch, or on each device's share of it under pmap, where ``out`` is averaged
        over devices (``pmean``).
      finish: ``finish(state, out, consts) -> (state, metrics)``: the update.
      localize: under pmap, ``localize(local_batch, num_devices) -> local_batch`` after the split
        (e.g. rescaling per-example weights that sum to 1 over the global batch).
    """
    if par.mode == "sharded":
        def step(state, data, consts):
            batch = jax.lax.with_sharding_constraint(draw(state.step, data), par.batch_sharded)
            return finish(state, compute(state, batch, consts), consts)

        return jax.jit(step, donate_argnums=(0,), out_shardings=(par.replicated, par.replicated))

    n = par.num_devices

    def pstep(state, data, consts):
        batch = draw(state.step, data)
        i = jax.lax.axis_index(common.DATA_AXIS)
        local = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, i * (a.shape[0] // n), a.shape[0] // n), batch)
        if localize is not None:
            local = localize(local, n)
        out = jax.lax.pmean(compute(state, local, consts), common.DATA_AXIS)
        return finish(state, out, consts)

    return jax.pmap(pstep, axis_name=common.DATA_AXIS, donate_argnums=(0,))


def place_data(config, par: common.Parallel, data: dict, sources: Sequence[pipeline.Source], *, start: int,
               total: int):
    """The training data where the step reads it, on the path ``data.placement`` picks (logged).

    Returns ``(device_data, feed, record)``: on the device path the arrays on every device and no feed; on
    the host path no device data and a started :class:`fadjax.data.host_feed.HostFeed` whose ``get(step)``
    is the step's ``data`` argument. ``record`` (``{"path", "why"}``) goes into the run's record.
    """
    d = config.data
    path, why = host_feed.choose_placement(d.get("placement", "auto"), host_feed.data_bytes(data),
                                           share=float(d.get("device_share", 0.25)))
    logging.info("input path: %s (%s)", path, why)
    record = {"path": path, "why": why}
    if path == "device":
        return par.put_replicated(jax.tree.map(np.asarray, data)), None, record
    if start >= total:  # Nothing to train: nothing to read.
        return None, None, record
    feed = host_feed.HostFeed(pipeline.RunKeys(config.seed), data, sources, par, start=start, stop=total,
                              depth=int(d.get("prefetch", 4)))
    return None, feed, record


def restore(ckpt: checkpoints.Checkpointer, state, par: common.Parallel, *, start: int,
            to_tree: Callable[[Any], dict]):
    """``(step, state, meta)`` resumed from the newest readable checkpoint at or below ``start``.

    ``state`` may hold only shapes (``jax.eval_shape``); ``to_tree(state)`` is what a checkpoint
    holds (a dict of some of the state's fields, ``step`` among them), restored onto this
    process's devices (replicated when sharded, the first local device under pmap).
    """
    sharding = (par.replicated if par.mode == "sharded"
                else jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    step, tree, meta = ckpt.restore_readable(checkpoints.abstract_like(to_tree(state), sharding), at_most=start)
    return step, state.replace(**tree), meta


def run(*, workdir, train_cfg, par: common.Parallel, state, step_fn, step_args: tuple,
        ckpt: checkpoints.Checkpointer, start: int, total: int, steps_per_epoch: int, desc: str,
        shown: tuple[str, ...], to_tree: Callable[[Any], dict], meta: dict | None = None,
        eval_every: int | None = None, evaluate: Callable[[int, Any], dict] | None = None,
        feed: host_feed.HostFeed | None = None) -> dict:
    """Trains from ``start`` to ``total`` steps; returns ``{"final_step", "last_metrics"}``.

    Every ``train_cfg.log_every`` steps (and at each checkpoint) the steps' metrics are checked for
    non-finite values and written (``metrics.jsonl``, TensorBoard, the progress bar); a checkpoint
    (``to_tree`` of the host state, and ``meta`` with the step and the last metrics) is saved every
    ``train_cfg.checkpoint_every`` steps, at every multiple of ``ckpt.keep_period`` (kept whatever
    ``keep_checkpoints`` says), at every evaluation and at the end. ``evaluate(step, state)
    -> metrics`` runs every ``eval_every`` steps and at the end. SIGTERM (``fadjax.workdir``) saves the
    current step on every process and raises ``Preempted``. With a ``feed`` (the host input path) each
    step's first argument after the state is ``feed.get(step)``, followed by ``step_args``; the feed is
    closed at the end.
    """
    t = train_cfg
    writer = common.MetricWriter(workdir, resume_step=start)
    progress = common.Progress(total, start, desc=desc, enabled=t.progress)
    buf: list[dict] = []
    step, last = start, {}
    timer = common.Timer()
    try:
        while step < total:
            if feed is None:
                state, metrics = step_fn(state, *step_args)
            else:
                state, metrics = step_fn(state, feed.get(step), *step_args)
            buf.append(metrics)
            step += 1
            stop = workdir_lib.stop_requested()  # SIGTERM: every process saves this step and stops.
            do_eval = evaluate is not None and (step % eval_every == 0 or step == total)
            save_now = saves_checkpoint(step, total=total, every=t.checkpoint_every,
                                        keep_period=ckpt.keep_period) or do_eval or stop
            if step % t.log_every == 0 or save_now:
                last = common.summarise_steps(buf, par, step=step, ckpt=ckpt)
                last["img_per_s"] = len(buf) * t.batch_size / timer.lap()
                last["epoch"] = step / steps_per_epoch
                logged, buf = len(buf), []
                if do_eval:
                    last.update(evaluate(step, state))
                writer.write(step, last)
                progress.update(logged, {k: last[k] for k in shown if k in last})
                if not progress.bar:
                    logging.info("step %d/%d %s", step, total, {k: round(v, 5) for k, v in last.items()})
            if save_now:
                ckpt.save(step, to_tree(par.unreplicate(state)), {"step": step, **(meta or {}), **last})
            if stop:
                ckpt.wait()
                raise workdir_lib.preempted_error(step, ckpt.directory)
    finally:
        if feed is not None:
            feed.close()
        progress.close()
        writer.close()
        ckpt.wait()
    return {"final_step": step, "last_metrics": last}


def saves_checkpoint(step: int, *, total: int, every: int, keep_period: int | None = None) -> bool:
    """Whether the loop saves a checkpoint after ``step`` (1-based): every ``every`` steps, every multiple of
    ``keep_period`` (the evenly kept ones, ``train.keep_evenly``) and at the end (evaluations and a SIGTERM
    save too)."""
    return step % every == 0 or step == total or bool(keep_period and step % keep_period == 0)


def compile_for(step_fn, state, step_args: tuple, *, phases: common.Phases, barrier: str):
    """``step_fn`` compiled ahead of time for these arguments (timed as the ``compile`` phase); then every
    process waits at ``barrier`` (outside that phase: a wait, not compiling)."""
    with phases("compile"):
        compiled = step_fn.lower(state, *step_args).compile()
    distributed.wait_for_all_processes(barrier)
    return compiled
