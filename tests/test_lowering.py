"""Every compiled program lowers for CUDA and TPU at the ``paper`` and ``fast`` presets' shapes and dtypes,
in the sharded and the pmap form over a mesh of 8 devices (issue 30), on this CPU: lowering only, nothing
is compiled and nothing allocated (``jax.export.export(jitted, platforms=["cuda", "tpu"])`` on
``jax.ShapeDtypeStruct`` inputs; the 8 CPU devices come from conftest's
``--xla_force_host_platform_device_count=8``; export records the device count, not the platform's devices).

Attention: these programs hold XLA's attention (``jax.nn.dot_product_attention(implementation='xla')``, and
``chunked``: the same over blocks of queries, which ``model.attention='auto'`` picks for large score tensors
where cuDNN is absent, as on a TPU). cuDNN's fused attention (``'cudnn'``, what 'auto' picks on a GPU in
bf16) cannot be traced without cuDNN: JAX checks the cuDNN version while tracing it, so its lowering is
left to a device run (``python -m fadjax.bench --what train_step --attention cudnn`` on a GPU). Each test
checks that no cuDNN call was traced. The programs are traced with ``attention.sized_as("tpu")``: 'auto'
chooses XLA or chunked, and the chunks' sizes, as on a TPU (or a GPU in float32), not as on this CPU.

What is lowered, and where (the suite's time is the budget, so not every program at every preset and form):
each train step at both presets and in both forms between them ((paper, sharded) and (fast, pmap), or
(paper, pmap) and (fast, sharded)), so every program meets both presets and both forms, and both presets
meet both forms; the two variants that differ from those only in the projector (pooled + MLP, tokens +
linear) once each at the fast preset;
each sampler once with guidance (and DPM-Solver++ with a guidance interval), alternating presets and forms.
The x0 ablation (``align.expert_input='clean'``) is not a program of its own: the step reads it at run time
(``consts['hp']['expert_clean']``), checked below. The usefulness classifiers run on one device in
``fadjax.utility`` (no collective): their step is lowered on one device and with the batch split over the
mesh (``jit`` on sharded inputs); a pmap of it would train 8 unrelated classifiers, so it has none.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fadjax import bench
from fadjax import config_lib
from fadjax import diffusion as diffusion_lib
from fadjax import sampling
from fadjax import utility
from fadjax.models import attention as attention_lib
from fadjax.models import build
from fadjax.train import common
from fadjax.train import diffusion_stage
from fadjax.train import expert_stage

PLATFORMS = ("cuda", "tpu")
DEVICES = 8
PRESETS = {"paper": None, "fast": "fast"}  # config_lib.load's variant: None = the config's defaults (the paper).
A = (("paper", "sharded"), ("fast", "pmap"))
B = (("paper", "pmap"), ("fast", "sharded"))


def _config(name, preset, form, *extra):
    variant = ",".join(v for v in (PRESETS[preset], *extra) if v) or None
    c = config_lib.load(name, variant)
    c.parallel = form
    c.num_devices = None  # Every one of the 8 devices.
    return c


def _export(fn, args, *, form):
    """``fn`` exported for CUDA and TPU on the abstract ``args``; the pmap form through ``jax.jit``
    (jax.export takes jitted functions; a pmap is a jit of a shard_map since JAX 0.9)."""
    with bench.record_attention() as calls, attention_lib.sized_as("tpu"):
        exp = jax.export.export(fn if form == "sharded" else jax.jit(fn), platforms=PLATFORMS)(*args)
    assert exp.platforms == PLATFORMS
    assert exp.nr_devices == DEVICES
    text = exp.mlir_module()
    assert "fmha" not in text and "cudnn" not in text.lower()
    assert "cudnn" not in calls
    return exp, calls, text


def _check_step(exp, args, calls, text, *, form, unet=True):
    """The step's state comes back with the shapes it went in with, and its gradients are averaged over
    the 8 devices (an all-reduce: GSPMD's, or pmap's pmean)."""
    n_state = len(jax.tree.leaves(args[0]))
    assert [(a.shape, a.dtype) for a in exp.out_avals[:n_state]] == [(a.shape, a.dtype) for a in exp.in_avals[:n_state]]
    if form == "pmap":
        assert all(a.shape[0] == DEVICES for a in exp.in_avals)
        assert "all_reduce" in text
    else:  # The batch constraint is in the program; the partitioner adds the collectives when compiling.
        assert "sharding" in text and "data" in text
    if unet:
        assert sum(calls.values()) > 0 and set(calls) <= {"xla", "chunked"}


DIFFUSION = {  # name: (config file, extra variants, overrides)
    "baseline": ("baseline", (), {}),
    "pooled_linear": ("feature_aligned", (), {}),  # The paper's.
    "tokens_mlp": ("feature_aligned", ("tokens",), {}),  # REPA's.
    "pooled_mlp": ("feature_aligned", (), {"align.projector": "mlp"}),
    "tokens_linear": ("feature_aligned", ("tokens",), {"align.projector": "linear"}),
    "dreambooth": ("dreambooth", (), {}),  # configs/dreambooth.py (the baseline's U-Net, instance + prior images).
}
DIFFUSION_CASES = ([("pooled_linear", *p) for p in A] + [("tokens_mlp", *p) for p in B]
                   + [("baseline", *p) for p in B] + [("dreambooth", *p) for p in A]
                   + [("pooled_mlp", "fast", "sharded"), ("tokens_linear", "fast", "pmap")])


@pytest.mark.parametrize("name,preset,form", DIFFUSION_CASES)
def test_diffusion_step_lowers(name, preset, form):
    file, extra, overrides = DIFFUSION[name]
    c = _config(file, preset, form, *extra)
    for k, v in overrides.items():
        section, field = k.split(".")
        c[section][field] = v
    if c.train.batch_size % DEVICES and name != "dreambooth":  # The paper's batch 4 on 8 devices: 8.
        c.train.batch_size = DEVICES
    step_fn, args, meta, _ = bench.abstract_train_step(c, expert_arch="resnet50")
    exp, calls, text = _export(step_fn, args, form=form)
    _check_step(exp, args, calls, text, form=form)
    assert meta["align"] == (file == "feature_aligned" or "align" in extra)
    x = args[1]["images"]
    assert x.shape[-3:] == (c.data.image_size, c.data.image_size, c.data.channels)
    # The compute dtype is in the program: bf16 activations at the fast preset, none at the paper's.
    assert ("bf16" in text) == (c.dtype == "bfloat16")


def test_x0_ablation_is_a_runtime_value_of_the_same_step():
    """align.expert_input='clean' (Table I) changes one runtime scalar of the step, not the program."""
    noisy, clean = (config_lib.load("feature_aligned", v) for v in (None, "clean"))
    a, b = (diffusion_stage.step_hparams(c, steps_per_epoch=10, total_steps=100) for c in (noisy, clean))
    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [(p, np.shape(v), np.asarray(v).dtype) for p, v in flat_a] == [
        (p, np.shape(v), np.asarray(v).dtype) for p, v in flat_b]
    assert bool(a["expert_clean"]) is False and bool(b["expert_clean"]) is True
    noisy.align.expert_input = "clean"
    assert noisy.to_dict() == clean.to_dict()  # Nothing else of the config differs.


@pytest.mark.parametrize("preset,form", A)
def test_expert_step_lowers(preset, form):
    c = _config("expert", preset, form)
    num_classes, n = 8, 4000
    module, _ = expert_stage.build_expert_module(c, num_classes)
    tx = common.make_optimizer(c.optim)
    size, ch = c.data.image_size, c.data.channels

    def state_of(x):
        from fadjax.models import expert as expert_lib
        v = expert_lib.init_expert(module, jax.random.key(0), image_size=size, in_channels=ch)
        return common.TrainState.create(apply_fn=None, params=v["params"], tx=tx, batch_stats=v.get("batch_stats"))

    par = common.make_parallel(c, c.train.batch_size)
    state = jax.eval_shape(state_of, 0)
    data = {"images": jax.ShapeDtypeStruct((n, size, size, ch), jnp.uint8),
            "labels": jax.ShapeDtypeStruct((n,), jnp.int32)}
    consts = {"lr": common.lr_hparams(c.optim, steps_per_epoch=n // c.train.batch_size, total_steps=1000)}
    args = par.abstract_replicated((state, data, consts))
    step_fn = expert_stage.make_train_step(module, c, par, num_examples=n)
    exp, calls, text = _export(step_fn, args, form=form)
    _check_step(exp, args, calls, text, form=form, unet=False)
    assert state.batch_stats is not None  # ResNet's BatchNorm statistics are part of the lowered state.


SAMPLER_CASES = [("ddpm", None, "paper", "sharded"), ("ddim", None, "fast", "pmap"),
                 ("dpmpp_2m", (0.28, 5.4), "paper", "pmap"), ("euler", None, "fast", "sharded"),
                 ("heun", None, "paper", "sharded"), ("dpmpp_2m", None, "fast", "sharded")]


@pytest.mark.parametrize("sampler,interval,preset,form", SAMPLER_CASES)
def test_sampler_loop_lowers(sampler, interval, preset, form):
    """The sampler's compiled loop (``sampling._sample_jit``, what ``sampling.sample`` calls) with
    classifier-free guidance, on the preset's U-Net at its sampling batch (rounded up to a multiple of 8)."""
    c = _config("baseline", preset, form)
    c.cond.label_dropout = 0.1  # Guidance needs the null label's row.
    labels_space = bench._label_space(c, 8)
    model = build.build_diffusion_model(build.unet(c), cond_mode=c.cond.mode, labels=labels_space)
    params = bench.model_param_shapes(model, c, None)
    schedule = diffusion_lib.make_schedule(c.diffusion.num_train_timesteps, c.diffusion.beta_schedule)
    size, ch = c.data.image_size, c.data.channels
    batch = -(-c.sample.batch_size // DEVICES) * DEVICES
    per = batch // DEVICES if form == "pmap" else batch

    def eps_fn(p, x, t, y):
        return model(p, x, t, y, None)[0]

    static = dict(shape=(size, size, ch), sampler=sampler, steps=sampling.resolve_steps(1000, sampler, None),
                  eta=0.0, guidance_scale=3.0, null_label=labels_space.null_label, clip_sample=True,
                  prediction=c.diffusion.prediction, karras_sigmas=sampler == "dpmpp_2m")
    fn = functools.partial(sampling._sample_jit, eps_fn, **static)
    keys = jax.eval_shape(lambda: sampling.image_keys(0, np.arange(per)))
    mesh = common.make_parallel(c, batch).mesh
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    iv = None if interval is None else jax.ShapeDtypeStruct((2,), jnp.float32)
    if form == "pmap":
        stack = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct((DEVICES, *a.shape), a.dtype, sharding=split), t)
        args = (stack(params), stack(schedule), stack(jax.ShapeDtypeStruct((per,), jnp.int32)), stack(keys))
        args += (() if iv is None else (stack(iv),))
        fn = jax.pmap(fn, axis_name="data")
    else:
        on = lambda t, s: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), t)
        args = (on(params, rep), on(schedule, rep), jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=split),
                on(keys, split)) + (() if iv is None else (on(iv, rep),))
        fn = jax.jit(fn)
    exp, calls, text = _export(fn, args, form=form)
    (out,) = exp.out_avals
    assert out.shape == ((DEVICES, per) if form == "pmap" else (batch,)) + (size, size, ch)
    assert out.dtype == jnp.float32
    assert sum(calls.values()) > 0 and set(calls) <= {"xla", "chunked"}
    assert "while" in text  # One loop over the steps, not the steps unrolled.


