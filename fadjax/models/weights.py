"""Outside checkpoints (diffusers U-Nets, transformers ResNets and CLIP): where they are, which files hold the
weights, and reading them into numpy without PyTorch.

A checkpoint is a local folder, or, only when no such path exists and the name looks like one, a Hugging
Face hub id "org/name" (then only the files a loader asks for are downloaded). Weights are read from
safetensors (one file, or the shards an index lists); a pickled PyTorch file is refused unless the caller
passes ``allow_pickle=True`` (unpickling can run arbitrary code), and then read with torch's
``weights_only=True``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Sequence

import numpy as np
from absl import logging

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclasses.dataclass(frozen=True)
class WeightFiles:
    """File names of one checkpoint format: single safetensors file, its shard index, the pickle."""
    safetensors: str
    index: str
    pickle: str
    # How to turn the pickle into safetensors, for the refusal message.
    convert_hint: str = "load it in PyTorch and save it with save_pretrained(..., safe_serialization=True)"

    @property
    def patterns(self) -> list[str]:
        """Hub download patterns of the safetensors weights (single file, index and shards)."""
        stem = self.safetensors[: -len(".safetensors")]
        return [self.safetensors, self.index, f"{stem}-*.safetensors"]


TRANSFORMERS = WeightFiles("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
DIFFUSERS = WeightFiles(
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    convert_hint="in PyTorch: UNet2DConditionModel.from_pretrained(folder).save_pretrained(folder, "
                 "safe_serialization=True)")


def is_hub_id(path) -> bool:
    """True for "org/name" strings that are not local paths ("./org/name" never is)."""
    text = os.fspath(path)
    return not os.path.exists(text) and bool(_HUB_ID.fullmatch(text)) and not text.startswith(".")


def resolve_checkpoint_dir(path: str | os.PathLike, *, allow_patterns: Sequence[str]) -> str:
    """A local checkpoint folder for `path`, downloading it only when it is a hub id.

    Args:
      path: A local folder, or a hub id "org/name" that is not a local path.
      allow_patterns: File patterns to download from the hub (only used for hub ids).

    Returns:
      The local folder.

    Raises:
      FileNotFoundError: `path` is neither an existing folder nor a hub id, or the download failed.
    """
    text = os.fspath(path)
    if os.path.isdir(text):
        return text
    if os.path.exists(text):
        raise FileNotFoundError(f"{text} is a file; expected a checkpoint folder (config.json + weights)")
    if is_hub_id(text):
        import huggingface_hub  # pylint: disable=import-outside-toplevel

        logging.info("%s is not a local folder: downloading it from the Hugging Face hub", text)
        try:
            return huggingface_hub.snapshot_download(repo_id=text, allow_patterns=list(allow_patterns))
        except Exception as e:  # network, auth or missing repo: say what was tried
            raise FileNotFoundError(
                f"{text!r} is not a local folder and could not be fetched from the Hugging Face hub: {e}"
            ) from e
    raise FileNotFoundError(f"checkpoint folder not found: {text} does not exist (and is not a hub id 'org/name')")


def find_weights(directory, *, allow_pickle: bool, names: WeightFiles = TRANSFORMERS) -> list[str]:
    """The weight files of a checkpoint folder, refusing a pickle unless allowed.

    Args:
      directory: Checkpoint folder (must hold config.json).
      allow_pickle: Accept the pickled file when there is no safetensors file.
      names: The format's file names (`TRANSFORMERS`, `DIFFUSERS`).

    Returns:
      Paths: the single safetensors file, the shards its index lists, or the pickle.

    Raises:
      FileNotFoundError: config.json or the weights are missing.
      ValueError: only a pickle is there and `allow_pickle` is False.
    """
    directory = os.fspath(directory)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"no config.json in {directory}")
    single = os.path.join(directory, names.safetensors)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(directory, names.index)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(directory, s) for s in shards]
    pickled = os.path.join(directory, names.pickle)
    if os.path.isfile(pickled):
        if not allow_pickle:
            raise ValueError(
                f"{pickled} is a pickled PyTorch checkpoint; unpickling can run arbitrary code, so it is refused. "
                f"Convert it to {names.safetensors} ({names.convert_hint}) or pass allow_pickle=True if you trust "
                "the file (needs torch).")
        return [pickled]
    raise FileNotFoundError(f"no weights in {directory}: expected {names.safetensors} or {names.index}")


def read_weights(files: Sequence[str]) -> dict[str, np.ndarray]:
    """Reads weight files from `find_weights` into numpy (floats as float32); torch only for a pickle."""
    tensors = {}
    for file in files:
        if file.endswith(".safetensors"):
            from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

            tensors.update(load_file(file))
        else:
            try:
                import torch  # pylint: disable=import-outside-toplevel
            except ImportError as e:
                raise ImportError(f"reading the pickled {file} needs PyTorch; install torch or convert it to "
                                  "safetensors") from e
            state = torch.load(file, map_location="cpu", weights_only=True)
            tensors.update({k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()})
    return {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in tensors.items()}
