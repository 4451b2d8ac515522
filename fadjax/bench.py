"""Benchmarks of the real train step and the batched sampler: one JSON line per measurement.

    python -m fadjax.bench --what train_step --config configs/feature_aligned.py --batch 64 \
        --dtype bfloat16 --attention cudnn
    python -m fadjax.bench --what sample --config configs/feature_aligned.py --batch 70 --steps 50
    python -m fadjax.bench --what train_step --config configs/feature_aligned.py --max_batch   # GPU
    python -m fadjax.bench --what all --config configs/feature_aligned.py:tiny                # CPU, seconds
    python -m fadjax.bench --what plan --config configs/feature_aligned.py:fast   # CPU: a plan per accelerator

``train_step`` times the trainer's own compiled step (``diffusion_stage.make_loss_fn``,
``make_draw_fn``, ``make_train_step``: U-Net, the frozen expert on ``x_t``, ``W_p``, cosine loss,
Adam, the finite-step guard) with every weight randomly initialised, a random expert
(``--expert_arch``) in place of a trained one and synthetic uint8 images already on the device;
``baseline_step`` is the same step with the alignment compiled out; ``sample`` times the batched
sampler (``fadjax.sampling``) over the U-Net. Each prints one JSON line (``bench/README.md`` says
what every field means); ``--jsonl`` also appends it to a file. Compilation is excluded from the
timings: after ``--warmup`` calls, ``--repeats`` loops of ``--iters`` calls are each timed with
``jax.block_until_ready`` at the end, and ``step_time_ms`` is the median over the loops.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import re
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fadjax import config_lib
from fadjax import diffusion as diffusion_lib
from fadjax import workdir as workdir_lib
from fadjax.models import attention as attention_lib

WHATS = ("train_step", "baseline_step", "sample")
# Dense bf16 matrix rates (TFLOP/s) that MFU is stated against: the H100/H200 SXM datasheet figure, and
# an 8192^3 bf16 matmul measured through PyTorch on an H200 SXM (2026-10/11).
PEAK_TFLOPS = {"H200": {"spec": 989.4, "measured": 790.0}, "H100": {"spec": 989.4, "measured": None}}
_FMHA = re.compile(r'custom_call_target="([^"]*fmha[^"]*)"')
_HOST_CALLS = re.compile(r'custom_call_target="[^"]*(?:callback|host)[^"]*"|\b(?:infeed|outfeed|send|recv)\(',
                         re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Timing:
    """How many calls to run: ``warmup`` untimed, then ``repeats`` timed loops of ``iters``."""

    warmup: int = 3
    iters: int = 10
    repeats: int = 3


class OutOfMemory(RuntimeError):
    """The device ran out of memory compiling or running a benchmark."""


# ----------------------------------------------------------------------------- configs and devices

def prepare_config(config, *, what: str, batch: int, dtype: str | None = None,
                   attention: str | None = None, expert_arch: str | None = "resnet50") -> ml_collections.ConfigDict:
    """A copy of ``config`` set up for ``what`` (batch, dtype, attention, alignment on/off), validated.

    ``attention='cudnn'`` on a backend without cuDNN falls back to ``'xla'`` (with a warning).
    """
    c = ml_collections.ConfigDict(config.to_dict())
    c.train.batch_size = int(batch)
    if dtype is not None:
        c.dtype = dtype
    if attention is not None:
        c.model.attention = attention
    if c.model.attention == "cudnn" and jax.default_backend() != "gpu":
        logging.warning("attention 'cudnn' needs a GPU; using 'xla' on %s", jax.default_backend())
        c.model.attention = "xla"
    if not c.data.source:  # The benchmark draws synthetic images; the source is never read.
        c.data.source = "demo"
    c.align.enabled = what == "train_step"  # Sampling never runs the expert.
    if c.align.enabled:  # The random expert stands in for a trained run.
        c.align.expert_workdir = f"<random {expert_arch}>"
    config_lib.validate(c)
    return c


def environment() -> dict[str, Any]:
    """Device, backend, library versions, date and XLA settings of this process."""
    d = jax.devices()[0]
    return {"device": d.device_kind, "device_name": str(d), "backend": jax.default_backend(),
            "num_devices": jax.device_count(), **workdir_lib.versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")}


def peak_tflops(device_kind: str) -> dict[str, float | None]:
    """The stated bf16 peaks for a device kind (None where this file states none)."""
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_kind:
            return dict(peaks)
    return {"spec": None, "measured": None}


def memory_stats() -> dict[str, int] | None:
    """``memory_stats()`` of the first device (None on backends without it, e.g. CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001  (unimplemented on some backends)
        return None
    return dict(stats) if stats else None


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 3)


def _is_oom(e: Exception) -> bool:
    msg = str(e)
    return "RESOURCE_EXHAUSTED" in msg or "Out of memory" in msg or "out of memory" in msg


# ----------------------------------------------------------------------------- compiled programs

def _cost(stage) -> dict[str, float]:
    """``cost_analysis()`` of a Lowered or Compiled as one dict (older JAX returns a list)."""
    try:
        cost = stage.cost_analysis()
    except Exception as e:  # noqa: BLE001
        logging.warning("cost analysis unavailable: %s", e)
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


@contextlib.contextmanager
def record_attention():
    """Counts the implementation every U-Net attention call picks while tracing inside the block.

    Yields a `collections.Counter` ({'xla': 6, 'chunked': 6}, ...). Only tracing counts: a function
    jit has already traced and cached is not traced again. Not thread-safe (it swaps the module's
    ``attention`` for a counting one while the block runs).
    """
    counts: collections.Counter = collections.Counter()
    original = attention_lib.attention

    def counted(q, k, v, implementation):
        counts[attention_lib.choose(q.shape, k.shape[1], implementation)[0]] += 1
        return original(q, k, v, implementation)

    attention_lib.attention = counted
    try:
        yield counts
    finally:
        attention_lib.attention = original


