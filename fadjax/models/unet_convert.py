"""Loading diffusers U-Net checkpoints (PyTorch weights) into the Flax `UNet`.

The renaming and transposition is diffusers' own PyTorch->Flax converter; the tree it produces is
checked against the `UNet` built from the checkpoint's ``config.json``.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from fadjax.models import weights
from fadjax.models.unet import UNet, param_shapes
from fadjax.models.unet_config import UNetConfig

class _NumpyTensor:
    """The one thing diffusers' converter needs from a PyTorch tensor: `.numpy()`."""

    def __init__(self, array: np.ndarray):
        self._array = array

    def numpy(self) -> np.ndarray:
        return self._array


class _ShapeOnlyModel:
    """Stands in for diffusers' Flax U-Net in its converter, which only reads the shapes of `init_weights`.

    The shapes come from `UNet`, whose tree equals `FlaxUNet2DConditionModel`'s; diffusers' Flax model
    itself cannot even be traced for configs whose channels are not multiples of 32 (it hard-codes 32
    GroupNorm groups).
    """

    def __init__(self, shapes: dict):
        self._shapes = shapes

    def init_weights(self, rng):
        del rng
        return self._shapes


def _resolve_folder(path) -> pathlib.Path:
    """The U-Net folder of a checkpoint folder: itself, or a pipeline folder's `unet/`."""
    folder = pathlib.Path(path)
    if not (folder / "config.json").is_file() and (folder / "unet").is_dir():
        folder = folder / "unet"  # a pipeline folder
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"missing {folder / 'config.json'} (a diffusers U-Net folder needs config.json and "
                                f"{weights.DIFFUSERS.safetensors}; a pipeline folder holds them in unet/)")
    return folder


def _convert(state: dict[str, np.ndarray], shapes: dict) -> dict:
    """Renames/transposes a PyTorch state dict into the Flax tree (`shapes`) with diffusers' own converter."""
    from diffusers.models.modeling_flax_pytorch_utils import \
        convert_pytorch_state_dict_to_flax  # pylint: disable=import-outside-toplevel
    return convert_pytorch_state_dict_to_flax({k: _NumpyTensor(v) for k, v in state.items()}, _ShapeOnlyModel(shapes))


def _check_tree(params: dict, expected: dict, source) -> None:
    got = {k: v.shape for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    want = {k: v.shape for k, v in traverse_util.flatten_dict(expected, sep="/").items()}
    missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    wrong = sorted(f"{k}: {got[k]} != {want[k]}" for k in want.keys() & got.keys() if got[k] != want[k])
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint {source} does not match the U-Net built from its config.json: "
                         f"missing {missing[:20]} ({len(missing)}), unexpected {unexpected[:20]} ({len(unexpected)}), "
                         f"wrong shapes {wrong[:20]} ({len(wrong)})")


def from_pretrained(path, *, in_channels: int | None = None, out_channels: int | None = None, dtype=jnp.float32,
                    allow_pickle: bool = False, rng: jax.Array | None = None,
                    attention: str = "auto") -> tuple[UNet, dict]:
    """Loads a diffusers U-Net checkpoint (PyTorch weights) as `(UNet, float32 params)`.

    Args:
      path: a local diffusers U-Net folder (config.json + diffusion_pytorch_model.safetensors), a pipeline
        folder with a `unet/` subfolder, or, when no such local path exists, a Hugging Face Hub id "org/name"
        (only the U-Net files are downloaded).
      in_channels, out_channels: when given and different from the checkpoint's, conv_in / conv_out are
        replaced by freshly initialised convs (e.g. 1 for grayscale images); the rest is the checkpoint's.
      dtype: compute dtype of the returned module.
      allow_pickle: allow reading a pickled `diffusion_pytorch_model.bin` (with torch, weights_only=True)
        when there is no safetensors file. Unpickling can run arbitrary code.
      rng: key for the replaced convs (default: key 0).
      attention: attention implementation of the module, see `UNet`.

    Returns:
      (module, params).
    """
    names = ["config.json"] + weights.DIFFUSERS.patterns + ([weights.DIFFUSERS.pickle] if allow_pickle else [])
    folder = _resolve_folder(weights.resolve_checkpoint_dir(path, allow_patterns=names + [f"unet/{n}" for n in names]))
    ckpt_config = UNetConfig.from_dict(json.loads((folder / "config.json").read_text()))
    expected = param_shapes(UNet(ckpt_config))
    files = weights.find_weights(folder, allow_pickle=allow_pickle, names=weights.DIFFUSERS)
    params = _convert(weights.read_weights(files), expected)
    _check_tree(params, expected, folder)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)

    config = dataclasses.replace(
        ckpt_config,
        in_channels=ckpt_config.in_channels if in_channels is None else in_channels,
        out_channels=ckpt_config.out_channels if out_channels is None else out_channels)
    module = UNet(config, dtype=dtype, attention=attention)
    replaced = [name for name, old, new in (("conv_in", ckpt_config.in_channels, config.in_channels),
                                            ("conv_out", ckpt_config.out_channels, config.out_channels)) if old != new]
    if replaced:
        def init_io(m, x, h):
            return m.conv_in(x), m.conv_out(h)
        x = jnp.zeros((1, 8, 8, config.in_channels), jnp.float32)
        h = jnp.zeros((1, 8, 8, config.block_out_channels[0]), jnp.float32)
        rng = jax.random.key(0) if rng is None else rng
        fresh = module.init(rng, x, h, method=init_io)["params"]
        params = {**params, **{name: fresh[name] for name in replaced}}
        logging.info("U-Net %s: replaced %s with freshly initialised convs (channels in %d -> %d, out %d -> %d); "
                     "all other weights come from the checkpoint", folder, " and ".join(replaced),
                     ckpt_config.in_channels, config.in_channels, ckpt_config.out_channels, config.out_channels)
    return module, params
