"""Class conditioning of the U-Net: one cross-attention token per image.

Two modes (paper §V-B and its equivalent without CLIP weights):

- `class_embed`: a learned table `[num_classes, dim]`.
- `clip`: the CLIP ViT-B/32 text features of the class names (`get_text_features`, computed once
  per run by `compute_clip_text_features`) go through a trainable Linear(text_dim, dim), the
  paper's Linear(512, 768).
"""
from __future__ import annotations

import os
from typing import Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fadjax.models import weights

MODES = ("class_embed", "clip")
_TOKENIZER_FILES = ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


class ClassConditioner(nn.Module):
    """Labels -> cross-attention context `[B, 1, dim]`.

    Attributes:
      mode: 'class_embed' or 'clip'.
      num_classes: Number of classes K.
      dim: Cross-attention width of the U-Net (768 for tiny-sd).
      text_dim: Width of the CLIP text features (512 for ViT-B/32); 'clip' mode only.
    """

    mode: str
    num_classes: int
    dim: int
    text_dim: int = 512

    @nn.compact
    def __call__(self, labels: jax.Array, text_features: jax.Array | np.ndarray | None = None) -> jax.Array:
        """Looks up the context of each label.

        Args:
          labels: `[B]` int32 class indices.
          text_features: `[num_classes, text_dim]` constants; required in 'clip' mode, ignored in
            'class_embed' mode.

        Returns:
          `[B, 1, dim]` float32.
        """
        if self.mode == "class_embed":
            table = nn.Embed(
                self.num_classes, self.dim, embedding_init=nn.initializers.normal(0.02), name="embedding"
            )
            context = table(labels)  # [B, dim]
        elif self.mode == "clip":
            if text_features is None:
                raise ValueError("ClassConditioner(mode='clip') needs text_features [num_classes, text_dim]")
            if tuple(text_features.shape) != (self.num_classes, self.text_dim):
                raise ValueError(
                    f"text_features must be [num_classes, text_dim] = [{self.num_classes}, {self.text_dim}], "
                    f"got {tuple(text_features.shape)}"
                )
            text = jax.lax.stop_gradient(jnp.asarray(text_features, jnp.float32))[labels]  # [B, text_dim]
            context = nn.Dense(
                self.dim,
                kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
                name="text_proj",
            )(text)  # [B, dim]
        else:
            raise ValueError(f"unknown conditioning mode {self.mode!r}; expected one of {MODES}")
        return context[:, None, :].astype(jnp.float32)


def compute_clip_text_features(
    clip_path: str | os.PathLike, texts: Sequence[str], *, allow_pickle: bool = False
) -> np.ndarray:
    """CLIP text features (`get_text_features`: projected pooled text embedding) of `texts`.

    Runs transformers' FlaxCLIPModel on a local CLIP folder (config.json, model.safetensors and
    the tokenizer files); safetensors weights need no torch, and every tensor is checked to be
    used. Meant to run once per run.

    Args:
      clip_path: Local CLIP folder, or a hub id "org/name" (downloaded only when it is not a
        local path), e.g. "openai/clip-vit-base-patch32".
      texts: The strings to encode, e.g. the class names.
      allow_pickle: Accept a pickled `pytorch_model.bin` (needs torch).

    Returns:
      `[len(texts), projection_dim]` float32.

    Raises:
      FileNotFoundError: missing folder, config.json or weights.
      ValueError: pickled weights without `allow_pickle`, not a CLIP config, or checkpoint
        tensors that do not match the model (listed).
    """
    import transformers  # pylint: disable=import-outside-toplevel

    directory = weights.resolve_checkpoint_dir(
        clip_path,
        allow_patterns=["config.json"] + weights.TRANSFORMERS.patterns + _TOKENIZER_FILES
        + ([weights.TRANSFORMERS.pickle] if allow_pickle else []),
    )
    files = weights.find_weights(directory, allow_pickle=allow_pickle)
    config = transformers.CLIPConfig.from_pretrained(directory)
    if config.model_type != "clip":
        raise ValueError(f"{directory} is not a CLIP checkpoint (model_type={config.model_type!r})")
    model = transformers.FlaxCLIPModel(config, _do_init=False, dtype=jnp.float32)
    params = _clip_params(model, weights.read_weights(files), directory)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(directory)
    tokens = tokenizer(
        list(texts),
        padding=True,
        truncation=True,
        max_length=config.text_config.max_position_embeddings,
        return_tensors="np",
    )
    encode = jax.jit(lambda p, ids, mask: model.get_text_features(ids, mask, params=p))
    features = encode(params, tokens["input_ids"], tokens["attention_mask"])  # [N, projection_dim]
    logging.info("CLIP text features of %d texts from %s: %s", len(texts), directory, features.shape)
    return np.asarray(features, np.float32)


def _clip_params(model, tensors: dict[str, np.ndarray], directory: str) -> dict:
    """Renames a PyTorch CLIPModel state dict to `model`'s Flax params, checking every tensor.

    Uses transformers' own renaming rule (`rename_key_and_reshape_tensor`) against the shape tree
    of a model built with `_do_init=False`: no random init, no torch. Buffers (`position_ids`)
    are skipped.
    """
    from flax import traverse_util  # pylint: disable=import-outside-toplevel
    from transformers.modeling_flax_pytorch_utils import (  # pylint: disable=import-outside-toplevel
        rename_key_and_reshape_tensor,
    )

    shapes = traverse_util.flatten_dict(model.params_shape_tree)
    flat, unused, mismatched = {}, [], []
    for key, value in tensors.items():
        if key.endswith("position_ids"):
            continue
        flax_key, value = rename_key_and_reshape_tensor(tuple(key.split(".")), value, shapes, model.base_model_prefix)
        if flax_key not in shapes:
            unused.append(key)
        elif value.shape != shapes[flax_key].shape:
            mismatched.append(f"{key}: checkpoint {value.shape} vs model {shapes[flax_key].shape}")
        else:
            flat[flax_key] = jnp.asarray(value)
    missing = sorted("/".join(k) for k in shapes if k not in flat)
    if unused or missing or mismatched:
        raise ValueError(
            f"checkpoint {directory} does not match the CLIP model its config describes:\n"
            f"  unused checkpoint tensors: {unused}\n  missing model parameters: {missing}\n"
            f"  mismatched shapes: {mismatched}"
        )
    return traverse_util.unflatten_dict(flat)
