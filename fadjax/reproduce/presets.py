"""The presets of ``python -m fadjax.reproduce``: which config variants each stage uses.

A preset names a variant of the config files in ``configs/`` (``cpu``, ``fast``, ``tiny,demo``,
``tiny,micro``; the paper's settings are the files' defaults): the expert is ``expert.py:VARIANT``,
the second judge ``expert.py:VARIANT,judge2`` (another architecture and seed, the same data and
split), each diffusion model ``baseline.py`` or ``feature_aligned.py`` with the variant and the
model's own (``clean``, ``tokens``), the shared pre-training ``baseline.py:VARIANT,pretrain``. Every
value lives in those files; a preset here adds only how reproduce runs (stages at once, utility
metrics, whether --data is needed). The ``sample.*`` fields of the diffusion config are the sampling
settings every model shares.

``PAPER`` lists the paper's settings as config values; :func:`deviations` compares a preset's
resolved configs with it, so the report's list of deviations is generated, never hand-written.

Time budget of ``fast`` (one H200, jax 0.11.2, compile times included; target 6-7 minutes, the
lead runs it once). Measured on an H200 with an earlier draft of this preset (three U-Net levels,
500 steps, stages one after the other; Kather 2016: 3680 train / 920 validation tiles):

* expert ResNet50, 64 px, bf16, 8 epochs (224 steps of 128): 90.6 s, of which 45 s compiling the
  train step; the steps themselves ~6000 img/s (5 s). Validation accuracy 71.7%.
* judge2 ResNet18, same schedule: 25.4 s (10 s compiling). Validation accuracy 78.2%.
* baseline U-Net 64-128-256 (13.2M parameters), batch 128: 190.7 s = ~70 s before the step
  compiles (jitted init, optimizer state, tracing) + 72 s compiling the step + 46 s for 500 steps
  at 1395 img/s. Three such models one after the other would take ~10 minutes on their own.

(The 8 epochs of that run left the experts unsettled, validation accuracy jumping between
checks: the preset trains them the paper's 15 epochs, ~5 s more each.)

Hence: every stage's fixed cost is host-side compilation and tracing, which ``jobs = 3``
overlaps (XLA compiles without the GIL; the H200 host has 16 cores) -- the expert, the second
judge and the baseline start together, both aligned models as soon as the expert is done,
sampling and judging as soon as their inputs exist -- and a two-level U-Net (64, 128) cuts each
model's compile and init to roughly 2/3 (3.4M parameters). Estimate: expert ~100 s (the critical path's head), then
the aligned models ~200 s with contention (2 x ~50 s compile, ~50 s before it, 400 steps ~30 s),
sampling ~40 s (DDIM 50 steps x 1050 images per model is ~10 s of GPU; the rest compiles),
judging and the report ~40 s: ~6.5 minutes end to end; stages one after the other (``--jobs 1``)
~12 minutes. If it must be shorter, lower ``diffusion: train.num_steps`` (GPU ~8 s per 100 steps
per model) or shrink ``sample.seeds``; compile time does not depend on the U-Net's width.
Not measured: the overlap itself. Concurrent compiles autotune on the same GPU, and XLA builds
with the delay-kernel timeouts of parallel autotuning (openxla/xla#42347) compile slower
that way; ``--jobs 1`` is the fallback, and every stage resumes after an interruption.
"""
from __future__ import annotations

import ast
import dataclasses
from typing import Any

import ml_collections

from fadjax import config_lib


@dataclasses.dataclass(frozen=True)
class Model:
    """A diffusion model reproduce can train: a config file of ``configs/`` and its variant."""

    label: str  # How reports name it.
    config: str  # "baseline" or "feature_aligned" (configs/<config>.py).
    variant: str | None = None  # The model's own variants, after the preset's (e.g. "clean": the expert sees x0).


# Every model reproduce knows; ``--models`` picks some (the baseline always, every comparison is to it).
MODELS: dict[str, Model] = {
    "baseline": Model("baseline", "baseline"),                          # Paper §III: the plain U-Net.
    "fad_xt": Model("aligned on x_t", "feature_aligned"),               # Paper §IV: expert features of the noisy x_t.
    "fad_x0": Model("aligned on x0", "feature_aligned", "clean"),       # Table I ablation: the clean x0's.
    # REPA-style token-wise alignment (issue 16; feature_aligned.py's "tokens" variant).
    "repa_tokens_x0": Model("tokens+MLP on x0", "feature_aligned", "clean,tokens"),  # REPA: the clean image's.
    "repa_tokens_xt": Model("tokens+MLP on x_t", "feature_aligned", "tokens"),
}
DEFAULT_MODELS = ("baseline", "fad_xt", "fad_x0")  # The paper's comparison.
BASELINE = "baseline"
JUDGES = ("expert", "judge2")  # "expert" is the judge of the paper (it is also the alignment target).
# "pretrain": the shared pre-training of the U-Net (a preset with "pretrain"; see ``build``).
GROUPS = ("expert", "judge2", "diffusion", "pretrain") + tuple(MODELS)


