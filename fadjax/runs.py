"""Loading finished (or running) runs for inference: diffusion models and experts.

A run's workdir holds ``config.json``, ``run.json``, ``split.json`` and orbax checkpoints
(see ``docs/ARCHITECTURE.md``). Nothing here unpickles anything.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fadjax import checkpoints
from fadjax import config_lib
from fadjax import diffusion as diffusion_lib
from fadjax import workdir as workdir_lib
from fadjax.models import build


def _checkpointer(directory: pathlib.Path, workdir):
    if not directory.is_dir():
        raise FileNotFoundError(f"{workdir} has no checkpoints ({directory} does not exist); train it first")
    ckpt = checkpoints.Checkpointer(directory, keep=1, read_only=True)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"{workdir} has no checkpoints in {directory}; train it first")
    return ckpt


def directory_sha256(path: pathlib.Path) -> str:
    """SHA-256 over the relative names and bytes of every file under ``path`` (sorted)."""
    h = hashlib.sha256()
    for f in sorted(p for p in pathlib.Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def merge_params(target, source, *, source_name: str = "", **kw) -> Any:
    """``target`` with every leaf that ``source`` has at the same path and shape replaced.

    Leaves that differ in shape (e.g. a conditioning table with extra rows) keep as many
    leading rows of the source as fit; leaves missing from the source stay as initialised. Source
    leaves the target lacks are named in a warning.
    """
    source_name = source_name or kw.get("source", "")
    flat_src = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(source)[0]}
    copied, partial, fresh, used = 0, [], [], set()

    def pick(path, leaf):
        nonlocal copied
        key = jax.tree_util.keystr(path)
        used.add(key)
        src = flat_src.get(key)
        if src is None:
            fresh.append(key)
            return leaf
        src = np.asarray(src)
        if src.shape == leaf.shape:
            copied += 1
            return jnp.asarray(src, leaf.dtype)
        if src.ndim == leaf.ndim and src.shape[1:] == leaf.shape[1:]:
            n = min(src.shape[0], leaf.shape[0])
            partial.append(key)
            return jnp.asarray(leaf).at[:n].set(jnp.asarray(src[:n], leaf.dtype))
        fresh.append(key)
        return leaf

    out = jax.tree_util.tree_map_with_path(pick, target)
    logging.info("initialised from %s: %d tensors copied, %d partially (%s), %d fresh (%s)",
                 source_name, copied, len(partial), partial, len(fresh), fresh[:8])
    unused = [k for k in flat_src if k not in used]
    if unused:
        logging.warning("%s has %d tensors this model does not (not used): %s", source_name, len(unused), unused[:8])
    return out


# ----------------------------------------------------------------------------- diffusion runs

@dataclasses.dataclass
class DiffusionRun:
    """A trained diffusion model, ready to sample."""

    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    step: int
    labels: build.LabelSpace
    model: build.DiffusionModel
    params: Any
    text_features: np.ndarray | None
    schedule: diffusion_lib.Schedule
    used_ema: bool
    record: dict

    @property
    def class_names(self) -> list[str]:
        return list(self.labels.class_names)

    @property
    def image_size(self) -> int:
        return int(self.config.data.image_size)

    @property
    def channels(self) -> int:
        return int(self.config.data.channels)

    @property
    def null_label(self) -> int | None:
        return self.labels.null_label

    @property
    def data_range(self) -> str:
        """The range the model diffuses images in (runs from before the field: "[0,1]")."""
        return self.config.diffusion.get("data_range", "[0,1]")

    @property
    def prediction(self) -> str:
        """What the model predicts, ``"epsilon"`` or ``"v_prediction"`` (runs from before the field: epsilon)."""
        return self.config.diffusion.get("prediction", "epsilon")

    @property
    def condition_labels(self) -> dict[str, int]:
        """Label to sample each class with (DreamBooth runs use their identifier row)."""
        out = {n: i for i, n in enumerate(self.labels.class_names)}
        out.update(self.record.get("condition_overrides", {}))
        return out

    @functools.cached_property
    def eps_fn(self) -> Callable:
        """Pure ``eps_fn(params, x, t, labels) -> output``: the U-Net's raw output, the noise or ``v`` as
        :attr:`prediction` says (``t`` int or fractional); one function per run, so jit caches stay warm."""
        model, tf = self.model, self.text_features

        def eps_fn(params, x, t, labels):
            return model(params, x, t, labels, tf)[0]

        return eps_fn


def load_diffusion_run(workdir, *, step: int | None = None, use_ema: bool = True,
                       dtype: str | None = None) -> DiffusionRun:
    """Loads a diffusion run's parameters (EMA ones when the run kept them and ``use_ema``).

    Args:
      workdir: the run's folder.
      step: a checkpoint step; None = the latest.
      use_ema: prefer the EMA parameters when the run has them.
      dtype: compute dtype override ("float32"/"bfloat16"); None = the run's.

    Raises:
      FileNotFoundError: naming the workdir when it holds no run or no checkpoint.
    """
    workdir = pathlib.Path(workdir)
    config = workdir_lib.read_config(workdir)
    record = workdir_lib.read_json(workdir / "run.json")
    if dtype is not None:
        config.dtype = dtype
    labels = build.LabelSpace.from_dict(record["labels"])
    ckpt = _checkpointer(workdir / "checkpoints", workdir)
    step = ckpt.latest_step() if step is None else int(step)
    if step not in ckpt.manager.all_steps():
        raise FileNotFoundError(f"{workdir} has no checkpoint at step {step}; it has {ckpt.manager.all_steps()}")
    tree, _ = ckpt.restore(step)
    ckpt.close()
    used_ema = bool(use_ema and tree.get("ema_params") is not None)
    params = tree["ema_params"] if used_ema else tree["params"]
    params = jax.tree.map(jnp.asarray, params)
    text_features = None
    if config.cond.mode == "clip":
        text_features = build.null_padded(np.load(workdir / "text_features.npy", allow_pickle=False), labels)
    unet_module = None
    if "unet_config" in record:  # The architecture as trained (also for pretrained U-Nets).
        from fadjax.models import unet as unet_lib, unet_config
        unet_module = unet_lib.UNet(unet_config.UNetConfig.from_dict(record["unet_config"]),
                                    dtype=config_lib.compute_dtype(config),
                                    attention=config.model.attention)
    if unet_module is None:
        unet_module = build.unet(config)
    model = build.build_diffusion_model(unet_module, cond_mode=config.cond.mode, labels=labels)
    schedule = diffusion_lib.make_schedule(config.diffusion.num_train_timesteps, config.diffusion.beta_schedule)
    return DiffusionRun(workdir, config, int(step), labels, model, params, text_features, schedule, used_ema, record)


# ----------------------------------------------------------------------------- experts

def module_spec(module) -> dict:
    """The constructor fields of a Flax module, JSON-ready (to rebuild it without weights)."""
    fields = {}
    for f in dataclasses.fields(module):
        if f.name in ("parent", "name", "dtype") or not f.init:
            continue
        v = getattr(module, f.name)
        fields[f.name] = list(v) if isinstance(v, tuple) else v
    return {"class": type(module).__name__, "fields": fields}


def module_from_spec(spec: dict, *, dtype=jnp.float32):
    from fadjax.models import expert as expert_lib
    cls = getattr(expert_lib, spec["class"])
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["fields"].items()}
    return cls(**fields, dtype=dtype)


@dataclasses.dataclass
class ExpertRun:
    """A trained expert classifier (its best checkpoint by validation accuracy)."""

    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    step: int
    module: Any
    variables: Any
    class_names: list[str]
    val_accuracy: float | None
    checkpoint_sha256: str
    split: dict

    @property
    def image_size(self) -> int:
        return int(self.config.data.image_size)

    @property
    def channels(self) -> int:
        return int(self.config.data.channels)

    def feature_shapes(self, *, image_size: int, channels: int) -> dict[str, tuple[int, ...]]:
        x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
        feats = jax.eval_shape(lambda v, x: self.module.apply(v, x, train=False)[1], self.variables, x)
        return {k: tuple(v.shape) for k, v in feats.items()}

    @property
    def classify_fn(self) -> Callable:
        """Pure ``classify_fn(x [B,H,W,C] in [0,1]) -> logits``, resized to the expert's size."""
        module, variables, size = self.module, self.variables, self.image_size

        def classify(x):
            if x.shape[1] != size or x.shape[2] != size:
                x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bilinear")
            return module.apply(variables, x, train=False)[0].astype(jnp.float32)

        return classify

    def load_val_data(self) -> tuple[np.ndarray, np.ndarray]:
        """The expert's validation images (uint8 at its size) and labels, from its data source."""
        return self._load_part("val_idx")

    def load_train_data(self) -> tuple[np.ndarray, np.ndarray]:
        """The expert's training images (uint8 at its size) and labels, from its data source."""
        return self._load_part("train_idx")

    def _load_part(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        from fadjax.data import from_config as inputs
        ds = inputs.load_dataset(self.config, self.workdir)
        idx = np.asarray(self.split[key], np.int64)
        return ds.images[idx], ds.labels[idx].astype(np.int32)


def load_expert_run(workdir, *, dtype=jnp.float32) -> ExpertRun:
    """Loads the best checkpoint (by validation accuracy) of an expert run.

    Raises:
      FileNotFoundError: naming the workdir when it holds no expert run or no checkpoint.
    """
    workdir = pathlib.Path(workdir)
    config = workdir_lib.read_config(workdir)
    record = workdir_lib.read_json(workdir / "run.json")
    if record.get("stage") != "expert":
        raise ValueError(f"{workdir} is a {record.get('stage')!r} run, not an expert run")
    best_dir = workdir / "best"
    ckpt = _checkpointer(best_dir, workdir)
    step = ckpt.best_step() or ckpt.latest_step()
    tree, meta = ckpt.restore(step)
    ckpt.close()
    module = module_from_spec(record["expert_module"], dtype=dtype)
    variables = {"params": tree["params"]}
    if tree.get("batch_stats") is not None:
        variables["batch_stats"] = tree["batch_stats"]
    variables = jax.tree.map(jnp.asarray, variables)
    raw = workdir_lib.read_json(workdir / "split.json")
    files = [None] * int(raw["num_examples"])
    for part in ("train", "val"):
        for i, f in zip(raw[part]["indices"], raw[part]["files"]):
            files[i] = f
    split = {"train_idx": raw["train"]["indices"], "val_idx": raw["val"]["indices"], "files": files,
             "source": raw["source"], "class_names": raw["class_names"]}
    return ExpertRun(workdir, config, int(step), module, variables, list(record["class_names"]),
                     meta.get("val_accuracy"), directory_sha256(best_dir / str(step)), split)
