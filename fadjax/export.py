"""Exports a trained diffusion run to diffusers' format, for PyTorch users.

    python -m fadjax.export --workdir runs/fad --out export/fad

writes, from the run's EMA weights (``--no_ema``: the raw ones; ``--step N``: another checkpoint)::

    OUT/unet/config.json, diffusion_pytorch_model.safetensors   UNet2DConditionModel.from_pretrained(OUT/unet)
    OUT/scheduler/scheduler_config.json   the run's schedule and prediction type, as the scheduler of its sampler
    OUT/conditioning.json                 class names, the context of every conditioning row (the learned
                                          class table; the null row of guidance), the class-to-time offsets
    OUT/fadjax_config.json                the run's config as trained
    OUT/README.md                         a model card with a PyTorch snippet that samples one class

The U-Net's parameter tree is diffusers' Flax one, so the PyTorch names follow the same rule as its
PyTorch->Flax conversion, backwards: a module list ``name_i`` is ``name.i``, a conv kernel HWIO is a
weight OIHW, a dense kernel ``[in, out]`` is a weight ``[out, in]``, norm scales are weights. The class
of an image is its cross-attention context, one token per image (``encoder_hidden_states`` of shape
``[B, 1, D]``); with ``model.class_to_time`` the same vector is diffusers' ``class_labels`` of the
"projection" class embedding. Nothing here needs torch: the weights are written with safetensors' numpy API.

Expert runs (ResNets) export to transformers: ``ResNetForImageClassification`` when the head is one Linear,
else ``ResNetModel`` (the backbone, whose pooled output is the aligned feature) plus ``head.safetensors`` (the
paper's Linear-ReLU-Linear head, which neither transformers' nor torchvision's ResNet classes can hold).
torchvision's ResNet is not a target: it fixes 3 input channels and the widths 64..512. ViT experts are refused.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Sequence

import numpy as np
from absl import flags, logging
from flax import traverse_util

from fadjax import cli
from fadjax import workdir as workdir_lib

UNET_DIR = "unet"
SCHEDULER_DIR = "scheduler"
CONDITIONING = "conditioning.json"
CARD = "README.md"
CONFIG_COPY = "fadjax_config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"

# The diffusers scheduler of each fadjax sampler and the options that give fadjax's maths (fadjax/sampling.py).
SCHEDULERS = {
    "ddpm": ("DDPMScheduler", {"variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0,
                               "timestep_spacing": "leading", "steps_offset": 0}),
    "ddim": ("DDIMScheduler", {"clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True,
                               "timestep_spacing": "leading", "steps_offset": 0}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                 "solver_type": "midpoint", "lower_order_final": True,
                                                 "final_sigmas_type": "zero", "timestep_spacing": "linspace"}),
    "euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "timestep_spacing": "linspace"}),
    "heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": True, "timestep_spacing": "linspace"}),
}
# Flax module names that end in "_<digits>" without being an entry of a module list.
_NOT_A_LIST = frozenset({"linear_1", "linear_2"})
_LIST_ENTRY = re.compile(r"^(?P<name>.+)_(?P<index>\d+)$")
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}


class ExportError(cli.UserError):
    """What cannot be exported, and why (one line)."""


# ----------------------------------------------------------------------------- the U-Net

def torch_name(path: Sequence[str]) -> str:
    """The PyTorch state-dict name of a Flax U-Net parameter, e.g. ``("down_blocks_0", "attentions_0",
    "proj_in", "kernel")`` -> ``"down_blocks.0.attentions.0.proj_in.weight"``."""
    *modules, leaf = path
    if leaf not in _LEAVES:
        raise ExportError(f"U-Net parameter {'/'.join(path)}: no PyTorch counterpart for a {leaf!r} leaf")
    parts = []
    for m in modules:
        match = _LIST_ENTRY.match(m)
        parts += [match["name"], match["index"]] if match and m not in _NOT_A_LIST else [m]
    return ".".join(parts + [_LEAVES[leaf]])


def torch_tensor(path: Sequence[str], value) -> np.ndarray:
    """A Flax parameter in PyTorch's layout: conv kernels HWIO -> OIHW, dense kernels transposed."""
    value = np.asarray(value, np.float32)
    if path[-1] == "kernel":
        if value.ndim == 4:
            return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
        if value.ndim == 2:
            return np.ascontiguousarray(value.T)
        raise ExportError(f"U-Net parameter {'/'.join(path)}: a {value.ndim}-d kernel has no PyTorch layout")
    return np.ascontiguousarray(value)