def inspect_compiled(compiled, attention_calls: dict | None = None) -> dict[str, Any]:
    """FLOPs, bytes, program memory, attention implementation and host calls of a compiled program.

    ``attention_calls``: the implementations the U-Net's attention calls picked while the program was
    traced (``record_attention``); 'cudnn' is reported only when the HLO holds cuDNN's fused call.
    """
    cost = _cost(compiled)
    hlo = compiled.as_text()
    fmha = _FMHA.findall(hlo)
    calls = {k: int(v) for k, v in sorted((attention_calls or {}).items()) if v}
    out = {"flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed"),
           "attention": "cudnn" if fmha else ("chunked" if calls.get("chunked") else "xla"),
           "attention_calls": calls, "cudnn_fmha_calls": len(fmha),
           "host_calls": len(_HOST_CALLS.findall(hlo)), "program_bytes": None}
    try:
        m = compiled.memory_analysis()
        out["program_bytes"] = int(m.argument_size_in_bytes + m.output_size_in_bytes
                                   + m.temp_size_in_bytes - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001  (not every backend reports it)
        pass
    return out


def _time(run: Callable[[int], None], timing: Timing) -> list[float]:
    """Seconds per call of each timed loop; ``run(n)`` makes n calls and blocks on the last result."""
    if timing.warmup:
        run(timing.warmup)
    per_call = []
    for _ in range(timing.repeats):
        t0 = time.perf_counter()
        run(timing.iters)
        per_call.append((time.perf_counter() - t0) / timing.iters)
    return per_call


def _result(what: str, config, *, batch: int, images_per_call: int, per_call: list[float], compile_s: float,
            info: dict, flops_model: float | None, extra: dict) -> dict[str, Any]:
    env = environment()
    step_s = statistics.median(per_call)
    flops = flops_model if flops_model else info["flops"]
    tflops = flops / step_s / 1e12 if flops else None
    peaks = peak_tflops(env["device"])
    chips = extra.get("devices_used", 1)
    stats = memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    out = {"what": what, "config": extra.pop("config_name", None), "batch": batch, "dtype": config.dtype,
           "attention_requested": config.model.attention, "attention": info["attention"],
           "attention_calls": info["attention_calls"],
           "img_per_s": round(images_per_call / step_s, 3), "step_time_ms": round(step_s * 1e3, 3),
           "step_time_ms_loops": [round(s * 1e3, 3) for s in per_call], "compile_s": round(compile_s, 2),
           "peak_bytes": peak, "peak_gib": _gib(peak), "bytes_limit": stats.get("bytes_limit"),
           "program_bytes": info["program_bytes"], "program_gib": _gib(info["program_bytes"]),
           "flops": info["flops"], "flops_model": flops_model,
           "tflops": None if tflops is None else round(tflops, 2),
           "peak_tflops_spec": peaks["spec"], "peak_tflops_measured": peaks["measured"],
           "mfu_spec": round(tflops / chips / peaks["spec"], 4) if tflops and peaks["spec"] else None,
           "mfu_measured": round(tflops / chips / peaks["measured"], 4) if tflops and peaks["measured"] else None,
           "cudnn_fmha_calls": info["cudnn_fmha_calls"], "host_calls": info["host_calls"],
           "bytes_accessed": info["bytes_accessed"], **extra, **env}
    return out


# ----------------------------------------------------------------------------- the train step

def _label_space(config, num_classes: int):
    from fadjax.models import build
    return build.LabelSpace(tuple(f"class_{i}" for i in range(num_classes)),
                            has_null=config.cond.label_dropout > 0)


def _text_features(config, labels, rng: np.random.Generator):
    """Random stand-ins for the CLIP text features ('clip' conditioning), else None."""
    if config.cond.mode != "clip":
        return None
    from fadjax.models import build
    feats = rng.standard_normal((labels.num_classes, 512)).astype(np.float32)
    return build.null_padded(feats, labels)


def host_random_init(shapes, rng: np.random.Generator):
    """Random numpy values for a tree of ShapeDtypeStructs: normal / sqrt(fan_in) for weights,
    ones for norm scales and BatchNorm variances, zeros for biases and BatchNorm means."""
    def leaf(path, s):
        name = getattr(path[-1], "key", "")
        if name in ("scale", "var"):
            return np.ones(s.shape, s.dtype)
        if name in ("bias", "mean"):
            return np.zeros(s.shape, s.dtype)
        fan_in = max(int(np.prod(s.shape[:-1])), 1)
        return (rng.standard_normal(s.shape, dtype=np.float32) / np.sqrt(fan_in)).astype(s.dtype)
    return jax.tree_util.tree_map_with_path(leaf, shapes)


_SHAPES: dict = {}  # Traced shapes by what determines them (tracing a full-size U-Net's init takes seconds).


def _shapes_once(key, fn):
    """``fn()`` the first time ``key`` is asked for, the same (immutable) shapes after."""
    if key not in _SHAPES:
        _SHAPES[key] = fn()
    return _SHAPES[key]


def model_param_shapes(model, config, text_features):
    """The ``{'unet', 'cond'}`` parameter tree of ``model`` as ShapeDtypeStructs (nothing computed)."""
    size, channels = config.data.image_size, config.data.channels
    fn = lambda: jax.eval_shape(lambda k: model.init(k, image_size=size, channels=channels,  # noqa: E731
                                                     text_features=text_features), jax.random.key(0))
    if text_features is not None:
        return fn()
    return _shapes_once(("params", repr(model), size, channels), fn)


def global_batch(config) -> int:
    """Images per train step: ``train.batch_size``, plus DreamBooth's prior images."""
    prior = int(config.dreambooth.prior_batch_size) if config.get("dreambooth") and config.dreambooth.enabled else 0
    return int(config.train.batch_size) + prior


def _make_step(config, model, expert, labels, *, data: dict):
    """The trainer's step for ``config``: ``make_train_step(make_loss_fn(...), draw)``, ``draw`` the plain
    stage's (``make_draw_fn``) or DreamBooth's (``dreambooth.make_draw``: instance and prior images) over
    ``data`` (values or shapes: only their lengths are read)."""
    from fadjax.data import pipeline
    from fadjax.train import common, diffusion_stage, dreambooth
    batch = config.train.batch_size
    num_examples = int(data["labels"].shape[0])
    spe = pipeline.steps_per_epoch(num_examples, batch)
    schedule = diffusion_lib.make_schedule(config.diffusion.num_train_timesteps, config.diffusion.beta_schedule)
    loss_fn = diffusion_stage.make_loss_fn(model, config, schedule, expert)
    if config.get("dreambooth") and config.dreambooth.enabled:
        lengths = {k: np.zeros(v.shape[0]) for k, v in data.items() if k.endswith("labels")}
        draw = dreambooth.make_draw(config, lengths, labels.null_label)
    else:
        draw = diffusion_stage.make_draw_fn(config, [pipeline.Source("train", num_examples, batch)],
                                            null_label=labels.null_label)
    step_fn = diffusion_stage.make_train_step(loss_fn, draw, common.make_parallel(config, global_batch(config)),
                                              schedule=config.optim.schedule,
                                              ema_warmup=bool(config.train.get("ema_warmup", False)))
    hp = diffusion_stage.step_hparams(config, steps_per_epoch=spe, total_steps=common.run_length(config.train, spe))
    return step_fn, common.make_optimizer(config.optim), hp


def build_train_step(config, *, expert_arch: str = "resnet50", expert_width: int | None = None,
                     num_classes: int = 8, num_examples: int | None = None, seed: int = 0):
    """The trainer's compiled step and its arguments, every weight random, data synthetic.

    Weights are drawn on the host (:func:`host_random_init`): compiling the modules' own
    initialisers takes longer than the step itself on a CPU, and the values do not change the timing.

    Returns:
      ``(step_fn, (state, data, consts), meta, make_step)``: ``step_fn`` is what ``make_train_step``
      returns (jitted, state donated); ``data`` is ``{'images' uint8 [N,H,W,C], 'labels' int32 [N]}``
      on the device(s); ``meta`` describes the setup; ``make_step(config)`` builds the same step for
      a variant of ``config`` (e.g. another attention implementation) over the same expert.
    """
    return _train_step_parts(config, expert_arch=expert_arch, expert_width=expert_width, num_classes=num_classes,
                             num_examples=num_examples, rng=np.random.default_rng(seed))


def abstract_train_step(config, *, expert_arch: str = "resnet50", expert_width: int | None = None,
                        num_classes: int = 8, num_examples: int | None = None):
    """:func:`build_train_step` with nothing allocated: its arguments are ``jax.ShapeDtypeStruct`` leaves
    carrying the step's shardings (replicated over the mesh, or stacked per device under pmap), for
    lowering (``step_fn.lower(*args)``, ``jax.export``) or cost analysis at any size. Only the run's
    scalars (``consts['hp']``) and CLIP text features stay values."""
    return _train_step_parts(config, expert_arch=expert_arch, expert_width=expert_width, num_classes=num_classes,
                             num_examples=num_examples, rng=None)


def _train_step_parts(config, *, expert_arch, expert_width, num_classes, num_examples, rng):
    """:func:`build_train_step` (``rng`` draws the weights and data) or :func:`abstract_train_step` (None)."""
    from fadjax import align as align_lib
    from fadjax.models import build
    from fadjax.models import expert as expert_lib
    from fadjax.train import common

    abstract = rng is None
    fill = (lambda shapes: shapes) if abstract else (lambda shapes: host_random_init(shapes, rng))
    batch = config.train.batch_size
    size, channels = config.data.image_size, config.data.channels
    n = max(int(num_examples or 4000), batch)  # 4000 = Kather's 80% training split.
    labels = _label_space(config, num_classes)
    text_features = _text_features(config, labels, rng if rng is not None else np.random.default_rng(0))
    par = common.make_parallel(config, global_batch(config))
    model = build.build_diffusion_model(build.unet(config), cond_mode=config.cond.mode, labels=labels)
    dtype = config_lib.compute_dtype(config)

    expert = None
    consts = {"text_features": text_features}
    meta = {"align": bool(config.align.enabled), "num_examples": n, "parallel": config.parallel,
            "devices_used": par.num_devices}
    params = {**fill(model_param_shapes(model, config, text_features))}
    if config.align.enabled:
        expert = expert_lib.build_expert(expert_arch, num_classes=None, dtype=dtype,
                                         **({"width": expert_width} if expert_width else {}))
        e_size = config.align.expert_resize or size
        x = jax.ShapeDtypeStruct((1, e_size, e_size, channels), jnp.float32)
        e_vars_shape = _shapes_once(("expert", repr(expert), e_size, channels), lambda: jax.eval_shape(
            lambda x: expert.init(jax.random.key(0), x, train=False), x))
        expert_vars = fill(e_vars_shape)
        e_shapes = _shapes_once(("expert features", repr(expert), e_size, channels), lambda: jax.eval_shape(
            lambda v, x: expert.apply(v, x, train=False)[1], e_vars_shape, x))
        u_shapes = _shapes_once(("features", repr(model), size, channels),
                                lambda: model.feature_shapes(image_size=size, channels=channels))
        d_in, d_out = align_lib.projector_io(config.align.get("mode", "pooled"),
                                             expert_dim=e_shapes[config.align.expert_feature].shape[-1],
                                             unet_dim=u_shapes[config.align.unet_feature][-1])
        proj = jax.eval_shape(lambda k: align_lib.init_projector(
            k, d_in, d_out, kind=config.align.get("projector", "linear"),
            hidden=config.align.get("projector_hidden", 256)), jax.random.key(0))
        params["proj"] = fill(proj)
        consts["expert"] = expert_vars
        meta.update(expert=f"random {expert_arch}" + (f" width {expert_width}" if expert_width else ""),
                    expert_params=sum(x.size for x in jax.tree.leaves(expert_vars["params"])),
                    unet_feature=config.align.unet_feature, projection=[d_in, d_out])
    meta["params"] = sum(x.size for x in jax.tree.leaves(params))
    meta["param_dtype"] = sorted({str(x.dtype) for x in jax.tree.leaves(params)})

    if abstract:
        data = {"images": jax.ShapeDtypeStruct((n, size, size, channels), jnp.uint8),
                "labels": jax.ShapeDtypeStruct((n,), jnp.int32)}
    else:
        data = {"images": rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8),
                "labels": rng.integers(0, num_classes, (n,)).astype(np.int32)}
    if config.get("dreambooth") and config.dreambooth.enabled and config.dreambooth.prior_batch_size:
        m = int(config.dreambooth.num_class_images)  # DreamBooth: the class-prior images beside the instance's.
        data["prior_images"] = (jax.ShapeDtypeStruct((m, size, size, channels), jnp.uint8) if abstract
                                else rng.integers(0, 256, (m, size, size, channels), dtype=np.uint8))
        data["prior_labels"] = (jax.ShapeDtypeStruct((m,), jnp.int32) if abstract
                                else rng.integers(0, num_classes, (m,)).astype(np.int32))

    def make_step(c):
        return _make_step(c, build.build_diffusion_model(build.unet(c), cond_mode=c.cond.mode, labels=labels), expert, labels, data=data)

    step_fn, tx, consts["hp"] = _make_step(config, model, expert, labels, data=data)
    from fadjax.train import diffusion_stage
    ema = diffusion_stage.uses_ema(config.train)

    @jax.jit
    def fresh_state(p):
        e = jax.tree.map(jnp.copy, p) if ema else None
        return common.TrainState.create(apply_fn=None, params=p, tx=tx, ema_params=e)

    if abstract:
        state = jax.eval_shape(fresh_state, params)
        return step_fn, par.abstract_replicated((state, data, consts)), meta, make_step
    state = fresh_state(params)
    state = par.put_replicated(state)
    data, consts = par.put_replicated((data, consts))
    return step_fn, (state, data, consts), meta, make_step


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def bench_train_step(config, *, timing: Timing, config_name: str | None = None, **build_kw) -> dict[str, Any]:
    """Compiles and times the train step of ``config`` (from :func:`prepare_config`).

    FLOPs for TFLOP/s and MFU (``flops_model``) come from XLA's cost analysis of the same step
    lowered (not compiled) with XLA attention, since a cuDNN fused-attention call counts no FLOPs in
    the compiled program's own analysis (``flops``).
    """
    t0 = time.perf_counter()
    step_fn, args, meta, make_step = build_train_step(config, **build_kw)
    setup_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        with record_attention() as calls:
            lowered = step_fn.lower(*args)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001
        if _is_oom(e):
            raise OutOfMemory(str(e)[:500]) from e
        raise
    info = inspect_compiled(compiled, calls)
    if config.model.attention == "xla":
        flops_model = _cost(lowered).get("flops")
    else:
        c = ml_collections.ConfigDict(config.to_dict())
        c.model.attention = "xla"
        flops_model = _cost(make_step(c)[0].lower(*_abstract(args))).get("flops")
    state, data, consts = args
    del args
    first_leaf = jax.tree.leaves(state.params)[0]
    box = {"state": state, "metrics": None}
    del state

    def run(n):
        for _ in range(n):
            box["state"], box["metrics"] = compiled(box["state"], data, consts)
        jax.block_until_ready(box["state"])

    try:
        run(1)
        donated = first_leaf.is_deleted()
        per_call = _time(run, timing)
    except Exception as e:  # noqa: BLE001
        if _is_oom(e):
            raise OutOfMemory(str(e)[:500]) from e
        raise
    metrics = jax.device_get(box["metrics"])
    if config.parallel == "pmap":
        metrics = {k: v[0] for k, v in metrics.items()}
    what = "train_step" if config.align.enabled else "baseline_step"
    extra = {"config_name": config_name, **meta, "donated": bool(donated), "setup_s": round(setup_s, 2),
             "loss": float(metrics["loss"]), "finite": bool(metrics["finite"] > 0),
             "warmup": timing.warmup, "iters": timing.iters, "repeats": timing.repeats}
    batch = config.train.batch_size
    return _result(what, config, batch=batch, images_per_call=batch, per_call=per_call, compile_s=compile_s,
                   info=info, flops_model=flops_model, extra=extra)


