"""U-Net: parity with diffusers (Flax and PyTorch), checkpoint loading, config validation, size.

Parameters are random draws over `param_shapes` (no compiled random init), so each parity test
compiles only the forward passes it compares.
"""
import dataclasses
import functools
import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fadjax.bench import record_attention
from fadjax.models import attention as attention_lib
from fadjax.models.unet import UNet, init_params, param_shapes
from fadjax.models.unet_config import UNetConfig, tiny_sd_config
from fadjax.models.unet_convert import from_pretrained

# tiny-sd's shape: 3 cross-attention down/up blocks, no mid block, one resnet per down block.
TINY_SD_LIKE = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
    mid_block_type=None, layers_per_block=1, attention_head_dim=2, cross_attention_dim=16)
# SD-1.5's shape: last down / first up block without attention, mid block, two resnets per block.
SD15_LIKE = dict(
    sample_size=8, in_channels=3, out_channels=2, block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2,
    mid_block_type="UNetMidBlock2DCrossAttn", layers_per_block=2, attention_head_dim=(1, 2, 2),
    cross_attention_dim=16, use_linear_projection=True)
# For the PyTorch checkpoint: GroupNorm groups other than 32 (diffusers' Flax port cannot run it), and
# channels that give down blocks 1 and 2 a conv_shortcut (the reference code's hook is down_2_shortcut).
TORCH_CKPT = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32, 48),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", layers_per_block=1, attention_head_dim=2,
    cross_attention_dim=16, norm_num_groups=8)


