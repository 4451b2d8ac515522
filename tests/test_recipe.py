"""The training recipe's parts against independent references: v-prediction targets and their inverse
(diffusers' DDPMScheduler), min-SNR weights (Hang et al. 2023's formula), the loss the stage computes
with each objective, the power-function EMA (EDM2's formula), and the 8 symmetries of a tile."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fadjax import config_lib
from fadjax import diffusion
from fadjax.data import pipeline
from fadjax.train import common


@pytest.fixture(scope="module")
def schedule():
    return diffusion.make_schedule(1000, "squaredcos_cap_v2")


def _batch(seed=0, shape=(4, 6, 6, 1)):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.uniform(k1, shape) * 2 - 1, jax.random.normal(k2, shape)


def test_v_target_matches_diffusers_get_velocity(schedule):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    x0, noise = _batch()
    t = jnp.array([0, 250, 700, 998])
    want = ref.get_velocity(torch.from_numpy(np.asarray(x0)), torch.from_numpy(np.asarray(noise)),
                            torch.from_numpy(np.asarray(t)).long()).numpy()
    np.testing.assert_allclose(diffusion.v_target(schedule, x0, t, noise), want, rtol=1e-5, atol=1e-6)
    assert diffusion.training_target(schedule, x0, t, noise, "epsilon") is noise


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_split_prediction_recovers_x0_and_noise(schedule, prediction):
    x0, noise = _batch(1)
    t = jnp.array([1, 100, 500, 900])
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    out = diffusion.training_target(schedule, x0, t, noise, prediction)  # A perfect model's output.
    got_x0, got_eps = diffusion.split_prediction(schedule, x_t, t, out, prediction)
    np.testing.assert_allclose(got_eps, noise, atol=2e-4)
    # Epsilon's x0 divides by sqrt(abar): loose at t = 900; v's is direct and tight everywhere.
    np.testing.assert_allclose(got_x0, x0, atol=2e-4 if prediction == "v_prediction" else 2e-2)


def test_min_snr_weights_follow_the_formula(schedule):
    t = jnp.array([0, 10, 200, 500, 999])
    abar = np.asarray(schedule.alphas_cumprod, np.float64)[np.asarray(t)]
    snr = abar / (1 - abar)
    for prediction, want in (("epsilon", np.minimum(snr, 5) / snr), ("v_prediction", np.minimum(snr, 5) / (snr + 1))):
        got = diffusion.loss_weight(schedule, t, weighting="min_snr", prediction=prediction, gamma=5.0)
        np.testing.assert_allclose(got, want, rtol=1e-4)
    np.testing.assert_array_equal(diffusion.loss_weight(schedule, t, weighting="none", prediction="epsilon"), 1.0)
    # Both weightings are min(SNR, gamma) times the x0 error: check it on the epsilon and v errors of one x0 error.
    x0, noise = _batch(2)
    t4 = jnp.array([5, 300, 600, 950])
    x_t = diffusion.q_sample(schedule, x0, t4, noise)
    delta = 0.1 * _batch(3)[1]
    abar4 = schedule.alphas_cumprod[t4][:, None, None, None]
    # A model whose x0 is off by delta: its eps is off by -sqrt(abar/(1-abar)) delta, its v by -delta/sqrt(1-abar).
    eps_err = -jnp.sqrt(abar4 / (1 - abar4)) * delta
    v_err = -delta / jnp.sqrt(1 - abar4)
    x0_mse = jnp.mean(delta ** 2, axis=(1, 2, 3))
    snr4 = diffusion.snr(schedule, t4)
    for prediction, err in (("epsilon", eps_err), ("v_prediction", v_err)):
        w = diffusion.loss_weight(schedule, t4, weighting="min_snr", prediction=prediction)
        np.testing.assert_allclose(w * jnp.mean(err ** 2, axis=(1, 2, 3)), jnp.minimum(snr4, 5) * x0_mse, rtol=1e-3)
    del x_t


@pytest.mark.parametrize("prediction,weighting", [("epsilon", "none"), ("v_prediction", "none"),
                                                  ("epsilon", "min_snr"), ("v_prediction", "min_snr")])
def test_stage_loss_is_the_weighted_mse_of_the_objective(schedule, prediction, weighting):
    from fadjax.train import diffusion_stage
    config = config_lib.load("baseline", "tiny")
    config.diffusion.prediction = prediction
    config.diffusion.loss_weighting = weighting
    config.diffusion.data_range = "[-1,1]"
    out = jax.random.normal(jax.random.key(7), (4, 6, 6, 1))

    class FixedModel:  # Returns a fixed output whatever its input: the loss is then a known function of it.
        def __call__(self, params, x_t, t, labels, text):
            return out * params["scale"], {}

    loss_fn = diffusion_stage.make_loss_fn(FixedModel(), config, schedule)
    x01, noise = _batch(4)
    x0 = (x01 + 1) / 2  # The stage receives [0, 1] images.
    t = jnp.array([3, 100, 600, 990])
    weights = jnp.full((4,), 0.25)
    consts = {"hp": {"noise_weight": jnp.float32(1.0), "align_weight": jnp.float32(1.0),
                     "expert_clean": jnp.bool_(False)}}
    loss, _ = loss_fn({"scale": jnp.float32(1.0)}, consts, x0, jnp.zeros(4, jnp.int32), noise, t, weights)
    target = noise if prediction == "epsilon" else diffusion.v_target(schedule, x01, t, noise)
    w = diffusion.loss_weight(schedule, t, weighting=weighting, prediction=prediction)
    want = jnp.mean(w * jnp.mean((out - target) ** 2, axis=(1, 2, 3)))
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_power_ema_gamma_inverts_edm2_sigma_rel():
    for sigma_rel in (0.05, 0.1, 0.2):
        g = common.power_ema_gamma(sigma_rel)
        assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(sigma_rel, rel=1e-9)
    assert common.power_ema_gamma(0.05) > common.power_ema_gamma(0.1)  # A shorter average, a larger exponent.
    with pytest.raises(ValueError, match="sigma_rel"):
        common.power_ema_gamma(0.3)


def test_power_ema_is_the_weighted_average_of_its_formula():
    # EDM2: the power EMA at step t (1-based) is the average of the parameters of steps i <= t with weights
    # i^(gamma+1) - (i-1)^(gamma+1), the integral of (gamma+1) x^gamma over step i: a power profile.
    gamma = common.power_ema_gamma(0.1)
    params = np.random.default_rng(0).normal(size=(60,))
    ema = 0.0
    for step, p in enumerate(params):
        d = float(common.power_ema_decay_at(step, gamma))
        ema = d * ema + (1 - d) * p
        if step == 0:
            assert d == 0.0
    i = np.arange(1, len(params) + 1, dtype=np.float64)
    w = i ** (gamma + 1) - (i - 1) ** (gamma + 1)
    assert ema == pytest.approx(np.sum(w * params) / np.sum(w), rel=1e-4)


def test_apply_gradients_uses_the_power_ema():
    import optax
    params = {"w": jnp.ones(3)}
    tx = optax.identity()  # The step applies -lr * update itself.
    state = common.TrainState.create(apply_fn=None, params=params, tx=tx, ema_params=jax.tree.map(jnp.copy, params))
    grads = {"w": jnp.full(3, 0.5)}
    new, finite, _ = common.apply_gradients_if_finite(state, grads, jnp.float32(0.0), lr=1.0, ema_power=6.9)
    assert bool(finite)
    np.testing.assert_allclose(new.ema_params["w"], new.params["w"])  # Step 0: decay 0, the EMA copies.
    new2, _, _ = common.apply_gradients_if_finite(new, grads, jnp.float32(0.0), lr=1.0, ema_power=6.9)
    d = float(common.power_ema_decay_at(1, 6.9))
    np.testing.assert_allclose(new2.ema_params["w"], d * 0.5 + (1 - d) * 0.0, rtol=1e-6)


def test_augment_draws_all_8_symmetries_of_a_tile():
    x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
    batch = jnp.repeat(x, 512, axis=0)
    out = np.asarray(pipeline.augment(jax.random.key(0), batch, hflip=True, vflip=True, transpose=True))
    seen = {o.tobytes() for o in out}
    base = np.asarray(x[0])
    group = set()
    for k in range(4):
        r = np.rot90(base, k, axes=(0, 1))
        group |= {r.tobytes(), r[:, ::-1].tobytes()}
    assert len(group) == 8 and seen == group
    counts = np.unique([o.tobytes() for o in out], return_counts=True)[1]
    assert counts.min() > 512 / 8 * 0.6  # Each about 1/8 of the draws.
    # Flips only: 4 of them; the flips' draws do not change when the transpose is added.
    flips = np.asarray(pipeline.augment(jax.random.key(0), batch, hflip=True, vflip=True))
    assert len({o.tobytes() for o in flips}) == 4
    swapped = np.swapaxes(np.asarray(batch), 1, 2)
    again = np.asarray(pipeline.augment(jax.random.key(0), jnp.asarray(swapped), hflip=True, vflip=True))
    untransposed = np.asarray([o.tobytes() == f.tobytes() or o.tobytes() == a.tobytes()
                               for o, f, a in zip(out, flips, again)])
    assert untransposed.all()


def test_config_rejects_bad_recipe_fields():
    c = config_lib.load("baseline", "tiny")
    c.diffusion.prediction = "x0"
    with pytest.raises(config_lib.ConfigError, match="diffusion.prediction"):
        config_lib.validate(c)
    c = config_lib.load("baseline", "tiny")
    c.train.ema_sigma_rel = 0.5
    with pytest.raises(config_lib.ConfigError, match="ema_sigma_rel"):
        config_lib.validate(c)
