"""Expert networks: shapes, BatchNorm modes, and parity of `from_pretrained` with transformers' PyTorch ResNet."""
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fadjax.models import expert, weights

X = np.random.RandomState(0).rand(2, 32, 32, 3).astype(np.float32)  # [B, H, W, C] in [0, 1]


def _apply(module, variables, x):
    return jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, jnp.asarray(x))


def _torch_resnet(folder, *, for_classification=False, seed=0, **config):
    """Saves a random transformers ResNet with non-trivial BatchNorm statistics; returns the model."""
    torch = pytest.importorskip("torch")
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.ResNetConfig(**config, num_labels=7)
    cls = transformers.ResNetForImageClassification if for_classification else transformers.ResNetModel
    model = cls(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    return model


def _torch_pooled(model, x):
    import torch

    base = getattr(model, "resnet", model)
    with torch.no_grad():
        out = base(torch.from_numpy(x).permute(0, 3, 1, 2))
    return out.pooler_output.flatten(1).numpy(), out.last_hidden_state.permute(0, 2, 3, 1).numpy()


R50_LAYOUT = dict(embedding_size=8, hidden_sizes=[16, 32, 64, 128], depths=[3, 4, 6, 3], layer_type="bottleneck")
R18_LAYOUT = dict(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[2, 2, 2, 2], layer_type="basic")


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    folder = tmp_path_factory.mktemp("r50")
    return folder, _torch_resnet(folder, **R50_LAYOUT)


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    folder = tmp_path_factory.mktemp("r18")
    return folder, _torch_resnet(folder, **R18_LAYOUT)


def _assert_close(actual, expected, rel=1e-3):
    actual = np.asarray(actual)
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= rel * np.abs(expected).max()


def test_resnet50_layout_parity(r50):
    folder, model = r50
    module, variables = expert.from_pretrained(str(folder))
    assert module.block == "bottleneck" and tuple(module.stage_sizes) == (3, 4, 6, 3)
    assert expert.feature_dim(module) == 128
    logits, feats = _apply(module, variables, X)
    pooled, last = _torch_pooled(model, X)
    assert logits is None
    _assert_close(feats["pooled"], pooled)
    _assert_close(feats["stage_4"], last)
    assert feats["stem"].shape == (2, 8, 8, 8)


@pytest.mark.parametrize(
    "layout",
    [
        dict(R18_LAYOUT),
        dict(R18_LAYOUT, depths=[1, 1, 1, 1], layer_type="bottleneck", downsample_in_bottleneck=True,
             downsample_in_first_stage=True),
    ],
    ids=["resnet18_layout", "bottleneck_flags"],
)
def test_other_layouts_parity(tmp_path, layout):
    model = _torch_resnet(tmp_path, **layout)
    module, variables = expert.from_pretrained(tmp_path)
    _, feats = _apply(module, variables, X)
    _assert_close(feats["pooled"], _torch_pooled(model, X)[0])


def test_image_classification_checkpoint_drops_imagenet_head(tmp_path):
    model = _torch_resnet(tmp_path, for_classification=True, **R18_LAYOUT)
    module, variables = expert.from_pretrained(tmp_path)
    assert "head" not in variables["params"]
    _, feats = _apply(module, variables, X)
    _assert_close(feats["pooled"], _torch_pooled(model, X)[0])


def test_one_channel_stem_and_fresh_head(r18, caplog):
    folder, _ = r18
    full = expert.from_pretrained(folder)[1]
    with caplog.at_level(logging.INFO):
        module, variables = expert.from_pretrained(folder, in_channels=1, num_classes=5, rng=jax.random.PRNGKey(3))
    assert "fresh init" in caplog.text
    params = variables["params"]
    assert params["stem"]["conv"]["kernel"].shape == (7, 7, 1, 8)
    assert params["head"]["hidden"]["kernel"].shape == (64, 256)
    assert params["head"]["out"]["kernel"].shape == (256, 5)
    # Everything but the stem conv and the head is the checkpoint's.
    np.testing.assert_array_equal(params["stem"]["bn"]["scale"], full["params"]["stem"]["bn"]["scale"])
    np.testing.assert_array_equal(
        params["stage_3"]["block_1"]["conv_1"]["conv"]["kernel"],
        full["params"]["stage_3"]["block_1"]["conv_1"]["conv"]["kernel"],
    )
    logits, feats = _apply(module, variables, X[..., :1])
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert feats["pooled"].shape == (2, 64)
    single = expert.from_pretrained(folder, num_classes=5, head_hidden=None)[1]
    assert single["params"]["head"]["out"]["kernel"].shape == (64, 5)


def test_errors(tmp_path, r18):
    folder, _ = r18
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expert.from_pretrained(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        expert.from_pretrained(empty)
    (empty / "config.json").write_text(json.dumps(dict(model_type="resnet")))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        expert.from_pretrained(empty)
    (empty / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(ValueError, match="pickle"):
        expert.from_pretrained(empty)
    (empty / "config.json").write_text(json.dumps(dict(model_type="vit")))
    (empty / "pytorch_model.bin").unlink()
    (empty / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="not a transformers ResNet"):
        expert.from_pretrained(empty)


def test_unused_and_missing_tensors_are_listed(tmp_path, r18):
    from safetensors.numpy import load_file, save_file

    folder, _ = r18
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    tensors["encoder.extra.weight"] = np.zeros(3, np.float32)
    del tensors["encoder.stages.1.layers.0.shortcut.normalization.running_var"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="encoder.extra.weight") as err:
        expert.from_pretrained(tmp_path)
    assert "batch_stats/stage_2/block_0/shortcut/bn/var" in str(err.value)


def test_allow_pickle_loads_bin(tmp_path, r18):
    _, model = r18
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert os.path.exists(tmp_path / "bin" / "pytorch_model.bin")
    module, variables = expert.from_pretrained(tmp_path / "bin", allow_pickle=True)
    _, feats = _apply(module, variables, X)
    _assert_close(feats["pooled"], _torch_pooled(model, X)[0])


def test_hub_download_only_for_hub_ids(monkeypatch, r18):
    import huggingface_hub

    folder, _ = r18
    calls = []

    def fake_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    weights.resolve_checkpoint_dir(folder, allow_patterns=["config.json"])
    with pytest.raises(FileNotFoundError):
        weights.resolve_checkpoint_dir("/no/such/dir", allow_patterns=["config.json"])
    assert calls == []
    assert weights.resolve_checkpoint_dir("microsoft/resnet-50", allow_patterns=["config.json"]) == str(folder)
    assert calls == [("microsoft/resnet-50", ["config.json"])]

    def failing_download(repo_id, allow_patterns):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing_download)
    with pytest.raises(FileNotFoundError, match="offline"):
        expert.from_pretrained("microsoft/resnet-50")


def test_batchnorm_train_updates_stats_eval_uses_them():
    module = expert.build_expert("resnet18", num_classes=3, width=4)
    variables = expert.init_expert(module, jax.random.PRNGKey(0), image_size=32, in_channels=1)
    x = jnp.asarray(X[..., :1])
    train_apply = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))
    (train_logits, _), updates = train_apply(variables, x)
    before = variables["batch_stats"]["stem"]["bn"]["mean"]
    after = updates["batch_stats"]["stem"]["bn"]["mean"]
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, 0.9 * before + 0.1 * jnp.mean(_stem_conv(module, variables, x), (0, 1, 2)),
                               rtol=1e-4, atol=1e-6)
    new_vars = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    eval_1, _ = _apply(module, new_vars, x)
    eval_2, _ = _apply(module, new_vars, x)
    np.testing.assert_array_equal(eval_1, eval_2)
    assert not np.allclose(eval_1, train_logits)