def parse_models(text: str | None) -> tuple[str, ...]:
    """``--models`` (comma-separated names of ``MODELS``; None = the paper's three), baseline first."""
    if not text:
        return DEFAULT_MODELS
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise PresetError(f"--models: unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if len(set(names)) != len(names):
        raise PresetError(f"--models {text!r}: a model is named twice")
    return (BASELINE, *[n for n in names if n != BASELINE])


PRETRAIN = "pretrain"

# Utility of the synthetic data (fadjax.utility): TSTR, augmentation gain, FD and precision/recall in
# judge2's features; classifiers of judge2's recipe over 3 seeds, 10% of the real training split.
_UTILITY = {"seeds": 3, "augment_fraction": 0.1}
# Learning curves (fadjax.curves): the pre-training and every model sampled at the checkpoints its run keeps
# evenly (train.keep_evenly, set by the preset's config variant: 4 = at 1/4, 1/2, 3/4 and the end), with
# "num_per_class" images per class and each of the first "seeds" sampling seeds, judged by judge2 (FD of its
# pooled features, generation accuracy).
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's settings: the configs' defaults (20 epochs at batch 4, DDPM 1000 sampling steps,
    # ResNet50 at 224 px for 15 epochs, 10 images x 7 classes x 15 seeds); stages one after the other.
    "paper": {"variant": None, "needs_data": True, "jobs": 1, "utility": _UTILITY},
    # One H200 end to end in ~6.5 minutes (budget in the module docstring); stages at once (threads):
    # their host-side compiles overlap.
    "fast": {"variant": "fast", "needs_data": True, "jobs": 3, "utility": _UTILITY},
    # The paper's comparison on the real Kather tiles on one CPU machine (2 cores) in under 90 minutes:
    # two stages at once (the judges beside the pre-training, the models in pairs); judge2's recipe is
    # ~40 s per utility classifier at 32 px.
    "cpu": {"variant": "cpu", "needs_data": True, "jobs": 2, "utility": _UTILITY, PRETRAIN: True,
            "curves": {"num_per_class": 20, "seeds": 1}},  # 140 images x 16 checkpoints.
    # README's first command: the built-in demo textures on a laptop CPU in under 5 minutes, small enough
    # to finish and large enough to learn (budget in README); one stage compiles while the other computes.
    "tiny": {"variant": "tiny,demo", "needs_data": False, "jobs": 2, PRETRAIN: True},
    # Micro models on a tiny demo set, for the tests: every stage runs in seconds and learns nothing.
    "micro": {"variant": "tiny,micro", "needs_data": False, "jobs": 1,
              "utility": {"seeds": 2, "augment_fraction": 0.25, "epochs": 1},  # Wiring only.
              "curves": {"num_per_class": 2, "seeds": 1}},
}

# The paper's settings as config values: (config group, field, paper value, what the paper did).
# ``SET`` = any value (weights the paper starts from and that a run must be given explicitly).
SET = object()
PAPER: tuple[tuple[str, str, Any, str], ...] = (
    ("expert", "data.image_size", 224, "224 px"),
    ("expert", "expert.arch", "resnet50", "ResNet50"),
    ("expert", "expert.width", 64, "standard width"),
    ("expert", "expert.pretrained", SET, "ImageNet-1k initialisation"),
    ("expert", "train.batch_size", 64, "batch 64"),
    ("expert", "train.num_epochs", 15, "15 epochs"),
    ("expert", "optim.lr", 1e-4, "Adam 1e-4"),
    ("expert", "optim.schedule", "step_epoch", "StepLR per epoch"),
    ("expert", "optim.step_gamma", 0.7, "gamma 0.7"),
    ("expert", "dtype", "float32", "float32"),
    ("diffusion", "data.image_size", 64, "64 px"),
    ("diffusion", "model.block_out_channels", None, "tiny-sd widths 320,640,1280"),
    ("diffusion", "model.attention_head_dim", None, "8 heads"),
    ("diffusion", "model.cross_attention_dim", None, "768-d context"),
    ("diffusion", "model.norm_num_groups", None, "32 groups"),
    ("diffusion", "model.pretrained", SET, "segmind/tiny-sd weights (conv_in/conv_out fresh)"),
    ("diffusion", "cond.mode", "clip", "CLIP text features of the class name"),
    ("diffusion", "train.batch_size", 4, "batch 4"),
    ("diffusion", "train.num_epochs", 20, "20 epochs"),
    ("diffusion", "optim.lr", 1e-4, "Adam 1e-4"),
    ("diffusion", "optim.schedule", "cosine_epoch", "cosine annealing per epoch"),
    ("diffusion", "optim.warmup_steps", 0, "no warm-up"),
    ("diffusion", "train.ema_decay", None, "no EMA"),
    ("diffusion", "dtype", "float32", "float32"),
    ("diffusion", "diffusion.num_train_timesteps", 1000, "1000 DDPM steps"),
    ("diffusion", "diffusion.beta_schedule", "squaredcos_cap_v2", "cosine betas"),
    ("diffusion", "diffusion.loss_weight", 1.0, "w1 = 1"),
    ("diffusion", "diffusion.prediction", "epsilon", "epsilon (noise) prediction"),
    ("diffusion", "diffusion.loss_weighting", "none", "a plain MSE over uniform timesteps"),
    ("diffusion", "data.transpose", False, "horizontal and vertical flips only"),
    ("diffusion", "train.ema_sigma_rel", 0.0, "no EMA"),
    ("diffusion", "align.weight", 1.0, "w2 = 1"),
    ("diffusion", "align.unet_feature", "down_2_shortcut", "the reference code's hook down_2_shortcut"),
    ("diffusion", "align.expert_resize", None, "expert sees the 64 px x_t as is"),
    ("diffusion", "align.mode", "pooled", "one pooled vector per image"),
    ("diffusion", "align.projector", "linear", "a linear W_p"),
    ("diffusion", "align.expert_feature", "pooled", "the expert's pooled feature"),
    ("diffusion", "sample.sampler", "ddpm", "DDPM"),
    ("diffusion", "sample.steps", None, "all 1000 steps"),
    ("diffusion", "sample.num_per_class", 10, "10 images per class"),
    ("diffusion", "sample.exclude_classes", "empty", "'empty' not generated"),
    ("diffusion", "sample.guidance_scale", 1.0, "no guidance"),
)
PAPER_NUM_SEEDS = 15
PAPER_DATA = "Kather 2016 colorectal histology (folder:… or tfds:colorectal_histology)"


class PresetError(config_lib.ConfigError):
    """A preset name or override that cannot be applied."""


class Text(str):
    """A value typed on the command line: a Python literal when the field takes one, else the text."""


def parse_overrides(argv: list[str]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Takes the config overrides out of a command line: ``--GROUP.FIELD=VALUE``, as train.py's ``--config.FIELD=VALUE``.

    GROUP is a config group (``GROUPS``: expert, judge2, diffusion, pretrain or a model's name), e.g.
    ``--diffusion.train.num_steps=100`` -> ``{"diffusion": {"train.num_steps": Text("100")}}``.

    Returns:
      ``(the other arguments, the overrides)``.
    """
    rest, out = [], {}
    for item in argv:
        key, sep, value = item[2:].partition("=") if item.startswith("--") else ("", "", "")
        group, dot, field = key.partition(".")
        if not dot:
            rest.append(item)
            continue
        if group not in GROUPS:
            raise PresetError(f"{item}: unknown config group {group!r}; one of {', '.join(GROUPS)}")
        if not sep or not field:
            raise PresetError(f"{item}: expected --GROUP.FIELD=VALUE, e.g. --diffusion.train.num_steps=100")
        out.setdefault(group, {})[field] = Text(value)
    return rest, out


def set_field(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
    """Sets ``config.<path>`` (must exist) to ``value``; a type mismatch names the field."""
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
        if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
            raise PresetError(f"{path}: {p!r} is not a section of the {config.stage} config")
        node = node[p]
    if leaf not in node:
        raise PresetError(f"{path}: no field {leaf!r} in the {config.stage} config")
    candidates = [value]
    if isinstance(value, Text):  # "1e-3" -> 1e-3, "None" -> None, "true" -> True; "0-4", "8,16", "resnet18" stay text.
        try:
            literal = {"true": "True", "false": "False", "none": "None"}.get(value.lower(), value)
            candidates = [ast.literal_eval(literal), str(value)]
        except (ValueError, SyntaxError):
            candidates = [str(value)]
    for i, v in enumerate(candidates):
        try:
            node[leaf] = v
            return
        except TypeError as e:
            if i == len(candidates) - 1:
                raise PresetError(f"{path} = {value!r}: {e}") from None


def apply(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    for path, value in overrides.items():
        set_field(config, path, value)
    return config


@dataclasses.dataclass
class Configs:
    """Every stage's resolved config for one invocation."""

    preset: str
    expert: ml_collections.ConfigDict
    judge2: ml_collections.ConfigDict
    models: dict[str, ml_collections.ConfigDict]  # baseline first, then the chosen models
    pretrain: ml_collections.ConfigDict | None = None  # The shared pre-training every model starts from.
    # Utility metrics (fadjax.utility): {"seeds", "augment_fraction", optional "epochs"}; None = not computed.
    utility: dict | None = None
    # Learning curves (fadjax.curves): {"num_per_class", "seeds"}; None = not computed.
    curves: dict | None = None

    @property
    def sample(self) -> ml_collections.ConfigDict:
        """The sampling settings shared by every model (the baseline's copy)."""
        return self.models[BASELINE].sample


def _variant(*parts: str | None) -> str | None:
    return ",".join(p for p in parts if p) or None


def _changed_fields(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict) -> dict[str, Any]:
    """``{"section.field": value}`` of ``config`` where it differs from ``base`` (same structure)."""
    out = {}

    def walk(a, b, prefix):
        for k in a.keys():
            if isinstance(a[k], ml_collections.ConfigDict):
                walk(a[k], b[k], f"{prefix}{k}.")
            elif a[k] != b[k]:
                out[f"{prefix}{k}"] = a[k]
    walk(config, base, "")
    return out


def build(preset: str, *, data: str | None, seeds: str | None, expert_workdir: str,
          cache_dir: str | None, overrides: dict[str, dict[str, Any]] | None = None,
          pretrain_workdir: str | None = None, models: tuple[str, ...] = DEFAULT_MODELS) -> Configs:
    """The resolved configs of every stage.

    Args:
      preset: a key of ``PRESETS``.
      data: the data source of every stage; None = the configs' (demo for tiny and micro).
      seeds: sampling seeds for every model (e.g. ``"0-1"``); None = the preset's.
      expert_workdir: where the expert is trained (the aligned models' ``align.expert_workdir``).
      pretrain_workdir: where the shared pre-training runs (the models' ``init_from``), for a preset
        with a shared pre-training.
      cache_dir: folder of the shared decoded-data caches (``data_<size>px_<channels>ch.npz``);
        None = each run's own ``<workdir>/data_cache.npz``.
      overrides: ``{group: {field: value}}`` applied last (the CLI's ``--GROUP.FIELD=VALUE``): ``expert``
        and ``judge2`` to that judge only, ``diffusion`` to every model (and the pre-training), a model's
        name to that model, ``pretrain`` to the pre-training.
      models: names of ``MODELS`` to train (the baseline first; :func:`parse_models`).

    A preset with a shared pre-training trains one baseline U-Net first (``baseline.py:VARIANT,pretrain``:
    the models' settings with the pre-training's length and rate), ``OUT/runs/pretrain``; every model
    then starts from it (``init_from``) and trains its own steps: the paper's protocol of fine-tuning
    both models from one pretrained U-Net, with our own pre-training in place of segmind/tiny-sd's weights.

    Raises:
      PresetError: unknown preset, field or value type.
      config_lib.ConfigError: a resolved config that cannot work.
    """
    if preset not in PRESETS:
        raise PresetError(f"unknown preset {preset!r}; one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    overrides = overrides or {}
    variant = p["variant"]
    curves = p.get("curves")

    def finish(c):
        if data:
            c.data.source = data
        if cache_dir:
            c.data.cache = f"{cache_dir}/data_{c.data.image_size}px_{c.data.channels}ch.npz"
        config_lib.validate(c)
        return c

    expert = apply(config_lib.load("expert", variant), overrides.get("expert", {}))  # Each judge its own group.
    judge2 = apply(config_lib.load("expert", _variant(variant, "judge2")), overrides.get("judge2", {}))
    pretrain = None
    if p.get(PRETRAIN):
        if not pretrain_workdir:
            raise PresetError(f"preset {preset!r} pre-trains a U-Net: pretrain_workdir is required")
        base = config_lib.load("baseline", variant)
        own = _changed_fields(config_lib.load("baseline", _variant(variant, PRETRAIN)), base)  # Its length, rate.
        pretrain = apply(apply(apply(base, overrides.get("diffusion", {})), own),
                         overrides.get(PRETRAIN, {}))
    elif overrides.get(PRETRAIN):
        raise PresetError(f"--pretrain.*: preset {preset!r} has no shared pre-training")
    if not models or models[0] != BASELINE:
        raise PresetError(f"models {models}: the baseline comes first")
    for name in overrides:
        if name in MODELS and name not in models:
            raise PresetError(f"--{name}.*: {name} is not one of the trained models {', '.join(models)}")
    chosen = {}
    for name in models:
        m = MODELS[name]
        c = config_lib.load(m.config, _variant(variant, m.variant))
        apply(c, overrides.get("diffusion", {}))
        apply(c, overrides.get(name, {}))
        if pretrain is not None:
            c.init_from = pretrain_workdir
        if c.align.enabled:
            c.align.expert_workdir = expert_workdir
        if seeds is not None:
            c.sample.seeds = seeds
        chosen[name] = finish(c)
    models = chosen
    shared = {k: models[BASELINE].sample.get(k) for k in models[BASELINE].sample}
    for name, c in models.items():
        if {k: c.sample.get(k) for k in c.sample} != shared:
            raise PresetError(f"{name}: sample.* differs from the baseline's; every model must share the "
                              f"sampling settings (set them in the 'diffusion' group)")
    return Configs(preset, finish(expert), finish(judge2), models,
                   None if pretrain is None else finish(pretrain), p.get("utility"), curves)


def _fmt(v: Any) -> str:
    return "None" if v is None else repr(v) if isinstance(v, str) else str(v)


def deviations(configs: Configs) -> list[str]:
    """Every setting of ``configs`` that differs from the paper (``PAPER``), one line each."""
    out = []
    source = configs.expert.data.source
    if source.startswith("demo"):
        out.append(f"data: {source} (built-in procedural textures; paper: {PAPER_DATA})")
    for group, path, paper, what in PAPER:
        targets = ([("expert", configs.expert)] if group == "expert" else
                   [("diffusion", configs.models[BASELINE])] if not path.startswith("align.") else
                   [(name, c) for name, c in configs.models.items() if c.align.enabled])
        aligned = [n for n, c in configs.models.items() if c.align.enabled]
        seen = {}  # shown -> the models it holds for
        for name, c in targets:
            v = c
            for part in path.split("."):
                v = v[part]
            ok = v is not None if paper is SET else v == paper
            shown = f"{path} = {_fmt(v)}"
            if path == "train.num_epochs" and v is None:
                shown = f"train.num_steps = {c.train.num_steps}"
            if not ok:
                seen.setdefault(shown, []).append(name)
        for shown, names in seen.items():
            label = "diffusion (all models)" if names == ["diffusion"] else names[0]
            if path.startswith("align."):
                label = "aligned models" if names == aligned else ", ".join(names)
            out.append(f"{label}: {shown} (paper: {what})")
    if configs.pretrain is not None:
        c = configs.pretrain
        out.append(f"diffusion (all models): start from a shared pre-training of the U-Net here "
                   f"({c.train.num_steps} steps of batch {c.train.batch_size}, no alignment, lr {c.optim.lr}) "
                   f"(paper: start from segmind/tiny-sd's pretrained weights)")
    n = len(config_lib.parse_seeds(configs.sample.seeds))
    if n != PAPER_NUM_SEEDS:
        out.append(f"sampling: {n} seeds {configs.sample.seeds} (paper: {PAPER_NUM_SEEDS})")
    return out


def describe(preset: str) -> str:
    """What the preset changes from the paper's settings (the config files' defaults), for ``--list_presets``."""
    p = PRESETS[preset]
    variant = p["variant"]
    lines = [f"{preset}: configs/*.py:{variant or '(defaults)'}, "
             f"{'--data required' if p['needs_data'] else 'built-in demo data'}, {p['jobs']} stage(s) at a time"
             + (", utility metrics" if p.get("utility") else "")
             + (f", learning curves ({p['curves']['num_per_class']} per class at evenly kept checkpoints)"
                if p.get("curves") else "")]
    groups = [("expert", "expert", variant), ("judge2", "expert", _variant(variant, "judge2")),
              ("diffusion", "baseline", variant)] + ([(PRETRAIN, "baseline", _variant(variant, PRETRAIN))]
                                                     if p.get(PRETRAIN) else [])
    for group, name, arg in groups:
        for k, v in _changed_fields(config_lib.load(name, arg), config_lib.load(name)).items():
            lines.append(f"  {group}.{k} = {_fmt(v)}")
    return "\n".join(lines)