def search_max_batch(config, *, start: int, timing: Timing, time_budget_s: float = 240.0,
                     config_name: str | None = None, **build_kw) -> dict[str, Any]:
    """The largest train-step batch that runs: doubling from ``start`` until the device is out of memory.

    When two batches have run, their program sizes predict the largest batch that fits; a doubling
    predicted not to fit is replaced by that batch (a multiple of 8), and once that one has run the
    search stops (``stopped_by='prediction'``). It also stops after ``time_budget_s`` seconds.

    Returns:
      The result of the largest batch that ran, with ``max_batch``, ``predicted_max_batch``,
      ``stopped_by`` and every try (``tries``).
    """
    t_start = time.perf_counter()
    tries, best, predicted, stopped = [], None, None, None
    batch = start
    while True:
        c = ml_collections.ConfigDict(config.to_dict())
        c.train.batch_size = batch
        try:
            r = bench_train_step(c, timing=timing, config_name=config_name, **build_kw)
        except OutOfMemory as e:
            tries.append({"batch": batch, "ok": False, "error": str(e)[:200]})
            stopped = "out_of_memory"
            break
        finally:
            gc.collect()
        tries.append({"batch": batch, "ok": True, "img_per_s": r["img_per_s"], "program_bytes": r["program_bytes"],
                      "compile_s": r["compile_s"]})
        best = r
        limit = r.get("bytes_limit")
        sized = [(t["batch"], t["program_bytes"]) for t in tries if t["ok"] and t["program_bytes"]]
        if limit and len(sized) >= 2:
            (b0, m0), (b1, m1) = sized[-2], sized[-1]
            per_image = (m1 - m0) / (b1 - b0)
            if per_image > 0:
                predicted = int((limit - (m1 - per_image * b1)) / per_image) // 8 * 8
        if time.perf_counter() - t_start > time_budget_s:
            stopped = "time"
            break
        nxt = 2 * batch
        if predicted is not None and predicted < nxt:
            if predicted <= batch:
                stopped = "prediction"
                break
            nxt = predicted
        batch = nxt
    if best is None:
        raise OutOfMemory(f"batch {start} does not fit: {tries[-1]['error']}")
    best = dict(best)
    best.update(what="max_batch", step=best["what"], max_batch=best["batch"], predicted_max_batch=predicted,
                stopped_by=stopped, tries=tries, search_s=round(time.perf_counter() - t_start, 1))
    return best