def _stem_conv(module, variables, x):
    kernel = variables["params"]["stem"]["conv"]["kernel"]
    return jax.lax.conv_general_dilated(x, kernel, (2, 2), ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize(
    "arch, dim", [("resnet18", 32), ("resnet34", 32), ("resnet50", 128), ("resnet101", 128)]
)
def test_build_expert_shapes(arch, dim):
    module = expert.build_expert(arch, num_classes=8, width=4, dtype=jnp.bfloat16)
    assert expert.feature_dim(module) == dim
    x = jax.ShapeDtypeStruct((2, 64, 64, 1), jnp.float32)
    variables = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False), x)
    assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float32
    logits, feats = jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, x)
    assert logits.shape == (2, 8) and logits.dtype == jnp.float32
    assert feats["pooled"].shape == (2, dim)
    assert feats["stem"].shape == (2, 16, 16, 4)
    assert [feats[f"stage_{i}"].shape[1] for i in range(1, 5)] == [16, 8, 4, 2]


def test_vit_tiny_shapes():
    module = expert.build_expert("vit_b16", num_classes=3, patch_size=8, dim=16, depth=2, num_heads=2, mlp_dim=32)
    variables = expert.init_expert(module, jax.random.PRNGKey(0), image_size=32, in_channels=1)
    assert set(variables) == {"params"}
    logits, feats = _apply(module, variables, X[..., :1])
    assert logits.shape == (2, 3)
    assert feats["pooled"].shape == (2, 16) and expert.feature_dim(module) == 16
    assert feats["stem"].shape == feats["block_2"].shape == (2, 4, 4, 16)
    assert np.all(np.isfinite(logits))


def test_vit_b16_defaults():
    module = expert.build_expert("vit_b16", num_classes=None)
    assert (module.patch_size, module.dim, module.depth, module.num_heads, module.mlp_dim) == (16, 768, 12, 12, 3072)
    with pytest.raises(ValueError, match="unknown expert"):
        expert.build_expert("resnet_tiny", num_classes=2)


def test_sharded_safetensors_and_diffusers_names(tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "config.json").write_text("{}")
    save_file({"a": np.ones((2,), np.float16)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": np.arange(3, dtype=np.int64)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    files = weights.find_weights(tmp_path, allow_pickle=False)
    assert [os.path.basename(f) for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    tensors = weights.read_weights(files)
    assert tensors["a"].dtype == np.float32 and tensors["b"].dtype == np.int64  # Floats as float32, ints kept.
    assert "model-*.safetensors" in weights.TRANSFORMERS.patterns  # Shards are downloaded from a hub id.
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        weights.find_weights(tmp_path, allow_pickle=False, names=weights.DIFFUSERS)
    assert not weights.is_hub_id("./org/name") and weights.is_hub_id("org/name")