def unet_state_dict(params) -> dict[str, np.ndarray]:
    """The U-Net's Flax parameters as a diffusers ``UNet2DConditionModel`` state dict (float32 numpy)."""
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        name = torch_name(path)
        if name in out:
            raise ExportError(f"U-Net parameters {'/'.join(path)} and another both map to {name}")
        out[name] = torch_tensor(path, value)
    return out


def _diffusers_version() -> str:
    try:
        from importlib import metadata
        return metadata.version("diffusers")
    except Exception:  # pylint: disable=broad-except
        return "0.39.0"  # The version fadjax's U-Net parity is tested against.


def unet_config_json(unet_config) -> dict:
    """diffusers' ``config.json`` of the U-Net (fadjax's ``UNetConfig`` keys are diffusers' own)."""
    from fadjax.models.unet_config import UNetConfig
    d = {"_class_name": "UNet2DConditionModel", "_diffusers_version": _diffusers_version(), **unet_config.to_dict()}
    if UNetConfig.from_dict(d) != unet_config:  # Every key must mean in diffusers what it means here.
        raise ExportError(f"the U-Net config {unet_config} does not survive diffusers' config.json")
    return d


# ----------------------------------------------------------------------------- the scheduler and the class table

def sampling_settings(run, *, sampler: str | None = None, steps: int | None = None,
                      guidance_scale: float | None = None, karras_sigmas: bool | None = None,
                      guidance_interval=None) -> dict:
    """The run's sampling settings (its config's, or those given), as ``fadjax.sample`` resolves them."""
    from fadjax import sampling
    from fadjax.config_lib import parse_guidance_interval
    cfg = run.config.sample
    if steps is None and sampler in (None, cfg.sampler):
        steps = cfg.get("steps")
    sampler = sampler or cfg.sampler
    scale = float(cfg.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale)
    if run.null_label is None:
        scale = 1.0
    interval = parse_guidance_interval(cfg.get("guidance_interval") if guidance_interval is None
                                       else guidance_interval)
    karras = bool(cfg.get("karras_sigmas", False) if karras_sigmas is None else karras_sigmas)
    return {"sampler": sampler, "steps": sampling.resolve_steps(run.schedule.num_steps, sampler, steps),
            "guidance_scale": scale, "guidance_interval": None if interval is None or scale == 1.0 else list(interval),
            "karras_sigmas": karras if sampler == "dpmpp_2m" else sampler in ("euler", "heun"),
            "prediction": run.prediction, "data_range": run.data_range,
            "image_size": run.image_size, "channels": run.channels}


def scheduler_config_json(run, settings: dict) -> dict:
    """The diffusers scheduler of the sampler in ``settings``, on the run's schedule and prediction type."""
    name, options = SCHEDULERS[settings["sampler"]]
    d = {"_class_name": name, "_diffusers_version": _diffusers_version(),
         "num_train_timesteps": int(run.config.diffusion.num_train_timesteps),
         "beta_schedule": str(run.config.diffusion.beta_schedule), "trained_betas": None,
         "prediction_type": run.prediction, **options}
    if settings["sampler"] == "dpmpp_2m":
        d["use_karras_sigmas"] = bool(settings["karras_sigmas"])
    return d


