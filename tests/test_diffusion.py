import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fadjax import diffusion


def test_cosine_schedule_matches_closed_form():
    T = 1000
    s = diffusion.make_schedule(T, "squaredcos_cap_v2")
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    # Away from the capped end, alpha_bar_t = f((t+1)/T) / f(0) exactly (the product telescopes).
    for t in (0, 1, 10, 500, 900):
        assert float(s.alphas_cumprod[t]) == pytest.approx(f((t + 1) / T) / f(0), rel=2e-4)
    assert float(s.betas.max()) == pytest.approx(0.999)
    assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0)
    assert s.num_steps == T


def test_schedule_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    for name in diffusion.BETA_SCHEDULES:
        ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=name)
        s = diffusion.make_schedule(1000, name)
        np.testing.assert_allclose(np.asarray(s.betas), ref.betas.numpy(), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7)


def test_q_sample_closed_form_and_inverse():
    s = diffusion.make_schedule(1000)
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.uniform(k1, (3, 4, 4, 1))
    noise = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 499, 998])
    xt = diffusion.q_sample(s, x0, t, noise)
    for i, ti in enumerate([0, 499, 998]):
        a = float(s.alphas_cumprod[ti])
        np.testing.assert_allclose(xt[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(diffusion.predict_x0(s, xt, t, noise), x0, atol=1e-3)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="beta_schedule"):
        diffusion.make_schedule(10, "cosine_typo")
