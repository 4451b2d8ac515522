"""The optimizer's numbers as runtime values, the EMA warm-up, the data range and the U-Net's attention levels."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fadjax import config_lib
from fadjax import diffusion as diffusion_lib
from fadjax.models import build
from fadjax.train import common


def _optim(**kw):
    o = config_lib.load("baseline", None).optim
    for k, v in kw.items():
        o[k] = v
    return o


def _lr(o, steps, *, spe, total):
    hp = common.lr_hparams(o, steps_per_epoch=spe, total_steps=total)
    return np.asarray([float(common.learning_rate(o.schedule, s, hp)) for s in steps])


def test_learning_rate_matches_optax_schedules():
    steps = list(range(0, 120, 7))
    o = _optim(lr=1e-3, schedule="cosine", warmup_steps=10)
    want = optax.join_schedules([optax.linear_schedule(0.0, 1e-3, 10), optax.cosine_decay_schedule(1e-3, 90)], [10])
    np.testing.assert_allclose(_lr(o, steps, spe=10, total=100), [float(want(s)) for s in steps], rtol=1e-5, atol=1e-9)
    o = _optim(lr=2e-4, schedule="constant", warmup_steps=0)
    np.testing.assert_allclose(_lr(o, steps, spe=10, total=100), 2e-4, rtol=1e-6)
    o = _optim(lr=1e-4, schedule="step_epoch", step_gamma=0.7, warmup_steps=0)
    np.testing.assert_allclose(_lr(o, steps, spe=10, total=100), [1e-4 * 0.7 ** (s // 10) for s in steps], rtol=1e-5)
    # cosine_epoch: torch CosineAnnealingLR(T_max=epochs) stepped once per epoch (5 epochs of 20 steps).
    o = _optim(lr=1e-4, schedule="cosine_epoch", warmup_steps=0)
    want = [1e-4 * 0.5 * (1 + np.cos(np.pi * (s // 20) / 5)) for s in steps]
    np.testing.assert_allclose(_lr(o, steps, spe=20, total=100), want, rtol=1e-5, atol=1e-12)


def test_runs_of_other_lengths_share_one_compiled_step():
    o = _optim(lr=1e-3, schedule="cosine")
    f = jax.jit(lambda s, hp: common.learning_rate("cosine", s, hp))
    short, long = (common.lr_hparams(o, steps_per_epoch=10, total_steps=n) for n in (100, 400))
    assert f.lower(5, short).as_text() == f.lower(5, long).as_text()  # One program ...
    assert float(f(50, short)) < float(f(50, long))  # ... two schedules.


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_update_equals_optax_adam(weight_decay):
    o = _optim(lr=1e-2, schedule="constant", weight_decay=weight_decay)
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    grads = [jax.tree.map(lambda p, i=i: jnp.sin(p + i), params) for i in range(3)]
    ref_tx = (optax.adamw(1e-2, weight_decay=weight_decay) if weight_decay else optax.adam(1e-2))
    ref, ref_opt = params, ref_tx.init(params)
    state = common.TrainState.create(apply_fn=None, params=params, tx=common.make_optimizer(o))
    for g in grads:
        u, ref_opt = ref_tx.update(g, ref_opt, ref)
        ref = optax.apply_updates(ref, u)
        state, finite, _ = common.apply_gradients_if_finite(state, g, jnp.float32(0.0), lr=jnp.float32(1e-2))
        assert bool(finite)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), state.params, ref)
    assert int(state.step) == 3


def test_ema_warmup():
    d = [float(common.ema_decay_at(t, 0.999, warmup=True)) for t in (0, 8, 80, 10_000)]
    np.testing.assert_allclose(d, [0.1, 0.5, 0.9, 0.999], rtol=1e-6)
    assert float(common.ema_decay_at(0, 0.999, warmup=False)) == pytest.approx(0.999)
    # One step from a zero EMA: with warm-up the EMA holds 0.9 of the new parameters, without it 0.001.
    params = {"w": jnp.zeros(3)}
    for warmup, want in ((True, 0.9), (False, 0.001)):
        state = common.TrainState.create(apply_fn=None, params=params, tx=optax.sgd(1.0),
                                         ema_params=jax.tree.map(jnp.copy, params))
        new, _, _ = common.apply_gradients_if_finite(state, {"w": -jnp.ones(3)}, jnp.float32(0.0), lr=1.0,
                                                      ema_decay=jnp.float32(0.999), ema_warmup=warmup)
        np.testing.assert_allclose(new.ema_params["w"], want * new.params["w"], rtol=1e-4)


def test_data_range_round_trip():
    x = jnp.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(diffusion_lib.to_model_range(x, "[-1,1]"), 2 * x - 1, atol=1e-7)
    np.testing.assert_allclose(diffusion_lib.from_model_range(diffusion_lib.to_model_range(x, "[-1,1]"), "[-1,1]"),
                               x, atol=1e-7)
    assert diffusion_lib.to_model_range(x, "[0,1]") is x
    with pytest.raises(ValueError, match="data_range"):
        diffusion_lib.to_model_range(x, "[0,255]")
    c = config_lib.load("baseline", "tiny")
    c.diffusion.data_range = "0..1"
    with pytest.raises(config_lib.ConfigError, match="diffusion.data_range"):
        config_lib.validate(c)


def test_attention_levels_choose_block_types_and_features():
    c = config_lib.load("baseline", "tiny")
    c.model.block_out_channels = "8,16,16"
    c.model.norm_num_groups = 4
    c.model.attention_levels = "2"
    cfg = build.unet_config(c, channels=1)
    assert cfg.down_block_types == ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D")
    assert cfg.up_block_types == ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    model = build.build_diffusion_model(build.unet(c), cond_mode=c.cond.mode, labels=build.LabelSpace(("a", "b")))
    params = model.init(jax.random.key(0), image_size=8, channels=1)
    flat = jax.tree_util.tree_flatten_with_path(params["unet"])[0]
    names = {jax.tree_util.keystr(k) for k, _ in flat}
    assert any("down_blocks_2']['attentions_0" in n for n in names)
    assert not any("down_blocks_0']['attentions" in n for n in names)
    eps, feats = model(params, jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,), jnp.int32), jnp.array([0, 1]))
    assert eps.shape == (2, 8, 8, 1) and feats["down_2"].shape == (2, 2, 2, 16)
    # The class conditioning still changes the output (it enters through the level-2 cross-attention).
    assert float(jnp.abs(eps[0] - eps[1]).max()) > 0
    c.model.attention_levels = "3"
    with pytest.raises(config_lib.ConfigError, match="model.attention_levels"):
        config_lib.validate(c)