# ----------------------------------------------------------------------------- sampling

def bench_sample(config, *, batch: int, steps: int | None, sampler: str | None, timing: Timing,
                 num_classes: int = 8, config_name: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Compiles and times the batched sampler (one jitted loop of ``steps`` steps) at ``batch``, with the
    config's prediction type, Karras sigmas and guidance interval.

    ``flops_model`` is the number of U-Net calls (``steps``; ``2 * steps - 1`` for Heun) times the FLOPs of
    one call at that batch (XLA attention), because the compiled loop's cost analysis counts its body once;
    it counts every call as guided, also outside a guidance interval.
    """
    from fadjax import sampling
    from fadjax.models import build

    sampler = sampler or config.sample.sampler
    steps = steps if steps is not None else config.sample.steps
    ts = sampling.timesteps(config.diffusion.num_train_timesteps, sampler, steps)
    size, channels = config.data.image_size, config.data.channels
    labels_space = _label_space(config, num_classes)
    text_features = _text_features(config, labels_space, np.random.default_rng(seed))
    guidance = float(config.sample.guidance_scale) if labels_space.has_null else 1.0
    schedule = diffusion_lib.make_schedule(config.diffusion.num_train_timesteps, config.diffusion.beta_schedule)

    def eps_fn_of(model):
        def eps_fn(params, x, t, labels):
            return model(params, x, t, labels, text_features)[0]
        return eps_fn

    model = build.build_diffusion_model(build.unet(config), cond_mode=config.cond.mode, labels=labels_space)
    params = jax.device_put(host_random_init(model_param_shapes(model, config, text_features),
                                             np.random.default_rng(seed)))
    eps_fn = eps_fn_of(model)
    labels = jnp.asarray(np.arange(batch) % num_classes, jnp.int32)
    keys = sampling.image_keys(seed, np.arange(batch))
    static = dict(eps_fn=eps_fn, shape=(size, size, channels), sampler=sampler, steps=len(ts), eta=0.0,
                  guidance_scale=guidance, null_label=labels_space.null_label if guidance != 1.0 else None,
                  clip_sample=True, prediction=config.diffusion.get("prediction", "epsilon"),
                  karras_sigmas=bool(config.sample.get("karras_sigmas", False)) and sampler == "dpmpp_2m")
    interval = config_lib.parse_guidance_interval(config.sample.get("guidance_interval"))
    interval = None if interval is None or guidance == 1.0 else jnp.asarray(interval, jnp.float32)
    model_calls = 2 * len(ts) - 1 if sampler == "heun" else len(ts)
    t0 = time.perf_counter()
    # The sampler's own jitted loop (what sampling.sample calls), lowered to time it without compiling.
    with record_attention() as calls:
        lowered = sampling._sample_jit.lower(params=params, schedule=schedule, labels=labels, keys=keys,
                                             guidance_interval=interval, **static)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    info = inspect_compiled(compiled, calls)

    flops_model = sample_flops(config, params, batch=batch, guided=guidance != 1.0, model_calls=model_calls,
                               labels=labels_space, text_features=text_features)

    box = {}

    def run(n):
        for _ in range(n):
            box["x"] = compiled(params=params, schedule=schedule, labels=labels, keys=keys, guidance_interval=interval)
        jax.block_until_ready(box["x"])

    per_call = _time(run, timing)
    call_s = statistics.median(per_call)
    extra = {"config_name": config_name, "sampler": sampler, "steps": len(ts),
             "guidance_scale": guidance, "unet_evals_per_s": round(model_calls / call_s, 3),
             "img_per_s_at_1000_steps": round(batch * len(ts) / call_s / 1000, 5),
             "finite": bool(np.isfinite(np.asarray(box["x"])).all()),
             "params": sum(v.size for v in jax.tree.leaves(params)),
             "warmup": timing.warmup, "iters": timing.iters, "repeats": timing.repeats}
    return _result("sample", config, batch=batch, images_per_call=batch, per_call=per_call, compile_s=compile_s,
                   info=info, flops_model=flops_model, extra=extra)


def sample_flops(config, params, *, batch: int, guided: bool, model_calls: int, labels, text_features=None):
    """FLOPs of one sampling call: ``model_calls`` U-Net calls on ``batch`` images (twice that many rows when
    ``guided``), each counted by XLA's cost analysis of one call lowered with XLA attention (not compiled:
    a compiled loop's analysis counts its body once). ``params`` may be ShapeDtypeStructs."""
    from fadjax.models import build
    c = ml_collections.ConfigDict(config.to_dict())
    c.model.attention = "xla"
    model = build.build_diffusion_model(build.unet(c), cond_mode=c.cond.mode, labels=labels)

    def xla_eps(params, x, t, y):
        return model(params, x, t, y, text_features)[0]

    size, channels = config.data.image_size, config.data.channels
    evals = batch * (2 if guided else 1)
    x = jax.ShapeDtypeStruct((evals, size, size, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((evals,), jnp.int32)
    per_eval = _cost(jax.jit(xla_eps).lower(params, x, t, t)).get("flops")
    return per_eval * model_calls if per_eval else None


# ----------------------------------------------------------------------------- plan (no accelerator)

# Accelerators a plan is made for: memory per chip (bytes, as sold: GB = 1e9, GiB = 2^30) and dense peak
# TFLOP/s per chip for bf16 and for float32 as JAX runs it by default (GPU: TF32 tensor cores; TPU: one bf16
# pass, the bf16 peak). Sources: NVIDIA H100 SXM and H200 SXM datasheets (2023/2024: bf16 989.4, TF32 494.7
# dense, 80 GB HBM3 / 141 GB HBM3e); Google Cloud TPU docs, "TPU v5e" and "TPU v4" system architecture pages
# (v5e: 197 bf16 TFLOP/s, 16 GiB HBM2 per chip; v4: 275 bf16 TFLOP/s, 32 GiB HBM2 per chip).
ACCELERATORS = {
    "H100": {"memory_bytes": 80 * 10**9, "peak_tflops": {"bfloat16": 989.4, "float32": 494.7},
             "source": "NVIDIA H100 SXM datasheet (dense; float32 = TF32)"},
    "H200": {"memory_bytes": 141 * 10**9, "peak_tflops": {"bfloat16": 989.4, "float32": 494.7},
             "source": "NVIDIA H200 SXM datasheet (dense; float32 = TF32)"},
    "TPU v5e": {"memory_bytes": 16 * 2**30, "peak_tflops": {"bfloat16": 197.0, "float32": 197.0},
                "source": "Google Cloud TPU v5e docs (per chip; float32 matmuls run as one bf16 pass by default)"},
    "TPU v4": {"memory_bytes": 32 * 2**30, "peak_tflops": {"bfloat16": 275.0, "float32": 275.0},
               "source": "Google Cloud TPU v4 docs (per chip; float32 matmuls run as one bf16 pass by default)"},
}
# Share of an accelerator's memory a program may use: JAX preallocates 75% by default, bench/run_h200.sh 90%.
USABLE_MEMORY = 0.90
# Share of peak FLOP/s the predicted step time assumes (an assumption, not a measurement: bench/results'
# plan markdown compares it with the H200 measurement of the paper's PyTorch step).
DEFAULT_SHARE = 0.35


def _linear(b0: int, y0: float, b1: int, y1: float) -> tuple[float, float]:
    """(fixed, per image) of a line through (b0, y0) and (b1, y1)."""
    per = (y1 - y0) / (b1 - b0)
    return y0 - per * b0, per


def plan(config, *, config_name: str | None = None, batch: int | None = None, share: float = DEFAULT_SHARE,
         expert_arch: str = "resnet50", expert_width: int | None = None, num_classes: int = 8,
         compile_memory: bool = True) -> dict[str, Any]:
    """What the train step and a sampling call of ``config`` need on an accelerator, computed on this machine.

    On one device at ``batch`` (default the config's) and at twice it: the state's bytes (parameters, Adam,
    EMA, the frozen expert); FLOPs (XLA's cost analysis of the lowered step, XLA attention) and program bytes
    (XLA's memory analysis of the step compiled for this CPU, attention sized as on a TPU or a GPU without
    cuDNN: ``attention.sized_as('tpu')``), each split into a per-step and a per-image part by the two batches;
    FLOPs per image of one sampling call at the config's sampler and steps; per accelerator of
    :data:`ACCELERATORS`, the largest batch whose program fits in ``USABLE_MEMORY`` of its memory and the step
    time at ``share`` of its peak FLOP/s. ``compile_memory=False`` skips the compiles (no memory numbers).
    """
    from fadjax import sampling
    from fadjax.models import build
    if not 0 < share <= 1:
        raise ValueError(f"share={share}: a fraction of peak FLOP/s in (0, 1]")
    b0 = int(batch or config.train.batch_size)
    b1 = 2 * b0
    dtype = config.dtype
    base = prepare_config(config, what="train_step" if config.align.enabled else "baseline_step", batch=b0,
                          expert_arch=expert_arch)
    base.num_devices, base.parallel = 1, "sharded"
    kw = dict(expert_arch=expert_arch, expert_width=expert_width, num_classes=num_classes)
    t_start = time.perf_counter()

    flops, program, sources = {}, {}, {}
    for b in (b0, b1):
        c = ml_collections.ConfigDict(base.to_dict())
        c.train.batch_size = b
        c.model.attention = "xla"
        step_fn, args, meta, _ = abstract_train_step(c, **kw)
        flops[b] = _cost(step_fn.lower(*args)).get("flops")
        if compile_memory:
            c.model.attention = config.model.attention if config.model.attention != "cudnn" else "auto"
            step_fn, args, _, _ = abstract_train_step(c, **kw)
            with attention_lib.sized_as("tpu"), record_attention() as calls:
                lowered = step_fn.lower(*args)
            program[b] = inspect_compiled(lowered.compile(), calls)["program_bytes"]
            sources[b] = dict(calls)
    state, data, consts = args

    def nbytes(tree):
        return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))

    out = {"what": "plan", "config": config_name, "batch": b0, "dtype": dtype, "devices_used": 1,
           "params": meta["params"], "param_bytes": nbytes(state.params), "opt_state_bytes": nbytes(state.opt_state),
           "ema_bytes": nbytes(state.ema_params), "expert": meta.get("expert"), "expert_params": meta.get("expert_params"),
           "expert_bytes": nbytes(consts.get("expert")), "data_bytes": nbytes(data)}
    out["state_bytes"] = out["param_bytes"] + out["opt_state_bytes"] + out["ema_bytes"]
    fixed, per = _linear(b0, flops[b0], b1, flops[b1]) if flops[b0] and flops[b1] else (None, None)
    out.update(train_flops={str(b): flops[b] for b in (b0, b1)}, train_flops_per_image=per,
               train_flops_per_step_fixed=fixed, train_flops_source="XLA cost analysis of the lowered step "
               "(XLA attention, one device)")

    s_cfg = config.sample
    sampler = s_cfg.sampler
    steps = sampling.resolve_steps(config.diffusion.num_train_timesteps, sampler, s_cfg.steps)
    labels = _label_space(config, num_classes)
    guided = labels.has_null and float(s_cfg.guidance_scale) != 1.0
    calls_per = 2 * steps - 1 if sampler == "heun" else steps
    model = build.build_diffusion_model(build.unet(base), cond_mode=base.cond.mode, labels=labels)
    text_features = _text_features(base, labels, np.random.default_rng(0))
    sb = int(s_cfg.batch_size)
    sf = sample_flops(base, model_param_shapes(model, base, text_features), batch=sb, guided=guided,
                      model_calls=calls_per, labels=labels, text_features=text_features)
    out["sample"] = {"sampler": sampler, "steps": steps, "unet_calls": calls_per, "guided": guided,
                     "batch": sb, "flops_per_image": sf / sb if sf else None,
                     "source": "XLA cost analysis of one lowered U-Net call x U-Net calls (every call counted "
                               "as guided when guidance is on)"}

    if compile_memory:
        m_fixed, m_per = (int(round(v)) for v in _linear(b0, program[b0], b1, program[b1]))
        out["memory"] = {
            "program_bytes": {str(b): program[b] for b in (b0, b1)}, "fixed_bytes": m_fixed,
            "per_image_bytes": m_per, "activation_bytes_at_batch": m_per * b0,
            "attention_calls": {str(b): sources[b] for b in (b0, b1)},
            "source": "compiled: XLA's memory analysis (arguments + outputs + temporaries - donated) of the step "
                      "compiled for this CPU, attention sized as on a TPU / a GPU without cuDNN; a GPU or TPU "
                      "compiler fuses and schedules differently, so it is an estimate"}
    peaks = {}
    for name, acc in ACCELERATORS.items():
        peak = acc["peak_tflops"]["bfloat16" if dtype == "bfloat16" else "float32"]
        row = {"memory_bytes": acc["memory_bytes"], "usable_bytes": int(USABLE_MEMORY * acc["memory_bytes"]),
               "peak_tflops": peak, "peak_source": acc["source"], "share_of_peak": share}
        if compile_memory and m_per > 0:
            fit = (row["usable_bytes"] - m_fixed) // m_per
            row["max_batch"] = max(fit, 0)
            row["max_batch_multiple_of_8"] = max(fit, 0) // 8 * 8
        if per is not None:
            step_flops = fixed + per * b0
            row["predicted_step_ms"] = float(f"{step_flops / (share * peak * 1e12) * 1e3:.4g}")
            row["predicted_img_per_s"] = float(f"{b0 / (step_flops / (share * peak * 1e12)):.4g}")
            if row.get("max_batch"):
                mb = row["max_batch"]
                row["predicted_img_per_s_at_max_batch"] = float(f"{mb / ((fixed + per * mb) / (share * peak * 1e12)):.4g}")
            if sf:
                row["predicted_sample_s_per_image"] = sf / sb / (share * peak * 1e12)
        peaks[name] = row
    out["accelerators"] = peaks
    out["plan_s"] = round(time.perf_counter() - t_start, 1)
    out.update(environment())
    return out


# ----------------------------------------------------------------------------- command line

def default_timing(what: str, *, warmup: int | None, iters: int | None, repeats: int | None) -> Timing:
    """Fewer calls on the CPU (tiny configs) and for the sampler (each call is a whole chain)."""
    cpu = jax.default_backend() == "cpu"
    base = Timing(1, 2, 2) if cpu else (Timing(1, 1, 3) if what == "sample" else Timing())
    return Timing(base.warmup if warmup is None else warmup, base.iters if iters is None else iters,
                  base.repeats if repeats is None else repeats)


def emit(result: dict, jsonl: str | None = None) -> None:
    """Prints one JSON line (and appends it to ``jsonl``)."""
    line = json.dumps(result, default=str)
    print(line, flush=True)
    if jsonl:
        with open(jsonl, "a") as f:
            f.write(line + "\n")


def run(config, *, what: str, config_name: str | None = None, batch: int | None = None,
        dtype: str | None = None, attention: str | None = None, steps: int | None = None,
        sampler: str | None = None, warmup: int | None = None, iters: int | None = None,
        repeats: int | None = None, max_batch: bool = False, max_batch_time_s: float = 240.0,
        expert_arch: str | None = None, expert_width: int | None = None, num_classes: int = 8,
        jsonl: str | None = None, share: float = DEFAULT_SHARE) -> list[dict]:
    """Runs the benchmarks ``what`` names (``all``: each; ``plan``: :func:`plan`, nothing timed), emitting one
    JSON line per result.

    The random expert defaults to the one ``configs/expert.py`` builds for the same variant as
    ``config_name`` (``...py:tiny``: a width-8 ResNet-18; otherwise ResNet-50).
    """
    whats = WHATS if what == "all" else (what,)
    if what == "plan":
        whats = ()
    if expert_arch is None:
        variant = config_name.split(":", 1)[1] if config_name and ":" in config_name else None
        e = config_lib.load("expert", variant).expert
        expert_arch = e.arch
        expert_width = expert_width or (e.width if e.width != 64 else None)
    out = []
    if what == "plan":
        r = plan(config, config_name=config_name, batch=batch, share=share, expert_arch=expert_arch,
                 expert_width=expert_width, num_classes=num_classes)
        emit(r, jsonl)
        out.append(r)
    for w in whats:
        if w not in WHATS:
            raise ValueError(f"--what {w!r}: use one of {WHATS + ('all', 'plan')}")
        b = batch or (config.sample.batch_size if w == "sample" else config.train.batch_size)
        c = prepare_config(config, what=w, batch=b, dtype=dtype, attention=attention, expert_arch=expert_arch)
        timing = default_timing(w, warmup=warmup, iters=iters, repeats=repeats)
        logging.info("bench %s: batch %d, %s, attention %s, %s", w, b, c.dtype, c.model.attention, timing)
        try:
            if w == "sample":
                r = bench_sample(c, batch=b, steps=steps, sampler=sampler, timing=timing, num_classes=num_classes,
                                 config_name=config_name)
            elif max_batch:
                if jax.default_backend() == "cpu":
                    raise ValueError("--max_batch searches device memory: run it on a GPU")
                r = search_max_batch(c, start=b, timing=Timing(1, 3, 1) if warmup is None else timing,
                                     time_budget_s=max_batch_time_s, expert_arch=expert_arch,
                                     expert_width=expert_width, num_classes=num_classes, config_name=config_name)
            else:
                r = bench_train_step(c, timing=timing, expert_arch=expert_arch, expert_width=expert_width,
                                     num_classes=num_classes, config_name=config_name)
        except Exception as e:  # noqa: BLE001  (a failed part still leaves its line; the others run)
            logging.exception("bench %s failed", w)
            r = {"what": w, "config": config_name, "batch": b, "dtype": c.dtype,
                 "attention_requested": c.model.attention, "img_per_s": None,
                 "error": f"{type(e).__name__}: {str(e)[:300]}", **environment()}
        r["attention_requested"] = attention or config.model.attention  # Before any CPU fallback.
        emit(r, jsonl)
        out.append(r)
        gc.collect()
    return out


def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).", lock_config=False)
    flags.DEFINE_enum("what", "train_step", WHATS + ("all", "plan"),
                      "What to time; 'plan': memory, FLOPs, largest batch and predicted step time per accelerator "
                      "(computed here, nothing timed).")
    flags.DEFINE_float("share", DEFAULT_SHARE, "plan: share of peak FLOP/s the predicted step times assume.")
    flags.DEFINE_integer("batch", None, "Batch size (default: the config's train/sample batch size).")
    flags.DEFINE_enum("dtype", None, list(config_lib.DTYPES), "Compute dtype (default: the config's).")
    flags.DEFINE_enum("attention", None, ["auto", "cudnn", "xla", "chunked"], "Attention implementation (default: the config's).")
    flags.DEFINE_integer("steps", None, "Sampling steps (default: the config's sample.steps).")
    flags.DEFINE_enum("sampler", None, ["ddpm", "ddim"], "Sampler (default: the config's).")
    flags.DEFINE_integer("warmup", None, "Untimed calls before timing (default 3; sample 1; CPU 1).")
    flags.DEFINE_integer("iters", None, "Calls per timed loop (default 10; sample 1; CPU 2).")
    flags.DEFINE_integer("repeats", None, "Timed loops; step_time_ms is their median (default 3; CPU 2).")
    flags.DEFINE_bool("max_batch", False, "Train steps: search the largest batch that fits (GPU).")
    flags.DEFINE_float("max_batch_time_s", 240.0, "Stop the --max_batch search after this many seconds.")
    flags.DEFINE_string("expert_arch", None, "Random expert standing in for a trained one "
                        "(default: configs/expert.py's for the config's variant: resnet50, or resnet18 for :tiny).")
    flags.DEFINE_integer("expert_width", None, "Stem width of the random ResNet expert (default: as expert_arch's).")
    flags.DEFINE_integer("num_classes", 8, "Classes of the synthetic data (Kather: 8).")
    flags.DEFINE_string("jsonl", None, "Also append each JSON line to this file.")
    flags.mark_flags_as_required(["config"])


def main(argv):
    from absl import app, flags
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    from ml_collections import config_flags
    config_name = config_flags.get_config_filename(f["config"])
    results = run(f.config, what=f.what, config_name=config_name, batch=f.batch, dtype=f.dtype, attention=f.attention,
        steps=f.steps, sampler=f.sampler, warmup=f.warmup, iters=f.iters, repeats=f.repeats,
        max_batch=f.max_batch, max_batch_time_s=f.max_batch_time_s, expert_arch=f.expert_arch,
        expert_width=f.expert_width, num_classes=f.num_classes, jsonl=f.jsonl, share=f.share)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    from absl import app
    _define_flags()
    app.run(main)