def conditioning_json(run) -> dict:
    """The class conditioning: what each row means and its context vector (and class-to-time offset)."""
    import jax.numpy as jnp
    labels = run.labels
    rows = np.arange(labels.size, dtype=np.int32)
    context = np.asarray(run.model.cond.apply({"params": run.params["cond"]}, jnp.asarray(rows),
                                              run.text_features))[:, 0]  # [rows, D]
    meaning = ([f"class {n}" for n in labels.class_names] + [f"extra: {t}" for t in labels.extra]
               + (["null (unconditional; classifier-free guidance)"] if labels.has_null else []))
    out = {
        "format": "fadjax class conditioning 1",
        "class_names": list(labels.class_names),
        "condition_rows": {k: int(v) for k, v in run.condition_labels.items()},
        "null_row": labels.null_label,
        "rows": meaning,
        "context_dim": int(context.shape[1]),
        "context": context.astype(np.float32).tolist(),
        "how": "encoder_hidden_states of an image of row r = context[r] as one token, shape [B, 1, context_dim]",
        "class_to_time": None,
    }
    if run.model.unet.config.class_embed_type == "projection":
        p = run.params["unet"]["class_embedding"]
        h = context @ np.asarray(p["linear_1"]["kernel"]) + np.asarray(p["linear_1"]["bias"])
        offsets = (h / (1.0 + np.exp(-h))) @ np.asarray(p["linear_2"]["kernel"]) + np.asarray(p["linear_2"]["bias"])
        out["class_to_time"] = {
            "how": "class_labels = context[r] (diffusers' class_embed_type 'projection', the U-Net's class_embedding "
                   "MLP: linear_1, SiLU, linear_2); offsets[r] is what row r adds to the time embedding",
            "offsets": offsets.astype(np.float32).tolist(),
        }
    return out


# ----------------------------------------------------------------------------- the model card

def snippet(run, settings: dict, conditioning: dict) -> str:
    """PyTorch code that samples one class with the run's sampler (classifier-free guidance when the run has a
    null row); run it in the exported folder. The final ``x`` is in the model's range, ``image`` in [0, 1]."""
    scheduler = SCHEDULERS[settings["sampler"]][0]
    name = conditioning["class_names"][0]
    c, s = settings["channels"], settings["image_size"]
    guided = conditioning["null_row"] is not None
    labels = ", class_labels=ctx[:, 0]" if conditioning["class_to_time"] is not None else ""
    lines = [
        "import json, torch",
        f"from diffusers import UNet2DConditionModel, {scheduler}",
        f"folder, name, scale, steps = \".\", {name!r}, {settings['guidance_scale']!r}, {settings['steps']}"
        if guided else f"folder, name, steps = \".\", {name!r}, {settings['steps']}",
        "unet = UNet2DConditionModel.from_pretrained(f\"{folder}/unet\").eval()",
        f"scheduler = {scheduler}.from_pretrained(folder, subfolder=\"scheduler\")",
        f"cond = json.load(open(f\"{{folder}}/{CONDITIONING}\"))",
        ("rows = [cond[\"condition_rows\"][name], cond[\"null_row\"]]  # the class, then the null row" if guided
         else "rows = [cond[\"condition_rows\"][name]]"),
        "ctx = torch.tensor(cond[\"context\"])[rows][:, None]  # [rows, 1, D]: one context token per image",
        f"x = torch.randn(1, {c}, {s}, {s}, generator=torch.Generator().manual_seed(0))",
        "scheduler.set_timesteps(steps)",
    ]
    if settings["sampler"] in ("dpmpp_2m", "euler", "heun"):
        lines.append("scheduler.set_begin_index(0)")
    lines += ["x = x * scheduler.init_noise_sigma", "with torch.no_grad():", "    for t in scheduler.timesteps:"]
    x_in = "scheduler.scale_model_input(x, t)" + (".repeat(2, 1, 1, 1)" if guided else "")
    lines.append(f"        out = unet({x_in}, t, ctx{labels}).sample")
    if guided:
        cfg = "out[1:] + scale * (out[:1] - out[1:])"
        interval = settings["guidance_interval"]
        if interval is None:
            lines.append(f"        out = {cfg}")
        else:
            if settings["sampler"] in ("ddpm", "ddim"):
                lines.append("        a = scheduler.alphas_cumprod[t]; sigma = ((1 - a) / a) ** 0.5")
            else:
                lines.append("        sigma = scheduler.sigmas[scheduler.step_index or 0]")
            lo, hi = interval
            lines.append(f"        out = {cfg} if {lo!r} < sigma <= {hi!r} else out[:1]  # guided in this interval")
    lines.append("        x = scheduler.step(out, t, x).prev_sample")
    lines.append("image = " + ("x.clamp(0, 1)" if settings["data_range"] == "[0,1]" else "((x + 1) / 2).clamp(0, 1)")
                 + f"  # [1, {c}, {s}, {s}] in [0, 1]")
    return "\n".join(lines) + "\n"


