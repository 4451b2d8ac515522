"""Every sampler against diffusers' own scheduler loop (epsilon and v prediction), and the guidance interval."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # Parity with diffusers' schedulers (the test extra).

from fadjax import sampling  # noqa: E402
from fadjax.diffusion import make_schedule, split_prediction  # noqa: E402

T = 1000
SCHEDULE = make_schedule(T, "squaredcos_cap_v2")
BETAS = np.asarray(SCHEDULE.betas)
SHAPE = (4, 4, 1)  # One image, NHWC.
LABELS = np.array([0, 2])
W = np.asarray([0.3, -0.2, 0.5, 0.1], np.float32)  # Per-label offsets of the toy model (3 = the null label).


def toy_model(params, x, t, labels):
    """A pure stand-in for the U-Net: smooth in x, t (int or fractional) and the label."""
    tt = t.astype(jnp.float32)[:, None, None, None]
    return 0.8 * jnp.tanh(params * x + jnp.asarray(W)[labels][:, None, None, None]) + 0.2 * jnp.cos(tt / 300.0)


def toy_model_np(params, x, t, labels):
    """NCHW numpy twin of :func:`toy_model` (``t`` one scalar for the batch, as diffusers' loops have it)."""
    t = np.float32(t)
    out = 0.8 * np.tanh(params * x + W[labels][:, None, None, None]) + 0.2 * np.cos(t / np.float32(300.0))
    return torch.from_numpy(out.astype(np.float32))


def nchw(a):
    return np.transpose(np.asarray(a), (0, 3, 1, 2))


def start(seed=7):
    keys = sampling.image_keys(seed, [0, 1])
    return keys, torch.from_numpy(np.array(nchw(sampling.initial_noise(keys, SHAPE))))


def assert_close(ours, ref):
    """~1e-4 relative to the result's scale (the Karras samplers start at sigma ~2e4)."""
    ref = np.asarray(ref)
    np.testing.assert_allclose(nchw(ours), ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


def diffusers_loop(sch, x, steps, *, params=0.7, labels=LABELS):
    """The usual pipeline loop: scale the input, call the model, step.

    The loop starts at the first step explicitly: with rounded Karras timesteps the first two are both
    ``T - 1`` here, and diffusers would otherwise begin at the second occurrence (its img2img rule).
    """
    sch.set_timesteps(steps)
    if hasattr(sch, "set_begin_index"):  # The sigma-stepping schedulers.
        sch.set_begin_index(0)
    x = x * sch.init_noise_sigma
    for t in sch.timesteps:
        x_in = sch.scale_model_input(x, t)
        x = sch.step(toy_model_np(params, x_in.numpy(), float(t), labels), t, x).prev_sample
    return x.numpy()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_matches_diffusers(prediction):
    from diffusers import DDIMScheduler
    keys, x = start()
    ours = sampling.sample(toy_model, 0.7, SCHEDULE, LABELS, keys=keys, shape=SHAPE, sampler="ddim", steps=10,
                           prediction=prediction)
    sch = DDIMScheduler(num_train_timesteps=T, trained_betas=BETAS, prediction_type=prediction)
    assert_close(ours, diffusers_loop(sch, x, 10))


def test_ddpm_v_matches_diffusers(monkeypatch):
    from diffusers import DDPMScheduler
    from diffusers.schedulers import scheduling_ddpm
    keys, x = start()
    ours = sampling.sample(toy_model, 0.7, SCHEDULE, LABELS, keys=keys, shape=SHAPE, sampler="ddpm", steps=10,
                           prediction="v_prediction")
    sch = DDPMScheduler(num_train_timesteps=T, trained_betas=BETAS, prediction_type="v_prediction")
    current = {}
    # diffusers draws the step's noise with randn_tensor: hand it our per-image noise of that timestep.
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: torch.from_numpy(
        np.array(nchw(sampling._step_noise(keys, jnp.int32(current["t"]), SHAPE)))))
    sch.set_timesteps(10)
    for t in sch.timesteps:
        current["t"] = int(t)
        x = sch.step(toy_model_np(0.7, x.numpy(), int(t), LABELS), t, x).prev_sample
    assert_close(ours, x.numpy())


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_dpmpp_2m_matches_diffusers(karras, prediction):
    from diffusers import DPMSolverMultistepScheduler
    keys, x = start()
    ours = sampling.sample(toy_model, 0.7, SCHEDULE, LABELS, keys=keys, shape=SHAPE, sampler="dpmpp_2m", steps=10,
                           prediction=prediction, karras_sigmas=karras)
    sch = DPMSolverMultistepScheduler(num_train_timesteps=T, trained_betas=BETAS, prediction_type=prediction,
                                      algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
                                      final_sigmas_type="zero", use_karras_sigmas=karras)
    ref = diffusers_loop(sch, x, 10)
    assert_close(ours, ref)
    ts, sig = sampling.sigma_schedule(SCHEDULE, "dpmpp_2m", 10, karras_sigmas=karras)
    np.testing.assert_array_equal(ts, sch.timesteps.numpy())
    np.testing.assert_allclose(sig, sch.sigmas.numpy(), rtol=1e-5)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_edm_samplers_match_diffusers(sampler, prediction):
    from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler
    cls = EulerDiscreteScheduler if sampler == "euler" else HeunDiscreteScheduler
    keys, x = start()
    calls = []

    def counting(params, x, t, labels):
        jax.debug.callback(lambda: calls.append(1))
        assert t.dtype == jnp.float32  # Fractional timesteps, interpolated from sigma.
        return toy_model(params, x, t, labels)

    ours = sampling.sample(counting, 0.7, SCHEDULE, LABELS, keys=keys, shape=SHAPE, sampler=sampler, steps=10,
                           prediction=prediction)
    jax.block_until_ready(ours)
    sch = cls(num_train_timesteps=T, trained_betas=BETAS, prediction_type=prediction, use_karras_sigmas=True)
    assert_close(ours, diffusers_loop(sch, x, 10))
    assert len(calls) == (10 if sampler == "euler" else 19)  # Heun: 2 * steps - 1 model calls.
    ts, sig = sampling.sigma_schedule(SCHEDULE, sampler, 10)
    ref_ts, ref_sig = sch.timesteps.numpy(), sch.sigmas.numpy()
    if sampler == "heun":  # diffusers repeats the inner entries for the corrector's calls.
        ref_ts, ref_sig = ref_ts[::2], np.append(ref_sig[::2], ref_sig[-1])
    np.testing.assert_allclose(ts, ref_ts, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(sig, ref_sig, rtol=1e-5)
    assert float(ts[0]) == pytest.approx(T - 1) and 0 < float(ts[1]) < T - 1 and float(ts[1]) % 1 != 0


def test_sampler_defaults_and_errors():
    assert sampling.resolve_steps(T, "ddpm") == T
    assert sampling.resolve_steps(T, "ddim") == 50
    for s in ("dpmpp_2m", "euler", "heun"):
        assert sampling.resolve_steps(T, s) == 25 == len(sampling.timesteps(T, s))
    with pytest.raises(ValueError, match="unknown sampler"):
        sampling.resolve_steps(T, "lms")
    with pytest.raises(ValueError, match="prediction"):
        sampling.sample(toy_model, 0.7, SCHEDULE, LABELS, seed=0, image_ids=[0, 1], shape=SHAPE, prediction="x0")
    for bad in ((1.0, 0.5), (-1.0, 2.0), (1.0,), "ab"):
        with pytest.raises(ValueError, match="guidance_interval"):
            sampling.check_guidance_interval(bad)
    assert sampling.check_guidance_interval(("0.3", "inf")) == (0.3, float("inf"))


def v_of(eps_fn):
    """The v-predicting model whose every output corresponds to ``eps_fn``'s noise (integer timesteps)."""
    def v_fn(params, x, t, labels):
        eps = eps_fn(params, x, t, labels)
        abar = SCHEDULE.alphas_cumprod[t][:, None, None, None]
        x0 = (x - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)
        return jnp.sqrt(abar) * eps - jnp.sqrt(1.0 - abar) * x0
    return v_fn


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m"])
def test_v_prediction_equals_epsilon_for_the_same_noise(sampler):
    kw = dict(seed=3, image_ids=[0, 1], shape=SHAPE, sampler=sampler, steps=10)
    eps = sampling.sample(toy_model, 0.7, SCHEDULE, LABELS, **kw)
    v = sampling.sample(v_of(toy_model), 0.7, SCHEDULE, LABELS, prediction="v_prediction", **kw)
    np.testing.assert_allclose(v, eps, rtol=1e-4, atol=1e-4)
    # The same v read as epsilon is another model: the check can fail.
    assert not np.allclose(sampling.sample(v_of(toy_model), 0.7, SCHEDULE, LABELS, **kw), eps, atol=1e-2)
    # split_prediction inverts the conversion at a mid-chain timestep.
    x = jax.random.normal(jax.random.key(1), (2,) + SHAPE)
    t = jnp.array([400, 400])
    x0, e = split_prediction(SCHEDULE, x, t, v_of(toy_model)(0.7, x, t, LABELS), "v_prediction")
    np.testing.assert_allclose(e, toy_model(0.7, x, t, LABELS), atol=1e-4)


def ddim_reference(params, labels, scale_at, steps=10, seed=0):
    """A DDIM loop in Python whose guidance scale at each step is ``scale_at(sigma_t)``."""
    keys = sampling.image_keys(seed, [0, 1])
    x = sampling.initial_noise(keys, SHAPE)
    sig = np.asarray(sampling.schedule_sigmas(SCHEDULE))
    for t in sampling.timesteps(T, "ddim", steps):
        tt = jnp.full((2,), t, jnp.int32)
        out = sampling.guided_eps(toy_model, params, x, tt, jnp.asarray(labels), guidance_scale=scale_at(sig[t]),
                                  null_label=3)
        x = sampling.ddim_step(SCHEDULE, x, out, jnp.int32(t), jnp.int32(t - T // steps))
    return x


@pytest.mark.parametrize("sampler", ["ddim", "heun"])
def test_guidance_interval(sampler):
    kw = dict(seed=0, image_ids=[0, 1], shape=SHAPE, sampler=sampler, steps=10)
    if sampler == "ddim":
        sig = np.asarray(sampling.schedule_sigmas(SCHEDULE))[sampling.timesteps(T, "ddim", 10)]
    else:
        sig = np.asarray(sampling.sigma_schedule(SCHEDULE, "heun", 10)[1])
    assert 0 < np.sum((sig > 0.3) & (sig <= 50.0)) < len(sig) - 1  # Some steps in (0.3, 50], not all.
    plain = sampling.sample(toy_model, 0.7, SCHEDULE, LABELS, **kw)
    guided = sampling.sample(toy_model, 0.7, SCHEDULE, LABELS, guidance_scale=4.0, null_label=3, **kw)
    assert not np.allclose(plain, guided, atol=1e-3)

    def interval(lo, hi):
        return sampling.sample(toy_model, 0.7, SCHEDULE, LABELS, guidance_scale=4.0, null_label=3,
                               guidance_interval=(lo, hi), **kw)

    np.testing.assert_allclose(interval(0.0, np.inf), guided, rtol=1e-5, atol=1e-5)  # Every sigma is in (0, inf].
    np.testing.assert_allclose(interval(1e5, 1e6), plain, rtol=1e-5, atol=1e-5)  # No step is in it.
    mid = interval(0.3, 50.0)
    assert not np.allclose(mid, plain, atol=1e-3) and not np.allclose(mid, guided, atol=1e-3)
    if sampler == "ddim":
        ref = ddim_reference(0.7, LABELS, lambda s: 4.0 if 0.3 < s <= 50.0 else 1.0)
        np.testing.assert_allclose(mid, ref, rtol=1e-5, atol=1e-5)


def test_guidance_interval_skips_the_unconditional_branch():
    batches = []

    def recording(params, x, t, labels):
        jax.debug.callback(lambda b: batches.append(int(b)), x.shape[0])
        return toy_model(params, x, t, labels)

    sig = np.asarray(sampling.schedule_sigmas(SCHEDULE))
    ts = sampling.timesteps(T, "ddim", 10)
    inside = int(np.sum((sig[ts] > 0.3) & (sig[ts] <= 50.0)))
    assert 0 < inside < len(ts)
    x = sampling.sample(recording, 0.7, SCHEDULE, LABELS, seed=0, image_ids=[0, 1], shape=SHAPE, sampler="ddim",
                        steps=10, guidance_scale=4.0, null_label=3, guidance_interval=(0.3, 50.0))
    jax.block_until_ready(x)
    assert sorted(batches) == [2] * (len(ts) - inside) + [4] * inside  # Doubled batch only inside.


def test_settings_plumbing(tmp_path):
    """Config validation, the CLI flag, and generate's record of the new settings (old records still match)."""
    import types

    import ml_collections

    from fadjax import cli, config_lib
    from fadjax import sample as sample_lib

    config = config_lib.load("baseline", "tiny")  # Has a data source, so validate reaches the sample section.
    assert config.sample.karras_sigmas is False and config.sample.guidance_interval is None
    config.sample.sampler = "heun"
    config.sample.guidance_interval = "0.3,inf"
    config_lib.validate(config)
    config.sample.guidance_interval = "2,1"
    with pytest.raises(config_lib.ConfigError, match="sample.guidance_interval"):
        config_lib.validate(config)
    with pytest.raises(cli.UserError, match="--guidance_interval"):
        sample_lib.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "o"), "--guidance_interval", "x"])

    cfg = ml_collections.ConfigDict({"sample": {"sampler": "ddim", "steps": 4, "num_per_class": 1, "seeds": "0",
                                                "exclude_classes": None, "guidance_scale": 1.0, "batch_size": 4}})
    run = types.SimpleNamespace(
        workdir=str(tmp_path / "run"), config=cfg, step=1, class_names=["a", "b"], params=0.7, eps_fn=toy_model,
        schedule=make_schedule(50), image_size=4, channels=1, condition_labels={"a": 0, "b": 1}, null_label=3,
        used_ema=False, data_range="[0,1]", prediction="v_prediction")
    m = sample_lib.generate(run, str(tmp_path / "g"), seeds=[0], num_per_class=1, sampler="dpmpp_2m", steps=3,
                            guidance_scale=2.0, karras_sigmas=True, guidance_interval="0.5,20", progress=False)
    assert (m["sampler"], m["steps"], m["karras_sigmas"], m["guidance_interval"], m["prediction"]) == \
        ("dpmpp_2m", 3, True, [0.5, 20.0], "v_prediction")
    plain = sample_lib.generate(run, str(tmp_path / "p"), seeds=[0], num_per_class=1, progress=False)
    assert plain["karras_sigmas"] is None and plain["guidance_interval"] is None  # ddim, no guidance.
    old = {k: v for k, v in plain.items() if k in ("sampler", "steps", "eta")}  # A record without the new keys.
    new = dict(old, karras_sigmas=None, guidance_interval=None)
    assert sample_lib._same_settings(old, new) and not sample_lib._same_settings(old, dict(new, karras_sigmas=True))
    with pytest.raises(ValueError, match="guidance_interval"):
        sample_lib.generate(run, str(tmp_path / "x"), seeds=[0], num_per_class=1, guidance_interval="1", progress=False)
