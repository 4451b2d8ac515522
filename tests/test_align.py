"""Alignment loss: known values, pooling, scale invariance, and where its gradient goes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fadjax import align

IDENTITY = {"kernel": jnp.eye(3), "bias": jnp.zeros(3)}
E = jnp.array([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]])  # [B, D]
ORTHOGONAL = jnp.array([[3.0, 0.0, -1.0], [1.0, 0.0, 0.0]])  # orthogonal to E row by row


@pytest.mark.parametrize("unet, expected", [(E, 0.0), (-E, 2.0), (ORTHOGONAL, 1.0), (7.5 * E, 0.0)])
def test_known_values(unet, expected):
    loss = align.cosine_alignment_loss(IDENTITY, E, unet)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, expected, atol=1e-6)


def test_scale_invariance_and_projection():
    rng = np.random.RandomState(0)
    proj = align.init_projection(jax.random.PRNGKey(0), 6, 4)
    expert_feat = jnp.asarray(rng.randn(2, 3, 3, 6), jnp.float32)  # [B, h, w, D_e]
    unet_feat = jnp.asarray(rng.randn(2, 2, 2, 4), jnp.float32)  # [B, h, w, D_u]
    loss = align.cosine_alignment_loss(proj, expert_feat, unet_feat)
    np.testing.assert_allclose(align.cosine_alignment_loss(proj, expert_feat, 3.0 * unet_feat), loss, rtol=1e-5)
    scaled_proj = jax.tree.map(lambda p: 2.0 * p, proj)
    np.testing.assert_allclose(align.cosine_alignment_loss(scaled_proj, expert_feat, unet_feat), loss, rtol=1e-5)
    # Same as the formula written out.
    e = expert_feat.mean((1, 2)) @ proj["kernel"] + proj["bias"]
    u = unet_feat.mean((1, 2))
    cos = np.sum(e * u, -1) / np.linalg.norm(e, axis=-1) / np.linalg.norm(u, axis=-1)
    np.testing.assert_allclose(loss, np.mean(1 - cos), rtol=1e-5)
    # bf16 inputs are computed in float32.
    assert align.cosine_alignment_loss(proj, expert_feat.astype(jnp.bfloat16), unet_feat).dtype == jnp.float32


def test_init_projection_like_torch_linear():
    proj = align.init_projection(jax.random.PRNGKey(1), 16, 5)
    assert proj["kernel"].shape == (16, 5) and proj["bias"].shape == (5,)
    assert float(jnp.max(jnp.abs(proj["kernel"]))) <= 0.25 and float(jnp.max(jnp.abs(proj["bias"]))) <= 0.25
    ones = jnp.ones((2, 16))
    np.testing.assert_allclose(align.project(proj, ones), ones @ proj["kernel"] + proj["bias"])


def test_spatial_pool():
    f = jnp.arange(2 * 2 * 3 * 4, dtype=jnp.float32).reshape(2, 2, 3, 4)
    np.testing.assert_allclose(align.spatial_pool(f), f.mean((1, 2)))
    assert align.spatial_pool(E) is E
    with pytest.raises(ValueError):
        align.spatial_pool(jnp.zeros((2, 3, 4)))


def test_gradient_flows_to_projection_and_unet_only():
    proj = align.init_projection(jax.random.PRNGKey(0), 3, 3)
    grads = jax.grad(align.cosine_alignment_loss, argnums=(0, 1, 2))(proj, E, ORTHOGONAL)
    g_proj, g_expert, g_unet = grads
    assert float(jnp.abs(g_proj["kernel"]).sum()) > 0 and float(jnp.abs(g_unet).sum()) > 0
    np.testing.assert_array_equal(g_expert, 0.0)
    # Zero features give a finite loss and gradient (the norms are floored at eps).
    g_zero = jax.grad(align.cosine_alignment_loss, argnums=2)(proj, E, jnp.zeros_like(E))
    assert np.all(np.isfinite(g_zero))


def test_shape_errors():
    with pytest.raises(ValueError, match="projector maps"):
        align.cosine_alignment_loss(IDENTITY, E, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="batch sizes"):
        align.cosine_alignment_loss(IDENTITY, E, jnp.zeros((3, 3)))
