"""Class conditioning: both modes' shapes and gradients; CLIP text features against PyTorch."""
import json
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fadjax.models import conditioning

TEXTS = ["tumor", "stroma", "complex", "lympho", "debris", "mucosa", "adipose", "empty"]


def _write_tiny_tokenizer(folder):
    """A CLIP BPE vocabulary of single letters plus two merges; the special tokens get the top ids."""
    tokens = list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    tokens += ["tu", "or</w>", "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nt u\no r</w>\n")
    return len(tokens)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    torch = pytest.importorskip("torch")
    import transformers

    folder = tmp_path_factory.mktemp("clip")
    vocab = _write_tiny_tokenizer(folder)
    text = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    model.eval().save_pretrained(folder)
    return folder, model


def test_clip_text_features_match_torch(tiny_clip):
    import torch
    import transformers

    folder, model = tiny_clip
    features = conditioning.compute_clip_text_features(folder, TEXTS)
    tokens = transformers.CLIPTokenizer.from_pretrained(folder)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.get_text_features(**tokens).numpy()
    assert features.shape == (8, 8) and features.dtype == np.float32
    np.testing.assert_allclose(features, expected, atol=1e-4)


def test_clip_errors(tmp_path, tiny_clip):
    folder, _ = tiny_clip
    with pytest.raises(FileNotFoundError, match="config.json"):
        conditioning.compute_clip_text_features(tmp_path, TEXTS)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        conditioning.compute_clip_text_features(tmp_path, TEXTS)
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match="pickle"):
        conditioning.compute_clip_text_features(tmp_path, TEXTS)


def _context_and_grads(module, labels, text_features=None):
    params = module.init(jax.random.PRNGKey(0), labels, text_features)["params"]
    context = module.apply({"params": params}, labels, text_features)
    grads = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, labels, text_features) ** 2))(params)
    return params, context, grads


def test_class_embed_mode():
    module = conditioning.ClassConditioner("class_embed", num_classes=8, dim=12)
    labels = jnp.array([3, 3, 0], jnp.int32)
    params, context, grads = _context_and_grads(module, labels)
    assert params["embedding"]["embedding"].shape == (8, 12)
    assert context.shape == (3, 1, 12) and context.dtype == jnp.float32
    np.testing.assert_array_equal(context[0], context[1])
    g = np.asarray(grads["embedding"]["embedding"])
    assert np.all(g[[0, 3]] != 0) and np.all(g[[1, 2, 4, 5, 6, 7]] == 0)


def test_clip_mode():
    text = jnp.asarray(np.random.RandomState(0).randn(8, 6), jnp.float32)  # [K, text_dim]
    module = conditioning.ClassConditioner("clip", num_classes=8, dim=12, text_dim=6)
    labels = jnp.array([1, 7], jnp.int32)
    params, context, grads = _context_and_grads(module, labels, text)
    assert params["text_proj"]["kernel"].shape == (6, 12)
    assert context.shape == (2, 1, 12) and context.dtype == jnp.float32
    expected = text[labels] @ params["text_proj"]["kernel"] + params["text_proj"]["bias"]
    np.testing.assert_allclose(context[:, 0], expected, rtol=1e-6)
    assert float(jnp.abs(grads["text_proj"]["kernel"]).sum()) > 0
    assert float(jnp.abs(jax.grad(lambda t: jnp.sum(module.apply({"params": params}, labels, t)))(text)).sum()) == 0


def test_clip_mode_errors():
    module = conditioning.ClassConditioner("clip", num_classes=8, dim=12, text_dim=6)
    labels = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="needs text_features"):
        module.init(jax.random.PRNGKey(0), labels)
    with pytest.raises(ValueError, match=r"\[8, 6\]"):
        module.init(jax.random.PRNGKey(0), labels, jnp.zeros((8, 512)))
    with pytest.raises(ValueError, match="unknown conditioning mode"):
        conditioning.ClassConditioner("onehot", num_classes=8, dim=12).init(jax.random.PRNGKey(0), labels)