@pytest.mark.parametrize("preset", PRESETS)
def test_utility_classifier_step_lowers(preset):
    c = config_lib.load("baseline", PRESETS[preset])
    spec = utility.ClassifierSpec(channels=c.data.channels)
    _, init, train_step, _ = utility._programs(spec, 8)
    variables, opt_state = jax.eval_shape(init, jax.random.key(0))
    mesh = common.make_parallel(ml_collections.ConfigDict({"parallel": "sharded", "num_devices": None}), 64).mesh
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    on = lambda t, s: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), t)
    size = c.data.image_size
    for sharded in (False, True):
        x = jax.ShapeDtypeStruct((spec.batch_size, size, size, spec.channels), jnp.uint8)
        y = jax.ShapeDtypeStruct((spec.batch_size,), jnp.int32)
        key, lr = jax.eval_shape(lambda: jax.random.key(0)), jax.ShapeDtypeStruct((), jnp.float32)
        args = (variables, opt_state, x, y, key, lr)
        if sharded:
            args = (on(variables, rep), on(opt_state, rep), on(x, split), on(y, split), on(key, rep), on(lr, rep))
        exp = jax.export.export(train_step, platforms=PLATFORMS)(*args)
        assert exp.platforms == PLATFORMS and exp.nr_devices == (DEVICES if sharded else 1)
        n = len(jax.tree.leaves(variables))
        assert [a.shape for a in exp.out_avals[:n]] == [a.shape for a in jax.tree.leaves(variables)]