def extract_snippet(card: str) -> str:
    """The first ```python block of a model card."""
    match = re.search(r"```python\n(.*?)```", card, re.S)
    if match is None:
        raise ValueError("the model card has no ```python block")
    return match.group(1)


def find_summary(workdir: pathlib.Path, report: str | None) -> dict | None:
    """The ``fadjax.reproduce`` summary of the run (``--report``, or ``summary.json`` two levels up)."""
    path = pathlib.Path(report) if report else workdir.resolve().parent.parent / "summary.json"
    if report and path.is_dir():
        path = path / "summary.json"
    if not path.is_file():
        if report:
            raise FileNotFoundError(f"--report {report}: no summary.json there")
        return None
    summary = json.loads(path.read_text())
    if workdir.resolve().name not in summary.get("models", {}):
        if report:
            raise ExportError(f"--report {report}: its summary has no model {workdir.resolve().name!r} "
                              f"(it has {sorted(summary.get('models', {}))})")
        return None
    return summary


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * float(v):.1f}%"


def _results(summary: dict, model: str) -> list[str]:
    r = summary["models"][model]
    lines = [f"From `fadjax.reproduce` (preset {summary.get('preset')!r}, data {summary.get('data')!r}, "
             f"seeds {summary.get('seeds')}), model `{model}`:", "",
             "| measure | value |", "|---|---|"]
    for judge, acc in sorted(r.get("accuracy", {}).items()):
        arch = summary.get("judges", {}).get(judge, {}).get("arch", "")
        lines.append(f"| generation accuracy, judged by {judge} ({arch}) | {_pct(acc.get('mean'))} "
                     f"(std {_pct(acc.get('std'))} over seeds) |")
    u = r.get("utility") or {}
    for key, label in (("tstr_accuracy", "TSTR accuracy (trained on generated, tested on real)"),
                       ("trtr_accuracy", "TRTR accuracy (as many real images)"),
                       ("augment_gain", "augmentation gain")):
        if key in u:
            lines.append(f"| {label} | {_pct(u[key].get('mean'))} |")
    for key, label in (("fd_judge2", "Fréchet distance in judge2's features"), ("precision", "precision"),
                       ("recall", "recall")):
        if key in u:
            lines.append(f"| {label} | {float(u[key]['value']):.3f} |")
    if "ssim_generated" in r:
        lines.append(f"| SSIM diversity of generated (real: {float(r.get('ssim_real', float('nan'))):.3f}) | "
                     f"{float(r['ssim_generated']):.3f} |")
    return lines


