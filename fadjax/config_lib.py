"""Configs: loading the files of ``configs/`` and validating what they hold.

Every field, with its comment and the paper's value as its default, lives in ``configs/``
(``expert.py``, ``baseline.py``, ``feature_aligned.py``, ``dreambooth.py``; ``common.py`` holds the
sections they share). This module loads them (:func:`load`) and rejects values that cannot work
before anything is built (:func:`validate`); it holds no defaults.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import types

import ml_collections

STAGES = ("expert", "diffusion")
PARALLEL = ("sharded", "pmap")
DTYPES = ("float32", "bfloat16")
LR_SCHEDULES = ("constant", "cosine", "cosine_epoch", "step_epoch")
EXPERT_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "vit_b16")
COND_MODES = ("class_embed", "clip")
EXPERT_INPUTS = ("noisy", "clean")
ALIGN_MODES = ("pooled", "tokens")  # fadjax.align.MODES
PROJECTORS = ("linear", "mlp")  # fadjax.align.PROJECTORS
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "euler", "heun")  # fadjax.sampling.SAMPLERS
DATA_RANGES = ("[0,1]", "[-1,1]")  # fadjax.diffusion.DATA_RANGES
PREDICTIONS = ("epsilon", "v_prediction")  # fadjax.diffusion.PREDICTIONS
LOSS_WEIGHTINGS = ("none", "min_snr")  # fadjax.diffusion.LOSS_WEIGHTINGS
PLACEMENTS = ("auto", "device", "host")  # fadjax.data.host_feed.PLACEMENTS
ATTENTIONS = ("auto", "cudnn", "xla", "chunked")  # fadjax.models.attention.ATTENTION_IMPLEMENTATIONS


CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"  # The repository's configs/.


def config_module(name: str, *, beside: str | os.PathLike | None = None) -> types.ModuleType:
    """The module of the config file ``NAME.py``: in ``beside``'s folder, else the repository's ``configs/``.

    Config files load their siblings with it (``config_module("baseline", beside=__file__)``), and the
    package loads the repository's configs by name. Each call executes the file afresh.

    Raises:
      ConfigError: no such file.
    """
    folder = pathlib.Path(beside).resolve().parent if beside else CONFIG_DIR
    path = folder / f"{name}.py"
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (the configs live in the repository's configs/ folder; "
                          f"install fadjax from a clone with `pip install -e .`)")
    spec = importlib.util.spec_from_file_location(f"fadjax_configs.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``configs/NAME.py``'s ``get_config(arg)``, as ``--config configs/NAME.py:ARG`` gives it to train.py."""
    return config_module(name).get_config(arg)


def compute_dtype(config):
    """The run's compute dtype (``config.dtype``) as a JAX dtype; parameters and optimizer state stay float32."""
    import jax.numpy as jnp
    return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config.{field}: {msg}")


def parse_int_list(s: str | None) -> tuple[int, ...] | None:
    """``"32,64,64"`` -> ``(32, 64, 64)``; None stays None."""
    if s is None:
        return None
    return tuple(int(v) for v in str(s).replace(" ", "").split(",") if v)


def parse_names(s: str | None) -> list[str] | None:
    """``"tumor, stroma"`` -> ``["tumor", "stroma"]``; None or "" -> None."""
    if s is None:
        return None
    names = [v.strip().lower() for v in str(s).split(",") if v.strip()]
    return names or None


