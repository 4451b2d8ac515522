"""Puts several evaluated runs side by side (paper Table I, Figs. 3-8).

    python -m fadjax.report --runs reports/baseline,reports/fad --out reports/compare

Reads each ``metrics.json`` written by ``fadjax.evaluate`` and writes ``OUT/report.md``,
``OUT/summary.json`` and figures: ``accuracy_per_seed.png`` (Fig. 4), ``ssim_per_class.png``
(Fig. 6, real data included), ``loss_curves.png`` (Fig. 3, from each diffusion run's
``metrics.jsonl``), ``confusion_<label>.png`` and ``confusion_real.png`` (Fig. 5) and
``grid_<label>.png`` (synthetic vs real per class, Figs. 7-8). The first run is the baseline:
every other run's accuracy is compared with it seed by seed (paired difference, 95% t-interval).
"""
from __future__ import annotations

import json
import os
import re
from typing import Sequence

import numpy as np
from absl import flags, logging

from fadjax import cli
from fadjax import metrics, plots
from fadjax import workdir as workdir_lib
from fadjax.evaluate import REAL_EXAMPLES, read_manifest, read_png

LOSS_KEYS = ("loss", "noise_loss", "align_loss")


def _load(report_dir: str) -> dict:
    path = os.path.join(report_dir, "metrics.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{report_dir!r} has no metrics.json (run `python -m fadjax.evaluate` first)")
    with open(path) as f:
        return json.load(f)


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def read_curves(metrics_jsonl: str | None) -> dict[str, tuple[list[int], list[float]]]:
    """``{key: (steps, values)}`` of the loss keys logged in a run's ``metrics.jsonl`` (empty if absent)."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    if not metrics_jsonl or not os.path.exists(metrics_jsonl):
        return curves
    with open(metrics_jsonl) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            for key in LOSS_KEYS:
                if key in rec and "step" in rec:
                    steps, values = curves.setdefault(key, ([], []))
                    steps.append(int(rec["step"]))
                    values.append(float(rec[key]))
    return curves


def _grid_rows(m: dict, report_dir: str, per_class: int) -> list:
    gen_dir = m["generated"]["dir"]
    manifest = read_manifest(gen_dir)
    first = m["generated"]["seeds"][0]
    real = {}
    npz_path = os.path.join(report_dir, m.get("real_examples", REAL_EXAMPLES))
    if os.path.exists(npz_path):
        with np.load(npz_path) as z:
            real = {str(c): z[f"class_{i}"] for i, c in enumerate(z["class_names"])}
    rows = []
    for c in m["generated"]["classes"]:
        files = [e["file"] for e in manifest["images"] if e["class"] == c and int(e["seed"]) == first][:per_class]
        synth = [read_png(os.path.join(gen_dir, f)) for f in files]
        rows.append((c, synth, list(real.get(c, []))[:per_class]))
    return rows


def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def make_report(report_dirs: Sequence[str], out: str, labels: Sequence[str] | None = None, *,
                grid_per_class: int = 6) -> dict:
    """Compares evaluated runs; the first is the baseline of the paired differences.

    Args:
      report_dirs: output folders of ``fadjax.evaluate``.
      out: output folder.
      labels: run names; ``None`` = the folders' names.
      grid_per_class: images per class (synthetic and real) in each grid.

    Returns:
      The summary written to ``summary.json``.
    """
    if not report_dirs:
        raise ValueError("no runs to report")
    labels = list(labels) if labels else [os.path.basename(os.path.normpath(d)) for d in report_dirs]
    if len(labels) != len(report_dirs) or len(set(labels)) != len(labels):
        raise ValueError(f"need one distinct label per run: labels {labels}, runs {list(report_dirs)}")
    runs = {label: _load(d) for label, d in zip(labels, report_dirs)}
    os.makedirs(out, exist_ok=True)
    base_label = labels[0]
    base_acc = {int(s): v for s, v in runs[base_label]["accuracy"]["per_seed"].items()}

    summary = {"baseline": base_label, "runs": {}}
    for label, d in zip(labels, report_dirs):
        m = runs[label]
        acc = {int(s): v for s, v in m["accuracy"]["per_seed"].items()}
        entry = {"dir": os.path.abspath(d),
                 "accuracy_mean": m["accuracy"]["mean"], "accuracy_std": m["accuracy"]["std"],
                 "accuracy_per_seed": acc, "accuracy_per_class": m["accuracy"]["per_class"],
                 "ssim_generated": m["ssim"]["generated"]["overall"], "ssim_real": m["ssim"]["real"]["overall"],
                 "ssim_generated_per_class": m["ssim"]["generated"]["per_class"],
                 "ssim_real_per_class": m["ssim"]["real"]["per_class"],
                 "expert_val_accuracy": m["expert_validation"]["accuracy"],
                 "num_seeds": len(acc), "sampler": m["generated"].get("sampler"), "steps": m["generated"].get("steps")}
        if label != base_label:
            common = sorted(set(acc) & set(base_acc))
            if len(common) < max(len(acc), len(base_acc)):
                logging.warning("%s and %s share only seeds %s", label, base_label, common)
            entry["paired_difference_vs_baseline"] = (
                metrics.paired_difference([acc[s] for s in common], [base_acc[s] for s in common])
                if common else None)
        summary["runs"][label] = entry
    workdir_lib.write_json(os.path.join(out, "summary.json"), summary)

    plots.per_seed({label: summary["runs"][label]["accuracy_per_seed"] for label in labels},
                   os.path.join(out, "accuracy_per_seed.png"), title="Generation accuracy per seed")
    classes = list(runs[base_label]["generated"]["classes"])
    bars = {label: {**summary["runs"][label]["ssim_generated_per_class"],
                    "overall": summary["runs"][label]["ssim_generated"]} for label in labels}
    bars["real data"] = {**summary["runs"][base_label]["ssim_real_per_class"],
                         "overall": summary["runs"][base_label]["ssim_real"]}
    plots.grouped_bars(bars, classes + ["overall"], os.path.join(out, "ssim_per_class.png"),
                       title="SSIM diversity per class (lower = more diverse)", ylabel="mean pairwise SSIM")

    panels: dict[str, dict] = {}
    for label in labels:
        for key, xy in read_curves(runs[label]["diffusion_run"].get("metrics_jsonl")).items():
            panels.setdefault(key, {})[label] = xy
    panels = {k: panels[k] for k in LOSS_KEYS if k in panels}
    if panels:
        plots.curves(panels, os.path.join(out, "loss_curves.png"), title="Training losses")

    for label in labels:
        cm = runs[label]["confusion_generated"]
        plots.confusion(np.array(cm["counts"]), cm["rows"], cm["cols"],
                        os.path.join(out, f"confusion_{_safe(label)}.png"), title=f"Expert on {label} generations")
    real_cm = runs[base_label]["expert_validation"]["confusion"]
    plots.confusion(np.array(real_cm["counts"]), real_cm["rows"], real_cm["cols"],
                    os.path.join(out, "confusion_real.png"),
                    title="Expert on real validation images")
    grids = {}
    for label, d in zip(labels, report_dirs):
        try:
            rows = _grid_rows(runs[label], d, grid_per_class)
        except (FileNotFoundError, ValueError) as e:
            logging.warning("no image grid for %s: %s", label, e)
            continue
        grids[label] = f"grid_{_safe(label)}.png"
        plots.image_grid(rows, os.path.join(out, grids[label]), title=f"{label}: synthetic vs real")

    lines = ["# Feature-aligned diffusion: comparison", "",
             f"Baseline for paired differences: **{base_label}**. Accuracy: the expert's classification of the "
             "generated images, mean ± std (ddof=1) over seeds; Δ: paired difference to the baseline over shared "
             "seeds with a 95% t-interval. SSIM: mean pairwise SSIM within (seed, class) groups, averaged over seeds "
             "then classes (lower = more diverse); real = the same number of real images per class.", "",
             "| model | generation accuracy | Δ vs baseline [95% CI] | SSIM generated | SSIM real | seeds | sampler |",
             "|---|---|---|---|---|---|---|"]
    for label in labels:
        r = summary["runs"][label]
        pd = r.get("paired_difference_vs_baseline")
        delta = "—" if pd is None else f"{pd['mean']:+.3f} [{_fmt(pd['ci_low'])}, {_fmt(pd['ci_high'])}]"
        lines.append(f"| {label} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | {delta} | "
                     f"{_fmt(r['ssim_generated'])} | {_fmt(r['ssim_real'])} | {r['num_seeds']} | "
                     f"{r['sampler']} ({r['steps']} steps) |")
    seeds = sorted({s for label in labels for s in summary["runs"][label]["accuracy_per_seed"]})
    lines += ["", "## Accuracy per seed", "", "| seed | " + " | ".join(labels) + " |",
              "|---" * (len(labels) + 1) + "|"]
    for s in seeds:
        lines.append(f"| {s} | " + " | ".join(_fmt(summary["runs"][label]["accuracy_per_seed"].get(s))
                                               for label in labels) + " |")
    lines += ["", "![accuracy per seed](accuracy_per_seed.png)", "", "## Accuracy per class", "",
              "| class | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(_fmt(summary["runs"][label]["accuracy_per_class"].get(c))
                                               for label in labels) + " |")
    lines += ["", "## Confusion matrices", ""]
    lines += [f"![confusion {label}](confusion_{_safe(label)}.png)" for label in labels]
    lines += ["![confusion real](confusion_real.png)", "", "## SSIM diversity per class", "",
              "![ssim per class](ssim_per_class.png)", "", "## Training losses", ""]
    lines.append("![loss curves](loss_curves.png)" if panels else
                 "No `metrics.jsonl` of the diffusion runs was found; no loss curves.")
    lines += ["", "## Synthetic vs real images", ""]
    lines += [f"### {label}\n\n![grid {label}]({g})\n" for label, g in grids.items()]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    logging.info("wrote %s", os.path.join(out, "report.md"))
    return summary


FLAGS = cli.Flags("python -m fadjax.report")
flags.DEFINE_list("runs", None, "Output folders of fadjax.evaluate, comma-separated; the first is the baseline.",
                  flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output folder.", flag_values=FLAGS)
flags.DEFINE_list("labels", None, "Run names, comma-separated (default: the folder names).", flag_values=FLAGS)
flags.mark_flags_as_required(["runs", "out"], flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> dict:
    args = FLAGS.parse(argv)
    logging.set_verbosity(logging.INFO)
    return make_report(args.runs, args.out, args.labels)


if __name__ == "__main__":
    cli.run(main, FLAGS.prog)