def random_params(shapes, seed=0):
    """Random float32 params: kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1), biases ~ N(0, 0.1)."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(shapes)
    out = {}
    for path, leaf in flat.items():
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if path[-1] == "kernel":
            out[path] = noise / np.sqrt(np.prod(leaf.shape[:-1]))
        elif path[-1] == "scale":
            out[path] = 1 + 0.1 * noise
        else:
            out[path] = 0.1 * noise
    return traverse_util.unflatten_dict(out)


def inputs(config, batch=2, size=8, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, config.in_channels)).astype(np.float32)
    t = np.array([3, 777][:batch], np.int32)
    context = rng.standard_normal((batch, 3, config.cross_attention_dim)).astype(np.float32)
    return x, t, context


# XLA's cheap CPU compile settings: half the compile time, and these tests are about values, not speed.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def apply_unet(module, params, x, t, context):
    return run_compiled(lambda p, x, t, c: module.apply({"params": p}, x, t, c), params, x, t, context)


def shape_tree(tree):
    return {k: v.shape for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


@pytest.mark.parametrize("config_dict", [TINY_SD_LIKE, SD15_LIKE], ids=["tiny_sd_like", "sd15_like"])
def test_parity_with_diffusers_flax(config_dict, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models import attention_flax
    diffusers.utils.logging.set_verbosity_error()
    # diffusers' Flax port uses the tanh-approximate GELU where PyTorch (and we) use the exact one;
    # patch it so that the comparison is about everything else. (Its transformer GroupNorm epsilon,
    # 1e-5 vs PyTorch's 1e-6, is left as it is: it moves eps by ~1e-5.)
    monkeypatch.setattr(attention_flax.nn, "gelu", functools.partial(jax.nn.gelu, approximate=False))
    config = UNetConfig.from_dict(config_dict)
    module = UNet(config)
    reference = diffusers.FlaxUNet2DConditionModel(**config_dict)
    ref_shapes = jax.eval_shape(reference.init_weights, jax.random.key(0))
    assert shape_tree(param_shapes(module)) == shape_tree(ref_shapes)

    params = random_params(ref_shapes)
    x, t, context = inputs(config)
    eps, features = apply_unet(module, params, x, t, context)
    ref = run_compiled(lambda p: reference.apply({"params": p}, x.transpose(0, 3, 1, 2), jnp.asarray(t), context).sample,
                       params)
    np.testing.assert_allclose(eps, ref.transpose(0, 2, 3, 1), atol=1e-4, rtol=0)
    assert eps.shape == (2, 8, 8, config.out_channels) and eps.dtype == jnp.float32
    expected = {"down_0": (2, 4, 4, 32), "down_1": (2, 2, 2, 64), "down_1_shortcut": (2, 4, 4, 64),
                "down_2": (2, 2, 2, 64)}
    if config.mid_block_type:
        expected["mid"] = (2, 2, 2, 64)
    # Up blocks' outputs too (issue 16): one per up block, the last at full resolution.
    ups = sorted(k for k in features if k.startswith("up_"))
    assert ups == [f"up_{i}" for i in range(len(config.block_out_channels))] and features[ups[-1]].shape[1] == 8
    assert {k: v.shape for k, v in features.items() if not k.startswith("up_")} == expected
    assert all(v.dtype == jnp.float32 for v in features.values())


@pytest.fixture(scope="module")
def torch_checkpoint(tmp_path_factory):
    """A random PyTorch diffusers U-Net saved as safetensors and as a pickle (.bin)."""
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    model = UNet2DConditionModel(**TORCH_CKPT).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms, biases and zero-initialised layers
            p.add_(0.1 * torch.randn_like(p))
    safe = tmp_path_factory.mktemp("ckpt_safetensors")
    pickled = tmp_path_factory.mktemp("ckpt_bin")
    model.save_pretrained(safe)
    model.save_pretrained(pickled, safe_serialization=False)
    return model, safe, pickled


def test_parity_with_pytorch_checkpoint(torch_checkpoint):
    torch = pytest.importorskip("torch")
    model, folder, _ = torch_checkpoint
    module, params = from_pretrained(folder)
    assert module.config == UNetConfig.from_dict(TORCH_CKPT)
    x, t, context = inputs(module.config)

    captured = {}
    hooks = []
    for i, block in enumerate(model.down_blocks):
        hooks.append(block.register_forward_hook(
            lambda mod, args, out, i=i: captured.__setitem__(f"down_{i}", out[0])))
        shortcut = block.resnets[0].conv_shortcut
        if shortcut is not None:
            hooks.append(shortcut.register_forward_hook(
                lambda mod, args, out, i=i: captured.__setitem__(f"down_{i}_shortcut", out)))
    hooks.append(model.mid_block.register_forward_hook(lambda mod, args, out: captured.__setitem__("mid", out)))
    with torch.no_grad():
        ref = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(context)).sample
    for hook in hooks:
        hook.remove()

    eps, features = apply_unet(module, params, x, t, context)
    np.testing.assert_allclose(eps, ref.permute(0, 2, 3, 1).numpy(), atol=1e-3, rtol=0)
    assert {k for k in features if not k.startswith("up_")} == set(captured) == {"down_0", "down_1", "down_1_shortcut", "down_2", "down_2_shortcut",
                                              "mid"}
    for name, value in captured.items():
        np.testing.assert_allclose(features[name], value.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=0,
                                   err_msg=name)


def test_missing_files(tmp_path, torch_checkpoint):
    _, folder, _ = torch_checkpoint
    with pytest.raises(FileNotFoundError, match="not found"):
        from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    (tmp_path / "unet").mkdir()  # a pipeline folder whose unet/ lacks its config
    with pytest.raises(FileNotFoundError, match="unet/config.json"):
        from_pretrained(tmp_path)


def test_pickle_refused_unless_allowed(torch_checkpoint, tmp_path):
    pytest.importorskip("torch")
    _, safe, pickled = torch_checkpoint
    with pytest.raises(ValueError, match="pickle.*arbitrary code.*allow_pickle=True"):
        from_pretrained(pickled)
    # A pipeline folder (weights in unet/) with the pickled weights, allowed.
    shutil.copytree(pickled, tmp_path / "unet")
    _, from_bin = from_pretrained(tmp_path, allow_pickle=True)
    _, from_safe = from_pretrained(safe)
    jax.tree.map(np.testing.assert_array_equal, from_bin, from_safe)


def test_channel_replacement(torch_checkpoint, caplog):
    _, folder, _ = torch_checkpoint
    _, original = from_pretrained(folder)
    with caplog.at_level(logging.INFO):
        module, params = from_pretrained(folder, in_channels=1, out_channels=1, rng=jax.random.key(3))
    assert "replaced conv_in and conv_out" in caplog.text
    assert (module.config.in_channels, module.config.out_channels) == (1, 1)
    assert shape_tree(params) == shape_tree(param_shapes(module))
    assert params["conv_in"]["kernel"].shape == (3, 3, 1, 16)
    assert params["conv_out"]["kernel"].shape == (3, 3, 16, 1)
    rest = {k: v for k, v in params.items() if k not in ("conv_in", "conv_out")}
    jax.tree.map(np.testing.assert_array_equal, rest,
                 {k: v for k, v in original.items() if k not in ("conv_in", "conv_out")})


def test_hub_id_goes_through_snapshot_download(torch_checkpoint, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    _, folder, _ = torch_checkpoint
    shutil.copytree(folder, tmp_path / "unet")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    module, _ = from_pretrained("someorg/some-model")
    assert calls[0][0] == "someorg/some-model"
    assert "unet/diffusion_pytorch_model.safetensors" in calls[0][1]
    assert not any(p.endswith(".bin") for p in calls[0][1])
    assert module.config.block_out_channels == (16, 32, 48)
    with pytest.raises(FileNotFoundError):  # a relative path that does not exist is not a hub id
        from_pretrained("./someorg/some-model")
    assert len(calls) == 1


def test_tiny_sd_param_count():
    config = tiny_sd_config()
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(param_shapes(UNet(config))))
    assert abs(count - 323.4e6) < 0.05e6, count
    assert config.num_heads == (8, 8, 8)


def test_config_round_trip_and_rejections():
    config = tiny_sd_config(in_channels=1, out_channels=1)
    assert UNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    ignored = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.39.0", "act_fn": "silu",
               "class_embed_type": None, "only_cross_attention": [False, False, False], "upcast_attention": True}
    assert UNetConfig.from_dict({**config.to_dict(), **ignored}) == config
    for bad in ({"class_embed_type": "timestep"}, {"addition_embed_type": "text_time"},
                {"time_cond_proj_dim": 256}, {"act_fn": "gelu"}, {"some_new_key": 1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            UNetConfig.from_dict({**config.to_dict(), **bad})
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        UNetConfig.from_dict({**config.to_dict(), "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 3})
    with pytest.raises(ValueError, match="norm_num_groups"):
        tiny_sd_config(norm_num_groups=48)


def test_init_params_dtypes_and_image_size_check():
    config = UNetConfig(in_channels=1, out_channels=1, block_out_channels=(8, 8),
                        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                        mid_block_type=None, layers_per_block=1, attention_head_dim=1, cross_attention_dim=4,
                        norm_num_groups=4)
    params = jax.eval_shape(functools.partial(init_params, UNet(config), image_size=8), jax.random.key(0))
    assert shape_tree(params) == shape_tree(param_shapes(UNet(config)))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    x, t, context = inputs(config, batch=1)
    bf16 = UNet(config, dtype=jnp.bfloat16)
    eps, features = jax.eval_shape(lambda p: bf16.apply({"params": p}, x, t[0], context), params)
    assert eps.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in features.values())
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(param_shapes(bf16)))
    with pytest.raises(ValueError, match="7x7"):
        jax.eval_shape(lambda p: UNet(config).apply({"params": p}, x[:, :7, :7], t, context), params)
    with pytest.raises(ValueError, match="attention"):
        jax.eval_shape(lambda p: UNet(config, attention="flash").apply({"params": p}, x, t, context), params)
    assert attention_lib.ATTENTION_IMPLEMENTATIONS["auto"] is None


@pytest.mark.parametrize("min_queries, max_elements, blocks", [
    (1, 4 * 3 * 40 * 16, (4, 16)),   # Blocks of 16 queries (a divisor of 48), the whole batch: 3 blocks.
    (48, 2 * 3 * 48 * 40, (2, 48)),  # Every query of 2 batch items: 2 groups.
    (24, 2 * 3 * 24 * 40, (2, 24)),  # 2 groups of 2 items, each 2 blocks of 24 queries.
])
def test_chunked_attention_matches_full_attention_and_its_gradients(monkeypatch, min_queries, max_elements, blocks):
    monkeypatch.setattr(attention_lib, "MIN_QUERY_BLOCK", min_queries)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(k1, (4, 48, 3, 8))
    k, v = jax.random.normal(k2, (4, 40, 3, 8)), jax.random.normal(k3, (4, 40, 3, 8))
    assert attention_lib._blocks(q.shape, 40, max_elements) == blocks
    chunked = functools.partial(attention_lib.chunked_attention, max_elements=max_elements)
    loss = {name: (lambda q, k, v, f=f: jnp.sum(jnp.sin(f(q, k, v)))) for name, f in {
        "full": functools.partial(jax.nn.dot_product_attention, implementation="xla"), "chunked": chunked}.items()}
    np.testing.assert_allclose(loss["chunked"](q, k, v), loss["full"](q, k, v), rtol=1e-5)
    for a, b in zip(jax.grad(loss["chunked"], (0, 1, 2))(q, k, v), jax.grad(loss["full"], (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert "while" in jax.jit(chunked).lower(q, k, v).as_text()  # Blocks, one after the other ...
    assert "while" not in jax.jit(functools.partial(attention_lib.chunked_attention, max_elements=4 * 3 * 48 * 40)).lower(
        q, k, v).as_text()  # ... unless one block holds them all.


def test_auto_attention_chunks_only_large_score_tensors(monkeypatch):
    config = UNetConfig(**{**TINY_SD_LIKE, "in_channels": 1, "out_channels": 1})
    params = jax.eval_shape(functools.partial(init_params, UNet(config), image_size=16), jax.random.key(0))
    x, t, context = inputs(config, batch=2, size=16)

    def calls(attention):
        with record_attention() as counts:
            jax.eval_shape(lambda p: UNet(config, attention=attention).apply({"params": p}, x, t, context), params)
        return dict(counts)

    # 3 levels x (1 down + 2 up) transformer blocks, each with self- and cross-attention: 18 calls, whose
    # scores fit one CPU block: XLA, also when 'chunked' is asked for.
    assert calls("auto") == {"xla": 18}
    assert calls("chunked") == {"xla": 18}
    # Batch 2 x 2 heads x 256 x 256 self-attention scores at 16x16 (the largest): chunked above one block.
    monkeypatch.setattr(attention_lib, "CPU_CHUNK_ELEMENTS", 2 * 2 * 256 * 256 - 1)
    assert calls("auto") == {"chunked": 3, "xla": 15}
    assert calls("chunked") == {"chunked": 3, "xla": 15}
    assert calls("xla") == {"xla": 18}
    with pytest.raises(ValueError, match="needs a GPU"):
        calls("cudnn")


def test_class_projection_matches_diffusers(tmp_path):
    """class_embed_type 'projection' (config.model.class_to_time): the class vector, added to the time
    embedding, reaches blocks without attention; our U-Net feeds it the context's mean, as diffusers
    does its class_labels."""
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel
    spec = dict(TORCH_CKPT, class_embed_type="projection", projection_class_embeddings_input_dim=16)
    torch.manual_seed(0)
    model = UNet2DConditionModel(**spec).eval()
    model.save_pretrained(tmp_path)
    module, params = from_pretrained(tmp_path)
    assert module.config.class_embed_type == "projection" and "class_embedding" in params
    x, t, context = inputs(module.config)
    with torch.no_grad():
        ref = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(context),
                    class_labels=torch.from_numpy(context.mean(1))).sample
    eps, _ = apply_unet(module, params, x, t, context)
    np.testing.assert_allclose(eps, ref.permute(0, 2, 3, 1).numpy(), atol=1e-3, rtol=0)
    # Without attention anywhere, the class reaches the output only through the time embedding.
    plain = tiny_sd_config(in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                           cross_attention_dim=8, down_block_types=("DownBlock2D",) * 2,
                           up_block_types=("UpBlock2D",) * 2, class_embed_type="projection",
                           projection_class_embeddings_input_dim=8)
    p = init_params(UNet(plain), jax.random.key(0), image_size=8)
    x1 = np.zeros((2, 8, 8, 1), np.float32)
    ctx = np.stack([np.zeros((1, 8)), np.ones((1, 8))]).astype(np.float32)
    eps2, _ = apply_unet(UNet(plain), p, x1, np.array([5, 5], np.int32), ctx)
    assert np.abs(eps2[0] - eps2[1]).max() > 1e-4
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        dataclasses.replace(plain, projection_class_embeddings_input_dim=4)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_group_norm_matches_flax_values_and_gradients(silu, dtype):
    """models.group_norm.GroupNorm: flax's GroupNorm (+ SiLU), its parameters, and a hand-written gradient."""
    from flax import linen as nn
    from fadjax.models.group_norm import GroupNorm
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 4, 6, 16)) * 2 + 0.5, jnp.float32)
    params = {"scale": jnp.asarray(rng.standard_normal(16) + 1, jnp.float32),
              "bias": jnp.asarray(rng.standard_normal(16), jnp.float32)}
    g_out = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    ours = GroupNorm(num_groups=4, epsilon=1e-6, silu=silu, dtype=dtype)
    theirs = nn.GroupNorm(num_groups=4, epsilon=1e-6, dtype=dtype)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, theirs.init(jax.random.key(0), x))

    def loss(module, post):
        return lambda p, x: jnp.sum(post(module.apply({"params": p}, x)).astype(jnp.float32) * g_out)

    post = nn.silu if silu else (lambda y: y)
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    y_ours, y_theirs = ours.apply({"params": params}, x), post(theirs.apply({"params": params}, x))
    assert y_ours.dtype == dtype
    np.testing.assert_allclose(np.asarray(y_ours, np.float32), np.asarray(y_theirs, np.float32), atol=tol, rtol=tol)
    g_ours = jax.grad(loss(ours, lambda y: y), argnums=(0, 1))(params, x)
    g_theirs = jax.grad(loss(theirs, post), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_theirs)):
        scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol * max(scale, 1.0))


def test_upsample_conv_is_the_conv_of_the_upsampled_image():
    """The sub-pixel form of the up blocks' upsampler: same values and gradients as repeat-then-conv."""
    from fadjax.models.unet import upsample_conv
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 5, 4)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 4, 6)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, 6, 10, 6)), jnp.float32)

    def reference(x, k):
        up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return jax.lax.conv_general_dilated(up, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    np.testing.assert_allclose(upsample_conv(x, k), reference(x, k), atol=1e-5)
    grads = [jax.grad(lambda x, k, f=f: jnp.sum(f(x, k) * g), argnums=(0, 1))(x, k) for f in (upsample_conv, reference)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, atol=1e-4)