def model_card(run, settings: dict, conditioning: dict, code: str, summary: dict | None) -> str:
    cfg = run.config
    aligned = bool(cfg.align.get("enabled", False))
    model = run.workdir.resolve().name
    method = ("Feature-aligned diffusion (FAD): a class-conditional pixel-space DDPM whose U-Net feature "
              f"`{cfg.align.unet_feature}` is aligned (cosine loss, weight {cfg.align.weight}) to a histology "
              f"classifier's `{cfg.align.expert_feature}` features on {cfg.align.expert_input} inputs."
              if aligned else "A class-conditional pixel-space DDPM (the FAD paper's baseline, no feature alignment).")
    guidance = (f"Classifier-free guidance: scale {settings['guidance_scale']}"
                + (f", only at noise levels sigma in ({settings['guidance_interval'][0]}, "
                   f"{settings['guidance_interval'][1]}]" if settings["guidance_interval"] else "")
                + f"; the null row is {conditioning['null_row']}."
                if conditioning["null_row"] is not None else
                "The run trained without label dropout: it has no null row, so no classifier-free guidance.")
    lines = [
        f"# {model}: class-conditional histology tile diffusion (exported from fadjax)", "",
        f"{method} Trained with fadjax (JAX/Flax), step {run.step}, "
        f"{'EMA' if run.used_ema else 'raw (not EMA)'} weights.", "",
        "## Data", "",
        f"- source: `{cfg.data.source}` ({run.record.get('data_source', cfg.data.source)})",
        f"- {settings['image_size']}x{settings['image_size']} px, {settings['channels']} channel(s), "
        f"{len(conditioning['class_names'])} classes: {', '.join(conditioning['class_names'])}", "",
        "## Model", "",
        f"- U-Net: diffusers `UNet2DConditionModel` (`unet/`), block_out_channels "
        f"{list(run.model.unet.config.block_out_channels)}, cross_attention_dim "
        f"{run.model.unet.config.cross_attention_dim}"
        + (", class-to-time projection (`class_embed_type` \"projection\": pass `class_labels` = the context row)"
           if conditioning["class_to_time"] else ""),
        f"- conditioning: one context token per image, the row of `{CONDITIONING}` "
        f"(mode `{cfg.cond.mode}`; rows: {len(conditioning['rows'])})",
        f"- diffusion: {cfg.diffusion.num_train_timesteps} steps, `{cfg.diffusion.beta_schedule}` betas, "
        f"predicts `{settings['prediction']}`, images diffused in {settings['data_range']}",
        f"- sampler: {settings['sampler']} ({SCHEDULERS[settings['sampler']][0]}, `scheduler/`), "
        f"{settings['steps']} steps. {guidance}",
        f"- the whole training config: `{CONFIG_COPY}`", "",
        "## Results", "",
    ]
    lines += _results(summary, model) if summary else ["No `fadjax.reproduce` summary was found for this run."]
    lines += ["", "## Sample with PyTorch", "",
              f"Run in this folder (diffusers and torch); `image` is one tile of class `{conditioning['class_names'][0]}`:",
              "", "```python", code.rstrip("\n"), "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- experts (transformers ResNet)

_RESNET_LEAVES = {("conv", "kernel"): "convolution.weight", ("bn", "scale"): "normalization.weight",
                  ("bn", "bias"): "normalization.bias", ("bn", "mean"): "normalization.running_mean",
                  ("bn", "var"): "normalization.running_var"}
_RESNET_UNIT = re.compile(r"^stage_(?P<stage>\d+)/block_(?P<block>\d+)/(?:conv_(?P<layer>\d+)|shortcut)$")


def resnet_state_dict(variables) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A fadjax ResNet's variables as a transformers ``ResNetModel`` state dict, and its head's Linear layers
    (``hidden``, ``out``) in PyTorch's layout (the reverse of ``fadjax.models.expert.from_pretrained``)."""
    backbone, head = {}, {}
    for (collection, *modules, leaf), value in traverse_util.flatten_dict(variables).items():
        value = np.asarray(value, np.float32)
        if modules[0] == "head":
            head[f"{modules[1]}.{'weight' if leaf == 'kernel' else leaf}"] = np.ascontiguousarray(
                value.T if leaf == "kernel" else value)
            continue
        *unit, kind = modules
        unit = "/".join(unit)
        if unit == "stem":
            prefix = "embedder.embedder"
        else:
            m = _RESNET_UNIT.match(unit)
            if m is None or (kind, leaf) not in _RESNET_LEAVES:
                raise ExportError(f"expert variable {collection}/{'/'.join(modules)}/{leaf}: no transformers ResNet "
                                  f"counterpart")
            part = f"layer.{m['layer']}" if m["layer"] is not None else "shortcut"
            prefix = f"encoder.stages.{int(m['stage']) - 1}.layers.{m['block']}.{part}"
        if (kind, leaf) not in _RESNET_LEAVES:
            raise ExportError(f"expert variable {collection}/{'/'.join(modules)}/{leaf}: no transformers ResNet "
                              f"counterpart")
        if leaf == "kernel":
            value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        backbone[f"{prefix}.{_RESNET_LEAVES[(kind, leaf)]}"] = np.ascontiguousarray(value)
        if kind == "bn" and leaf == "mean":
            backbone[f"{prefix}.normalization.num_batches_tracked"] = np.zeros((), np.int64)
    return backbone, head


def export_expert(workdir, out: pathlib.Path, *, overwrite: bool = False) -> dict:
    """Exports an expert run's best checkpoint to transformers: a ``ResNetForImageClassification`` when its head is
    one Linear, else a ``ResNetModel`` (the backbone) and ``head.safetensors`` (Linear-ReLU-Linear)."""
    from safetensors.numpy import save_file
    from fadjax.models import expert as expert_lib
    from fadjax.runs import load_expert_run
    run = load_expert_run(workdir)
    module = run.module
    if not isinstance(module, expert_lib.ResNet):
        raise ExportError(f"{workdir} is a {type(module).__name__} expert: only ResNet experts export (to "
                          f"transformers' ResNet classes); the ViT's layout has no transformers counterpart here")
    _check_out(out, overwrite)
    backbone, head = resnet_state_dict(run.variables)
    single = module.head_hidden is None
    names = list(run.class_names)
    config = {"model_type": "resnet", "architectures": ["ResNetForImageClassification" if single else "ResNetModel"],
              "num_channels": run.channels, "embedding_size": module.width,
              "hidden_sizes": list(module.resolved_stage_widths), "depths": list(module.stage_sizes),
              "layer_type": module.block, "hidden_act": "relu",
              "downsample_in_first_stage": module.downsample_in_first_stage,
              "downsample_in_bottleneck": module.downsample_in_bottleneck,
              "id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}
    out.mkdir(parents=True, exist_ok=True)
    if single:
        state = {f"resnet.{k}": v for k, v in backbone.items()}
        state.update({"classifier.1.weight": head["out.weight"], "classifier.1.bias": head["out.bias"]})
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        code = ["import torch", "from transformers import ResNetForImageClassification",
                "model = ResNetForImageClassification.from_pretrained(\".\").eval()",
                f"x = torch.rand(1, {run.channels}, {run.image_size}, {run.image_size})  # images in [0, 1], "
                "no normalisation", "with torch.no_grad():", "    logits = model(x).logits"]
    else:
        save_file(backbone, str(out / "model.safetensors"), metadata={"format": "pt"})
        save_file(head, str(out / "head.safetensors"), metadata={"format": "pt"})
        code = ["import torch", "from safetensors.torch import load_file", "from transformers import ResNetModel",
                "model, head = ResNetModel.from_pretrained(\".\").eval(), load_file(\"head.safetensors\")",
                f"x = torch.rand(1, {run.channels}, {run.image_size}, {run.image_size})  # images in [0, 1], "
                "no normalisation", "with torch.no_grad():",
                "    pooled = model(x).pooler_output.flatten(1)  # the features the U-Net was aligned to",
                "    hidden = torch.relu(pooled @ head[\"hidden.weight\"].T + head[\"hidden.bias\"])",
                "    logits = hidden @ head[\"out.weight\"].T + head[\"out.bias\"]"]
    workdir_lib.write_json(out / "config.json", config)
    workdir_lib.write_json(out / CONFIG_COPY, run.config.to_dict())
    card = [f"# {pathlib.Path(workdir).resolve().name}: histology tile classifier (a fadjax expert)", "",
            f"ResNet ({module.block} blocks, depths {list(module.stage_sizes)}, widths "
            f"{list(module.resolved_stage_widths)}), step {run.step}, validation accuracy "
            f"{_pct(run.val_accuracy)}; data `{run.config.data.source}` at {run.image_size} px, {run.channels} "
            f"channel(s); classes: {', '.join(names)}.",
            "", ("A transformers `ResNetForImageClassification`." if single else
                 "A transformers `ResNetModel` (the backbone) and `head.safetensors`, the paper's head "
                 "Linear-ReLU-Linear, which transformers' and torchvision's ResNet classes (one Linear) cannot hold."),
            "", "```python", *code, "```", ""]
    with workdir_lib.atomic_write(out / CARD, "w") as f:
        f.write("\n".join(card))
    logging.info("exported expert %s (step %d) to %s", workdir, run.step, out)
    return {"out": str(out), "step": run.step, "class": config["architectures"][0], "tensors": len(backbone)}


# ----------------------------------------------------------------------------- the command

def _check_out(out: pathlib.Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} is not empty; pass --overwrite to replace what it holds")


def export(workdir, out, *, step: int | None = None, use_ema: bool = True, overwrite: bool = False,
           report: str | None = None, **sampling_overrides) -> dict:
    """Exports the run in ``workdir`` to ``out`` (see the module docstring); returns what it wrote.

    ``sampling_overrides`` (``sampler``, ``steps``, ``guidance_scale``, ``karras_sigmas``, ``guidance_interval``)
    replace the run's config's sampling settings in the scheduler and the card.

    Raises:
      ExportError: a ViT expert, a U-Net diffusers cannot express, a non-empty ``out`` without ``overwrite``.
      FileNotFoundError: not a run, or no such checkpoint.
    """
    workdir, out = pathlib.Path(workdir), pathlib.Path(out)
    record = workdir_lib.read_json(workdir / "run.json")
    if record.get("stage") == "expert":
        if step is not None or not use_ema or sampling_overrides:
            raise ExportError("--step, --no_ema and sampling settings are for diffusion runs; an expert exports "
                              "its best checkpoint")
        return export_expert(workdir, out, overwrite=overwrite)
    _check_out(out, overwrite)
    from safetensors.numpy import save_file
    from fadjax.runs import load_diffusion_run
    run = load_diffusion_run(workdir, step=step, use_ema=use_ema, dtype="float32")
    settings = sampling_settings(run, **sampling_overrides)
    unet_json = unet_config_json(run.model.unet.config)
    state = unet_state_dict(run.params["unet"])
    conditioning = conditioning_json(run)
    conditioning["sampling"] = settings
    scheduler = scheduler_config_json(run, settings)
    code = snippet(run, settings, conditioning)
    card = model_card(run, settings, conditioning, code, find_summary(workdir, report))

    out.mkdir(parents=True, exist_ok=True)
    for sub in (UNET_DIR, SCHEDULER_DIR):
        (out / sub).mkdir(exist_ok=True)
    tmp = out / UNET_DIR / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})  # diffusers reads safetensors marked "pt".
    os.replace(tmp, out / UNET_DIR / WEIGHTS)
    workdir_lib.write_json(out / UNET_DIR / "config.json", unet_json)
    workdir_lib.write_json(out / SCHEDULER_DIR / "scheduler_config.json", scheduler)
    workdir_lib.write_json(out / CONDITIONING, conditioning)
    workdir_lib.write_json(out / CONFIG_COPY, run.config.to_dict())
    with workdir_lib.atomic_write(out / CARD, "w") as f:
        f.write(card)
    logging.info("exported %s (step %d, %s weights, %d U-Net tensors) to %s", workdir, run.step,
                 "EMA" if run.used_ema else "raw", len(state), out)
    return {"out": str(out), "step": run.step, "used_ema": run.used_ema, "settings": settings,
            "tensors": len(state)}


FLAGS = cli.Flags("python -m fadjax.export")
flags.DEFINE_string("workdir", None, "Diffusion or expert run folder.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output folder (diffusers' layout).", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=FLAGS)
flags.DEFINE_bool("no_ema", False, "Export the raw parameters, not the EMA.", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace the files of a non-empty --out.", flag_values=FLAGS)
flags.DEFINE_string("report", None, "fadjax.reproduce's summary.json (or its folder) for the model card's results "
                    "(default: summary.json two levels above --workdir, when there is one).", flag_values=FLAGS)
flags.mark_flags_as_required(["workdir", "out"], flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> dict:
    """Exports (``argv`` without the program name; None = ``sys.argv[1:]``)."""
    args = FLAGS.parse(argv)
    logging.set_verbosity(logging.INFO)
    return export(args.workdir, args.out, step=args.step, use_ema=not args.no_ema, overwrite=args.overwrite,
                  report=args.report)


if __name__ == "__main__":
    cli.run(main, FLAGS.prog)
