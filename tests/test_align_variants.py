"""Alignment variants (issue 16): MLP projector, token-wise loss, grids, U-Net up/mid features, and a
tiny training run of each mode x projector combination on the demo source."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fadjax import align, config_lib


def test_mlp_projector_shapes_and_init():
    p = align.init_projector(jax.random.key(0), 6, 4, kind="mlp", hidden=5)
    assert {k: v["kernel"].shape for k, v in p.items()} == {"fc_0": (6, 5), "fc_1": (5, 5), "fc_2": (5, 4)}
    assert align.projector_dims(p) == (6, 4)
    assert float(jnp.max(jnp.abs(p["fc_0"]["kernel"]))) <= 1 / np.sqrt(6)
    x = jax.random.normal(jax.random.key(1), (3, 2, 2, 6))
    y = align.project(p, x)
    assert y.shape == (3, 2, 2, 4)
    # The MLP is Linear-SiLU-Linear-SiLU-Linear.
    h = jax.nn.silu(x @ p["fc_0"]["kernel"] + p["fc_0"]["bias"])
    h = jax.nn.silu(h @ p["fc_1"]["kernel"] + p["fc_1"]["bias"])
    np.testing.assert_allclose(y, h @ p["fc_2"]["kernel"] + p["fc_2"]["bias"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="projector"):
        align.init_projector(jax.random.key(0), 2, 2, kind="conv")


def test_token_loss_hand_computed():
    # U-Net map 2x2 with 2 channels, expert map 1x1: the U-Net's map is average-pooled to 1x1 after
    # the (identity) projection, then one cosine per position.
    identity = {"kernel": jnp.eye(2), "bias": jnp.zeros(2)}
    unet = jnp.array([[[[1.0, 0.0], [3.0, 0.0]], [[0.0, 2.0], [0.0, 2.0]]]])  # mean over positions: (1, 1)
    expert = jnp.array([[[[1.0, 0.0]]]])
    loss = align.token_alignment_loss(identity, expert, unet)
    np.testing.assert_allclose(loss, 1 - 1 / np.sqrt(2), rtol=1e-6)
    # Same grid, two positions: cosines 1 and 0 -> mean loss 0.5.
    u = jnp.array([[[[1.0, 0.0], [0.0, 1.0]]]])  # [1, 1, 2, 2]
    e = jnp.array([[[[2.0, 0.0], [5.0, 0.0]]]])
    np.testing.assert_allclose(align.token_alignment_loss(identity, e, u), 0.5, rtol=1e-6)
    # Token-wise differs from pooled: the pooled vectors of u and e have cos 1/sqrt(2).
    np.testing.assert_allclose(align.cosine_alignment_loss(identity, e, u), 1 - 1 / np.sqrt(2), rtol=1e-6)


def test_common_grid_pools_the_finer_map_and_resizes_otherwise():
    a = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    b = jnp.ones((2, 2, 2, 5))
    ua, eb = align.common_grid(a, b)
    assert ua.shape == (2, 2, 2, 3) and eb.shape == (2, 2, 2, 5)
    np.testing.assert_allclose(ua[0, 0, 0], a[0, :2, :2].mean(axis=(0, 1)))
    ub, ea = align.common_grid(b, a)  # the expert's map is the finer one
    assert ub.shape == (2, 2, 2, 5) and ea.shape == (2, 2, 2, 3)
    uc, _ = align.common_grid(jnp.ones((1, 3, 3, 2)), jnp.ones((1, 2, 2, 2)))  # 3 -> 2: bilinear
    assert uc.shape == (1, 2, 2, 2)


def test_token_loss_gradients_reach_unet_and_projector_not_expert():
    p = align.init_projector(jax.random.key(0), 4, 3, kind="mlp", hidden=8)
    u = jax.random.normal(jax.random.key(1), (2, 4, 4, 4))
    e = jax.random.normal(jax.random.key(2), (2, 2, 2, 3))
    gp, ge, gu = jax.grad(align.token_alignment_loss, argnums=(0, 1, 2))(p, e, u)
    assert float(jnp.abs(ge).max()) == 0.0
    assert float(jnp.abs(gu).max()) > 0 and all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(gp))
    loss = align.alignment_loss("tokens", p, e, u)
    assert loss.shape == () and 0.0 <= float(loss) <= 2.0


def test_token_loss_rejects_pooled_features_and_wrong_widths():
    p = align.init_projector(jax.random.key(0), 4, 3)
    with pytest.raises(ValueError, match="spatial"):
        align.token_alignment_loss(p, jnp.ones((2, 3)), jnp.ones((2, 2, 2, 4)))
    with pytest.raises(ValueError, match="projector maps 4 -> 3"):
        align.token_alignment_loss(p, jnp.ones((2, 2, 2, 5)), jnp.ones((2, 2, 2, 4)))
    assert align.projector_io("pooled", expert_dim=7, unet_dim=9) == (7, 9)
    assert align.projector_io("tokens", expert_dim=7, unet_dim=9) == (9, 7)


def test_config_validation_of_align_fields():
    c = config_lib.load("feature_aligned", "tiny")
    c.align.mode = "tokens"  # with the default expert_feature 'pooled'
    with pytest.raises(config_lib.ConfigError, match="align.expert_feature"):
        config_lib.validate(c)
    c.align.expert_feature, c.align.projector = "stage_2", "deep"
    with pytest.raises(config_lib.ConfigError, match="align.projector"):
        config_lib.validate(c)


def test_unet_exposes_up_block_features():
    from fadjax.models import build
    c = config_lib.load("baseline", "tiny")
    model = build.build_diffusion_model(build.unet(c), cond_mode=c.cond.mode,
                                        labels=build.LabelSpace(("a", "b"), has_null=False))
    shapes = model.feature_shapes(image_size=16, channels=1)
    assert {"down_0", "down_2", "up_0", "up_1", "up_2"} <= set(shapes)
    assert shapes["up_2"][1:3] == (16, 16)


@pytest.fixture(scope="module")
def demo_expert(tmp_path_factory):
    from fadjax import train as train_lib
    c = config_lib.load("expert", "tiny")
    c.data.source, c.data.image_size, c.data.val_fraction = "demo:4", 16, 0.5
    c.train.progress, c.train.num_epochs, c.train.batch_size = False, 1, 8
    workdir = tmp_path_factory.mktemp("expert")
    train_lib.run(c, workdir)
    return workdir


@pytest.mark.parametrize("mode, projector, expert_feature", [
    ("pooled", "mlp", "pooled"), ("tokens", "linear", "stage_2"), ("tokens", "mlp", "stage_1")])
def test_tiny_training_run_of_each_variant(demo_expert, tmp_path, mode, projector, expert_feature):
    from fadjax import runs
    from fadjax import train as train_lib
    c = config_lib.load("feature_aligned", "tiny")
    c.data.source, c.data.image_size, c.train.progress = "demo:4", 16, False
    c.model.block_out_channels, c.model.attention_head_dim, c.model.cross_attention_dim = "8,16", 1, 8
    c.model.norm_num_groups, c.train.num_steps, c.train.checkpoint_every, c.train.log_every = 4, 2, 2, 1
    c.align.expert_workdir = str(demo_expert)
    c.align.mode, c.align.projector, c.align.projector_hidden = mode, projector, 8
    c.align.expert_feature, c.align.unet_feature, c.align.weight = expert_feature, "up_0", 0.5
    train_lib.run(c, tmp_path)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["align_loss"] <= 2.0
        assert r["loss"] == pytest.approx(r["noise_loss"] + 0.5 * r["align_loss"], rel=1e-5)
    proj = runs.load_diffusion_run(tmp_path).params["proj"]
    assert ("fc_0" in proj) == (projector == "mlp")