def parse_guidance_interval(spec) -> tuple[float, float] | None:
    """``"0.28,2.9"`` -> ``(0.28, 2.9)`` (``hi`` may be ``inf``); None, "" or "none" -> None.

    Raises:
      ValueError: not two numbers ``0 <= lo < hi``.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
        return None
    parts = str(spec).replace(" ", "").split(",") if isinstance(spec, str) else list(spec)
    try:
        lo, hi = (float(v) for v in parts)
    except (TypeError, ValueError):
        raise ValueError(f"{spec!r} is not 'sigma_lo,sigma_hi'") from None
    if not 0.0 <= lo < hi:  # Also refuses NaN.
        raise ValueError(f"{spec!r}: need 0 <= sigma_lo < sigma_hi")
    return lo, hi


def parse_seeds(spec: str | int) -> list[int]:
    """``"0-14"`` -> 0..14, ``"0,3,5"`` -> [0, 3, 5], ``"4"`` -> [4]."""
    out: list[int] = []
    for part in str(spec).replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f"seed range {part!r} is empty")
            out.extend(range(lo, hi + 1))
        elif re.fullmatch(r"\d+", part):
            out.append(int(part))
        else:
            raise ValueError(f"cannot parse seeds {spec!r}: expected e.g. '0-14' or '0,3,5'")
    if not out:
        raise ValueError(f"no seeds in {spec!r}")
    return out


def validate(config: ml_collections.ConfigDict) -> None:
    """Rejects values that cannot work, before anything is built or compiled.

    Raises:
      ConfigError: naming the field and what is wrong with it.
    """
    _check(config.stage in STAGES, "stage", f"{config.stage!r} is not one of {STAGES}")
    _check(config.parallel in PARALLEL, "parallel", f"{config.parallel!r} is not one of {PARALLEL}")
    _check(config.num_devices is None or config.num_devices >= 1, "num_devices",
           f"{config.num_devices} must be >= 1")
    _check(config.dtype in DTYPES, "dtype", f"{config.dtype!r} is not one of {DTYPES}")
    d = config.data
    _check(isinstance(d.source, str) and bool(d.source), "data.source",
           "no data source: pass --config.data.source=folder:/path/to/tiles (one folder per class), "
           "tfds:colorectal_histology (downloads the paper's dataset) or demo")
    _check(d.image_size >= 8, "data.image_size", f"{d.image_size} is too small (>= 8)")
    _check(d.channels in (1, 3), "data.channels", f"{d.channels} must be 1 or 3")
    _check(0.0 < d.val_fraction < 1.0, "data.val_fraction", f"{d.val_fraction} must be in (0, 1)")
    _check(d.get("placement", "auto") in PLACEMENTS, "data.placement", f"{d.get('placement')!r} is not one of {PLACEMENTS}")
    _check(0.0 < d.get("device_share", 0.25) <= 1.0, "data.device_share", f"{d.get('device_share')} must be in (0, 1]")
    _check(d.get("prefetch", 4) >= 1, "data.prefetch", f"{d.get('prefetch')} must be >= 1")
    t = config.train
    _check((t.num_epochs is None) != (t.num_steps is None), "train.num_epochs",
           f"set exactly one of train.num_epochs ({t.num_epochs}) and train.num_steps ({t.num_steps})")
    for f in ("num_epochs", "num_steps"):
        v = t[f]
        _check(v is None or v > 0, f"train.{f}", f"{v} must be > 0")
    _check(t.batch_size > 0, "train.batch_size", f"{t.batch_size} must be > 0")
    _check(t.log_every > 0, "train.log_every", f"{t.log_every} must be > 0")
    _check(t.checkpoint_every > 0, "train.checkpoint_every", f"{t.checkpoint_every} must be > 0")
    _check(t.get("keep_evenly") is None or t.keep_evenly >= 1, "train.keep_evenly",
           f"{t.get('keep_evenly')} must be >= 1")
    o = config.optim
    _check(o.lr > 0, "optim.lr", f"{o.lr} must be > 0")
    _check(o.schedule in LR_SCHEDULES, "optim.schedule", f"{o.schedule!r} is not one of {LR_SCHEDULES}")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"{o.weight_decay} must be >= 0")
    if config.stage == "expert":
        _check(config.expert.arch in EXPERT_ARCHS, "expert.arch", f"{config.expert.arch!r} is not one of {EXPERT_ARCHS}")
        return
    _check(config.model.attention in ATTENTIONS, "model.attention",
           f"{config.model.attention!r} is not one of {ATTENTIONS}")
    _check(config.cond.mode in COND_MODES, "cond.mode", f"{config.cond.mode!r} is not one of {COND_MODES}")
    _check(config.cond.mode != "clip" or config.cond.clip_path, "cond.clip_path",
           "mode 'clip' needs a local CLIP folder (or a hub id such as openai/clip-vit-base-patch32)")
    _check(0.0 <= config.cond.label_dropout < 1.0, "cond.label_dropout", f"{config.cond.label_dropout} must be in [0, 1)")
    df = config.diffusion
    _check(0 < df.max_train_timestep <= df.num_train_timesteps, "diffusion.max_train_timestep",
           f"{df.max_train_timestep} must be in (0, {df.num_train_timesteps}]")
    _check(df.loss_weight >= 0, "diffusion.loss_weight", f"{df.loss_weight} must be >= 0")
    _check(df.get("data_range", "[0,1]") in DATA_RANGES, "diffusion.data_range",
           f"{df.get('data_range')!r} is not one of {DATA_RANGES}")
    _check(df.get("prediction", "epsilon") in PREDICTIONS, "diffusion.prediction",
           f"{df.get('prediction')!r} is not one of {PREDICTIONS}")
    _check(df.get("loss_weighting", "none") in LOSS_WEIGHTINGS, "diffusion.loss_weighting",
           f"{df.get('loss_weighting')!r} is not one of {LOSS_WEIGHTINGS}")
    _check(df.get("snr_gamma", 5.0) > 0, "diffusion.snr_gamma", f"{df.get('snr_gamma')} must be > 0")
    t = config.train
    sigma_rel = t.get("ema_sigma_rel", 0.0)
    _check(0.0 <= sigma_rel < 0.28, "train.ema_sigma_rel",
           f"{sigma_rel} must be in [0, 0.28) (EDM2's relative EMA length, 0.05-0.15 is usual; 0 = off)")
    m = config.model
    try:
        levels = parse_int_list(m.get("attention_levels"))
        channels = parse_int_list(m.block_out_channels)
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from None
    n_levels = len(channels) if channels else 3
    _check(levels is None or all(0 <= v < n_levels for v in levels), "model.attention_levels",
           f"{m.get('attention_levels')!r}: levels must be in 0..{n_levels - 1} ({n_levels} U-Net levels)")
    _check(m.get("layers_per_block") is None or m.layers_per_block >= 1, "model.layers_per_block",
           f"{m.get('layers_per_block')} must be >= 1")
    _check(not (m.get("class_to_time") and m.get("pretrained")), "model.class_to_time",
           "a pretrained U-Net has no class embedding to add to its time embedding; set it False "
           "(the class still enters through cross-attention)")
    a = config.align
    _check(a.weight >= 0, "align.weight", f"{a.weight} must be >= 0")
    _check(a.expert_input in EXPERT_INPUTS, "align.expert_input", f"{a.expert_input!r} is not one of {EXPERT_INPUTS}")
    _check(a.get("mode", "pooled") in ALIGN_MODES, "align.mode", f"{a.get('mode')!r} is not one of {ALIGN_MODES}")
    _check(a.get("projector", "linear") in PROJECTORS, "align.projector",
           f"{a.get('projector')!r} is not one of {PROJECTORS}")
    _check(a.get("projector_hidden", 256) >= 1, "align.projector_hidden", f"{a.get('projector_hidden')} must be >= 1")
    _check(not (a.get("mode") == "tokens" and a.expert_feature == "pooled"), "align.expert_feature",
           "align.mode='tokens' aligns spatial maps: choose a spatial expert feature (e.g. stage_2), not 'pooled'")
    if a.enabled:
        _check(bool(a.expert_workdir), "align.expert_workdir",
               "feature alignment needs a trained expert: train one with `python train.py "
               "--config configs/expert.py --workdir runs/expert`, then pass --config.align.expert_workdir=runs/expert")
    s = config.sample
    _check(s.sampler in SAMPLERS, "sample.sampler", f"{s.sampler!r} is not one of {SAMPLERS}")
    _check(isinstance(s.get("karras_sigmas", False), bool), "sample.karras_sigmas",
           f"{s.get('karras_sigmas')!r} must be True or False")
    try:
        parse_guidance_interval(s.get("guidance_interval"))
    except ValueError as e:
        raise ConfigError(f"config.sample.guidance_interval: {e}") from None
    try:
        parse_seeds(s.seeds)
    except ValueError as e:
        raise ConfigError(f"config.sample.seeds: {e}") from None
