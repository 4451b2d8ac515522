"""Samplers: parity with diffusers' DDPMScheduler/DDIMScheduler, batch invariance, guidance."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # Parity with diffusers' schedulers (the test extra).
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

from fadjax import sampling  # noqa: E402
from fadjax.diffusion import make_schedule  # noqa: E402

T = 1000
SCHEDULE = make_schedule(T, "squaredcos_cap_v2")
W = jnp.asarray([0.3, -0.2, 0.5, 0.1], jnp.float32)  # Per-label offsets of the toy model.


def toy_eps(params, x, t, labels):
    """A pure stand-in for the U-Net: depends on x, t and the label."""
    return jnp.tanh(params * x + W[labels][:, None, None, None]) + (t.astype(jnp.float32) / 1000.0)[:, None, None, None]


def toy_eps_np(params, x, t, labels):  # NCHW numpy twin of toy_eps.
    return np.tanh(params * x + np.asarray(W)[labels][:, None, None, None]) + t / 1000.0


def nhwc(a):
    return jnp.asarray(np.transpose(a, (0, 2, 3, 1)))


def nchw(a):
    return np.transpose(np.asarray(a), (0, 3, 1, 2))


def test_timesteps_match_diffusers():
    ddpm = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    np.testing.assert_array_equal(sampling.timesteps(T, "ddpm"), ddpm.timesteps.numpy())
    ddpm.set_timesteps(100)
    np.testing.assert_array_equal(sampling.timesteps(T, "ddpm", 100), ddpm.timesteps.numpy())
    ddim = DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    for n in (50, 7):
        ddim.set_timesteps(n)
        np.testing.assert_array_equal(sampling.timesteps(T, "ddim", n), ddim.timesteps.numpy())
    np.testing.assert_array_equal(sampling.timesteps(T, "ddim"), sampling.timesteps(T, "ddim", 50))
    with pytest.raises(ValueError):
        sampling.timesteps(T, "ddim", T + 1)


@pytest.mark.parametrize("steps", [None, 50])
def test_ddpm_step_matches_diffusers(steps):
    sch = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")  # fixed_small, clip_sample
    if steps:
        sch.set_timesteps(steps)
    np.testing.assert_allclose(sch.alphas_cumprod.numpy(), SCHEDULE.alphas_cumprod, atol=1e-6)
    rng = np.random.default_rng(0)
    ts = list(sampling.timesteps(T, "ddpm", steps))
    for t in (ts[0], ts[len(ts) // 2], ts[-2], ts[-1]):
        prev = ts[ts.index(t) + 1] if t != ts[-1] else -1
        x = rng.normal(size=(3, 2, 6, 6)).astype(np.float32) * 2.0  # Large enough that some x0 get clipped.
        eps = rng.normal(size=x.shape).astype(np.float32)
        ref = sch.step(torch.from_numpy(eps), int(t), torch.from_numpy(x),
                       generator=torch.Generator().manual_seed(1)).prev_sample.numpy()
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).numpy()  # diffusers' draw.
        ours = sampling.ddpm_step(SCHEDULE, nhwc(x), nhwc(eps), jnp.int32(t), jnp.int32(prev), nhwc(noise))
        np.testing.assert_allclose(nchw(ours), ref, atol=2e-5, rtol=1e-5, err_msg=f"t={t}")


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_step_matches_diffusers(eta):
    sch = DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")  # leading, alpha_to_one, clip
    sch.set_timesteps(20)
    rng = np.random.default_rng(1)
    for t in (int(sch.timesteps[0]), int(sch.timesteps[10]), 0):
        x = rng.normal(size=(2, 1, 5, 5)).astype(np.float32) * 2.0
        eps = rng.normal(size=x.shape).astype(np.float32)
        noise = rng.normal(size=x.shape).astype(np.float32)
        ref = sch.step(torch.from_numpy(eps), t, torch.from_numpy(x), eta=eta,
                       variance_noise=torch.from_numpy(noise) if eta else None).prev_sample.numpy()
        ours = sampling.ddim_step(SCHEDULE, nhwc(x), nhwc(eps), jnp.int32(t), jnp.int32(t - T // 20), nhwc(noise),
                                  eta=eta)
        np.testing.assert_allclose(nchw(ours), ref, atol=2e-5, rtol=1e-5, err_msg=f"t={t}")


def test_ddim_loop_matches_diffusers_loop():
    labels = np.array([0, 3, 1])
    keys = sampling.image_keys(5, [0, 1, 2])
    ours = sampling.sample(toy_eps, 0.7, SCHEDULE, labels, keys=keys, shape=(4, 4, 1), sampler="ddim", steps=8)
    sch = DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    sch.set_timesteps(8)
    x = torch.from_numpy(np.array(nchw(sampling.initial_noise(keys, (4, 4, 1)))))
    for t in sch.timesteps:
        eps = toy_eps_np(0.7, x.numpy(), int(t), labels).astype(np.float32)
        x = sch.step(torch.from_numpy(eps), t, x).prev_sample
    np.testing.assert_allclose(nchw(ours), x.numpy(), atol=1e-4)


def test_same_seed_same_images_on_any_batch_size():
    sched = make_schedule(20)
    labels = np.array([0, 1, 2, 3, 0, 1, 2])
    ids = np.arange(100, 107)
    kw = dict(shape=(4, 4, 1), sampler="ddpm")
    together = sampling.sample(toy_eps, 0.5, sched, labels, seed=3, image_ids=ids, **kw)
    alone = jnp.concatenate([sampling.sample(toy_eps, 0.5, sched, labels[j:j + 1], seed=3, image_ids=ids[j:j + 1],
                                             **kw) for j in range(7)])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert not np.allclose(together[0], together[4])  # Same label, different id: different noise.
    other = sampling.sample(toy_eps, 0.5, sched, labels, seed=4, image_ids=ids, **kw)
    assert not np.allclose(together, other)


def test_one_compilation_per_shape():
    traces = []

    def counting_eps(params, x, t, labels):
        traces.append(1)
        return toy_eps(params, x, t, labels)

    sched = make_schedule(10)
    for seed in (0, 1):
        sampling.sample(counting_eps, 0.5, sched, [0, 1], seed=seed, image_ids=[0, 1], shape=(4, 4, 1))
    assert len(traces) == 1


def test_classifier_free_guidance():
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 1))
    t = jnp.array([5, 5, 5])
    labels = jnp.array([0, 1, 2])
    cond = toy_eps(0.5, x, t, labels)
    uncond = toy_eps(0.5, x, t, jnp.full_like(labels, 3))
    got = sampling.guided_eps(toy_eps, 0.5, x, t, labels, guidance_scale=2.5, null_label=3)
    np.testing.assert_allclose(got, uncond + 2.5 * (cond - uncond), atol=1e-6)
    np.testing.assert_allclose(sampling.guided_eps(toy_eps, 0.5, x, t, labels, null_label=3), cond, atol=1e-6)
    sched = make_schedule(10)
    kw = dict(seed=0, image_ids=[0, 1], shape=(4, 4, 1), sampler="ddim", steps=5)
    plain = sampling.sample(toy_eps, 0.5, sched, [0, 1], **kw)
    guided = sampling.sample(toy_eps, 0.5, sched, [0, 1], guidance_scale=3.0, null_label=3, **kw)
    assert not np.allclose(plain, guided)
    with pytest.raises(ValueError, match="null_label"):
        sampling.sample(toy_eps, 0.5, sched, [0, 1], guidance_scale=3.0, **kw)


def test_to_uint8_clips():
    out = sampling.to_uint8(np.array([-0.5, 0.0, 0.5, 1.0, 2.0]))
    np.testing.assert_array_equal(out, [0, 0, 128, 255, 255])
    assert out.dtype == np.uint8
