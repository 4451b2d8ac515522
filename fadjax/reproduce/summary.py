"""The reproduction's report: ``report.md``, ``summary.json`` and figures, judged by both judges.

Builds on :func:`fadjax.report.make_report`, run once per judge into ``report_<judge>/`` (per-seed
accuracy, per-class accuracy, confusion matrices, SSIM per class beside real data, loss curves,
image grids), and adds what the comparison needs on top: both judges side by side, paired
differences to the baseline with their 95% intervals and the sentences that follow from them,
the Table I comparison (x_t against x0), the deviations from the paper (generated from the
preset), hardware, versions, stage wall times and the exact commands.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import platform


from fadjax import metrics, plots
from fadjax import report as report_lib
from fadjax import workdir as workdir_lib
from fadjax.reproduce import presets

OUTPUTS = ("report.md", "summary.json", "accuracy_by_judge.png")
LABELS = {name: m.label for name, m in presets.MODELS.items()}
PAPER_DELTA = 0.09  # The paper: feature-aligned minus baseline, +9 points, judged by the expert it aligned to.


def _pts(v) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:+.1f}"


def _pct(v) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%"


def _num(v, digits: int = 3) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def verdict(a: str, b: str, judge: str, pd: dict | None) -> str:
    """The sentence a paired difference supports, e.g. '... +3.1 points, 95% CI [0.2, 6.0]: significant ...'."""
    if pd is None:
        return f"{a} minus {b} ({judge}): no shared seeds, no comparison."
    head = f"{a} minus {b}, judged by {judge}: {_pts(pd['mean'])} points over {pd['n']} seed(s)"
    lo, hi = pd["ci_low"], pd["ci_high"]
    if lo is None or not math.isfinite(lo):
        return head + "; no interval (fewer than 2 seeds): no conclusion."
    significant = lo > 0 or hi < 0
    if not significant:
        what = "no detectable difference"
    else:
        what = f"{a} is better" if pd["mean"] > 0 else f"{a} is worse"
    return (f"{head}, 95% CI [{_pts(lo)}, {_pts(hi)}]: "
            f"{'significant' if significant else 'not significant'} ({what}).")


def hardware() -> dict:
    import jax
    devices = jax.devices()
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"backend": jax.default_backend(), "device_kind": devices[0].device_kind,
            "device_count": len(devices), "process_count": jax.process_count(), "host_cpu": cpu,
            "host_cpu_count": os.cpu_count(), "platform": platform.platform()}


def _judge_info(name: str, cfg, workdir: pathlib.Path, evaluated: dict) -> dict:
    ev = {}
    if (workdir / "expert_eval.json").exists():
        ev = json.loads((workdir / "expert_eval.json").read_text())
    return {"arch": cfg.expert.arch, "width": cfg.expert.width, "image_size": cfg.data.image_size,
            "seed": cfg.seed, "pretrained": cfg.expert.pretrained, "epochs": cfg.train.num_epochs,
            "val_accuracy": ev.get("val_accuracy"), "val_accuracy_reevaluated": evaluated.get("expert_val_accuracy"),
            "num_val": ev.get("num_val"), "per_class_val_accuracy": ev.get("per_class_accuracy"),
            "best_step": ev.get("step"), "workdir": str(workdir)}


def write(configs: presets.Configs, out: pathlib.Path, paths: dict) -> dict:
    """Writes the sub-reports of both judges, then ``report.md``, ``summary.json`` and figures.

    Stage wall times and commands come from ``OUT/stages.json`` (``pipeline.Book``).
    """
    models = list(configs.models)
    base = models[0]
    sub, subdirs = {}, {}
    for j in presets.JUDGES:
        subdirs[j] = f"report_{j}"
        sub[j] = report_lib.make_report([str(paths["eval"][j][m]) for m in models], str(out / subdirs[j]), models)
    judges = {j: _judge_info(j, cfg, paths["runs"][j], sub[j]["runs"][base])
              for j, cfg in (("expert", configs.expert), ("judge2", configs.judge2))}
    metrics_by = {j: {m: json.loads((paths["eval"][j][m] / "metrics.json").read_text()) for m in models}
                  for j in presets.JUDGES}

    per_model = {}
    recorded = json.loads((out / "stages.json").read_text())["stages"]
    for m in models:
        e = sub["expert"]["runs"][m]
        entry = {"label": LABELS.get(m, m), "accuracy": {}, "paired_difference_vs_baseline": {},
                 "ssim_generated": e["ssim_generated"], "ssim_real": e["ssim_real"],
                 "ssim_generated_per_class": e["ssim_generated_per_class"],
                 "ssim_real_per_class": e["ssim_real_per_class"],
                 "sampler": e["sampler"], "steps": e["steps"]}
        for j in presets.JUDGES:
            r = sub[j]["runs"][m]
            entry["accuracy"][j] = {"mean": r["accuracy_mean"], "std": r["accuracy_std"],
                                    "per_seed": r["accuracy_per_seed"], "per_class": r["accuracy_per_class"],
                                    "confusion": metrics_by[j][m]["confusion_generated"]}
            entry["paired_difference_vs_baseline"][j] = r.get("paired_difference_vs_baseline")
        u_path = paths.get("utility", {}).get(m)
        if configs.utility is not None and u_path is not None and (u_path / "metrics.json").exists():
            u_metrics = json.loads((u_path / "metrics.json").read_text())
            entry["utility"] = u_metrics["utility"]
            if u_metrics.get("memorisation"):  # Nearest training tiles; its figure beside, linked from the report.
                fig = u_path / "memorisation.png"
                entry["memorisation"] = {**u_metrics["memorisation"],
                                         "figure": os.path.relpath(fig, out) if fig.exists() else None}
        train_rec = recorded.get(f"train/{m}", {})
        entry["training"] = {"wall_s": train_rec.get("wall_s"),
                             "img_per_s": (train_rec.get("result") or {}).get("img_per_s"),
                             "steps": (train_rec.get("result") or {}).get("final_step")}
        per_model[m] = entry

    def paired(a, b, j):
        sa, sb = per_model[a]["accuracy"][j]["per_seed"], per_model[b]["accuracy"][j]["per_seed"]
        common = sorted(set(sa) & set(sb))
        return metrics.paired_difference([sa[s] for s in common], [sb[s] for s in common]) if common else None

    table_i = {j: paired("fad_xt", "fad_x0", j) for j in presets.JUDGES} if {"fad_xt", "fad_x0"} <= set(models) else {}
    conclusions = []
    for j in presets.JUDGES:
        jname = f"{j} ({judges[j]['arch']})"
        for m in models[1:]:
            conclusions.append(verdict(LABELS.get(m, m), LABELS.get(base, base), jname,
                                       per_model[m]["paired_difference_vs_baseline"][j]))
        if table_i:
            conclusions.append(verdict(LABELS["fad_xt"], LABELS["fad_x0"], jname, table_i[j]) +
                               " (Table I: the paper found x_t better than x0.)")

    plots.grouped_bars({f"{j} ({judges[j]['arch']})": {LABELS.get(m, m): per_model[m]["accuracy"][j]["mean"]
                                                       for m in models} for j in presets.JUDGES},
                       [LABELS.get(m, m) for m in models], out / "accuracy_by_judge.png",
                       title="Generation accuracy by judge (mean over seeds)", ylabel="accuracy", xlabel="model")

    learning = learning_curves(configs, out, paths)
    utility = {LABELS.get(m, m): per_model[m]["utility"] for m in models if "utility" in per_model[m]}
    if utility:
        plots.utility(utility, out / "utility.png", title="Usefulness of the synthetic data (judge2's features "
                      "and recipe; dashed: real vs real)")
    book = json.loads((out / "stages.json").read_text())
    stages = {k: v for k, v in book["stages"].items() if v.get("complete")}  # The report itself is not yet.
    worked = [inv for inv in book["invocations"][:-1] if inv.get("ran")] + book["invocations"][-1:]
    commands = [inv["command"] for inv in worked]
    summary = {
        "preset": configs.preset,
        "data": configs.expert.data.source,
        "baseline": base,
        "paper_judge": "expert",
        "paper_judge_note": "the paper judges with the same ResNet50 expert the aligned model was trained towards",
        "seeds": [int(s) for s in sub["expert"]["runs"][base]["accuracy_per_seed"]],
        "num_per_class": int(configs.sample.num_per_class),
        "classes": list(metrics_by["expert"][base]["generated"]["classes"]),
        "judges": judges,
        "models": per_model,
        "table_i_xt_minus_x0": table_i,
        "conclusions": conclusions,
        "deviations": presets.deviations(configs),
        "hardware": hardware(),
        "versions": workdir_lib.versions(commit=True),
        "stages_wall_s": {k: v["wall_s"] for k, v in stages.items()},
        "stages_total_wall_s": round(sum(v["wall_s"] for v in stages.values()), 1),
        # End to end: the invocations that ran stages, up to the start of the report.
        "elapsed_s": round(sum(inv.get("wall_s", 0.0) for inv in worked), 1),
        "jobs": book.get("jobs", 1),
        "commands": commands,
        "sub_reports": subdirs,
        **({"learning_curves": learning} if learning else {}),
    }
    summary = metrics.json_safe(summary)
    workdir_lib.write_json(out / "summary.json", summary)
    (out / "report.md").write_text(_markdown(summary, configs))
    return summary


def terminal_table(s: dict) -> list[str]:
    """The result as a few lines of text: generation accuracy of every model by both judges, Δ to the baseline."""
    judges = s["judges"]
    heads = [f"{j} ({judges[j]['arch']}, val {_pct(judges[j]['val_accuracy'])})" for j in presets.JUDGES]
    width = max(len(r["label"]) for r in s["models"].values())
    lines = ["", f"generation accuracy (mean ± std over {len(s['seeds'])} seeds; chance "
                 f"{_pct(1 / max(len(s['classes']), 1))}), Δ = paired difference to the baseline [95% CI]:",
             f"  {'model':<{width}}  " + "  ".join(f"{h:<34}" for h in heads)]
    for m, r in s["models"].items():
        cells = []
        for j in presets.JUDGES:
            a, pd = r["accuracy"][j], r["paired_difference_vs_baseline"][j]
            cell = f"{_pct(a['mean'])} ± {_pct(a['std'])}"
            if pd is not None:
                cell += f"  Δ {_pts(pd['mean'])} [{_pts(pd['ci_low'])}, {_pts(pd['ci_high'])}]"
            cells.append(f"{cell:<34}")
        lines.append(f"  {r['label']:<{width}}  " + "  ".join(cells))
    util = [(r["label"], r["utility"]) for r in s["models"].values() if "utility" in r]
    if util:
        rr = util[0][1]["real_vs_real"]
        lines += ["", f"usefulness (judge2's features and recipe): TSTR [95% CI] vs real-trained TRTR, augmentation "
                      f"gain, FD (real vs real {rr['fd_judge2']['mean']:.3g}), precision / recall:"]
        for label, u in util:
            lines.append(f"  {label:<{width}}  TSTR {_ci(u['tstr_accuracy'])} (TRTR {_pct(u['trtr_accuracy']['mean'])}), "
                         f"gain {100 * u['augment_gain']['mean']:+.1f} pts, FD {u['fd_judge2']['value']:.3g}, "
                         f"P {_num(u['precision']['value'])} R {_num(u['recall']['value'])}")
    return lines + [""]


def _ci(x: dict | None, f=None) -> str:
    """``mean [lo, hi]`` of a utility statistic (fractions shown in %, or with ``f``)."""
    if not x or x.get("mean") is None:
        return "—"
    f = f or _pct
    lo, hi = (x.get("ci95") or [None, None])[:2]
    return f(x["mean"]) + (f" [{f(lo)}, {f(hi)}]" if lo is not None and hi is not None else "")


def _utility_markdown(s: dict) -> list[str]:
    models = [m for m in s["models"] if "utility" in s["models"][m]]
    if not models:
        return []
    u0 = s["models"][models[0]]["utility"]
    rr = u0["real_vs_real"]
    clf = u0.get("classifier", {})
    L = ["## Usefulness of the synthetic data", "",
         "Classifiers of judge2's architecture and recipe (fresh seeds, "
         f"{len(u0.get('seeds', []))} seeds, {clf.get('steps', '?')} steps each), tested on the real validation split: "
         "**TSTR** trained only on the model's images; **TRTR** the same recipe on as many real training images per "
         f"class; **augmentation gain**: a {100 * u0['augment']['fraction']:.0f}% real subset with and without the "
         "model's images added (points of accuracy, paired over seeds). **FD**: Fréchet distance between real "
         "validation and generated images in judge2's pooled features; it is not Inception-FID (no ImageNet "
         "weights offline) and reads only beside the real-vs-real value. **Precision / recall**: k-NN manifolds "
         f"(k={u0.get('k', 3)}, Kynkäänniemi et al. 2019) in the same space. Mean [95% t-interval] over classifier "
         "seeds (TSTR, gain) or generation seeds (FD, precision, recall; the value over all images first).", "",
         "| model | TSTR | TRTR | TSTR − TRTR (points) | augmentation gain (points) | FD (judge2) | precision | recall |",
         "|---|---|---|---|---|---|---|---|"]
    pts = lambda v: f"{100 * v:+.1f}"
    for m in models:
        u = s["models"][m]["utility"]
        L.append(f"| {s['models'][m]['label']} | {_ci(u['tstr_accuracy'])} | {_ci(u['trtr_accuracy'])} | "
                 f"{_ci(u['tstr_minus_trtr'], pts)} | {_ci(u['augment_gain'], pts)} | "
                 f"{u['fd_judge2']['value']:.3g} | {_num(u['precision']['value'])} | {_num(u['recall']['value'])} |")
    L.append(f"| real vs real (two halves of {rr.get('n_half', '?')}) | — | — | — | — | "
             f"{_ci(rr['fd_judge2'], lambda v: f'{v:.3g}')} | {_ci(rr['precision'], _num)} | {_ci(rr['recall'], _num)} |")
    return L + ["", "![utility](utility.png)", ""]


def _memorisation_markdown(s: dict) -> list[str]:
    """The memorisation check: near-copies and median nearest-training distances, generated vs validation."""
    models = [m for m in s["models"] if s["models"][m].get("memorisation")]
    if not models:
        return []
    m0 = s["models"][models[0]]["memorisation"]
    q = 100 * m0["pixels"]["quantile"]
    L = ["## Memorisation", "",
         f"For every generated tile, the distance to its nearest tile of the training split "
         f"({m0['n_train']} tiles, the split the diffusion models trained on), in pixels (root mean squared "
         "difference per pixel, intensities in [0, 1]) and in judge2's pooled features (Euclidean); the same "
         f"distance for the {m0['n_validation']} real validation tiles, never trained on, is the reference. "
         f"A **near-copy** is a tile nearer to a training tile than the closest {q:g}% of validation tiles come (so "
         f"about {q:g}% of the validation tiles by construction, at least one of them: 1/n with few tiles): a "
         "generated share well above the validation share, or a generated median well below the validation "
         "median, means the model reproduces training tiles; the figures show each model's 8 closest (generated, nearest training tile) pairs in pixels.", "",
         "| model | near-copies, pixels (generated vs validation) | near-copies, judge2 (generated vs validation) "
         "| median distance, pixels (generated vs validation) | median distance, judge2 (generated vs validation) |",
         "|---|---|---|---|---|"]
    for m in models:
        r = s["models"][m]["memorisation"]
        cells = []
        for key, f in (("near_copies", _pct), ("median", lambda v: "n/a" if v is None else f"{v:.3g}")):
            for space in ("pixels", "judge2"):
                e = r.get(space) or {}
                cells.append(f"{f(e.get(f'{key}_generated'))} vs {f(e.get(f'{key}_validation'))}")
        L.append(f"| {s['models'][m]['label']} | " + " | ".join(cells) + " |")
    other = [s["models"][m]["label"] for m in models if s["models"][m]["memorisation"].get("same_split_as_generator")
             is False]
    if other:
        L += ["", f"Warning: {', '.join(other)} trained on another split than judge2's; the distances are to "
                  "judge2's training split."]
    L.append("")
    for m in models:
        fig = s["models"][m]["memorisation"].get("figure")
        if fig:
            L += [f"![closest pairs {s['models'][m]['label']}]({fig})", ""]
    return L


def learning_curves(configs: presets.Configs, out: pathlib.Path, paths: dict) -> dict | None:
    """The learning curves of the pre-training and every model (``OUT/curves/<run>/curve.json``, written by
    ``fadjax.curves``) in one record, drawn in ``learning_curves.png``; None when the preset has none."""
    if configs.curves is None:
        return None
    names = [presets.PRETRAIN] * (configs.pretrain is not None) + list(configs.models)
    runs = {}
    for n in names:
        c = json.loads((paths["curves"][n] / "curve.json").read_text())
        runs[n] = {"label": "pre-training" if n == presets.PRETRAIN else LABELS.get(n, n), "used_ema": c["used_ema"],
                   "images_before": c["images_before"], "batch_size": c["batch_size"],
                   "total_steps": c["total_steps"],
                   "points": [{k: p[k] for k in ("step", "fraction", "images_seen", "fd_judge2", "accuracy_judge2")}
                              for p in c["points"]]}
    first = json.loads((paths["curves"][names[0]] / "curve.json").read_text())
    classes = first["num_images"] // max(first["num_per_class"] * len(first["seeds"]), 1)
    series = {r["label"]: {"images_seen": [p["images_seen"] for p in r["points"]],
                           "fd": [p["fd_judge2"] for p in r["points"]],
                           "accuracy": [p["accuracy_judge2"] for p in r["points"]]} for r in runs.values()}
    starts = {r["images_before"] for n, r in runs.items() if n != presets.PRETRAIN and r["images_before"]}
    plots.learning_curves(series, out / "learning_curves.png", chance=1 / max(classes, 1),
                          marks={"fine-tuning starts": x for x in sorted(starts)[:1]},
                          title=f"Learning curves: {first['num_images']} images per checkpoint, judged by judge2")
    return {"figure": "learning_curves.png", "runs": runs,
            **{k: first[k] for k in ("num_images", "num_per_class", "seeds", "sampler", "steps", "guidance_scale",
                                     "num_real_val")}}


def _sig(v) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3g}"


def _curves_markdown(s: dict) -> list[str]:
    """The learning curves: how they were measured, how to read them, the figure and a table of every point."""
    lc = s.get("learning_curves")
    if not lc:
        return []
    runs = lc["runs"]
    pre = runs.get(presets.PRETRAIN)
    weights = {r["used_ema"] for r in runs.values()}
    which = ("EMA weights" if weights == {True} else "raw weights (the runs keep no EMA)" if weights == {False}
             else "EMA weights where a run keeps them, else raw")
    fractions = [p["fraction"] for p in next(iter(runs.values()))["points"]]
    L = ["## Learning curves", "",
         f"At {', '.join(f'{100 * f:.0f}%' for f in fractions)} of each run's steps, {lc['num_images']} images "
         f"({lc['num_per_class']} per class, seed{'s' if len(lc['seeds']) > 1 else ''} "
         f"{', '.join(map(str, lc['seeds']))}; {lc['sampler']}, {lc['steps']} steps, "
         f"guidance {lc['guidance_scale']:g}) "
         f"were sampled from the checkpoint's {which} and judged by judge2: FD of its pooled features to the "
         f"{lc['num_real_val']} real validation images of those classes, and generation accuracy. The x axis is "
         "training images seen (steps x batch size)" +
         (f"; the fine-tuned models' continues from the pre-training's {pre['points'][-1]['images_seen']:,} images"
          if pre else "") + ".", "",
         "**How to read it:** at the same images seen, a lower FD and a higher accuracy mean a model that has "
         "learnt more from the same data -- if alignment speeds learning up, the aligned curves lie below (FD) and "
         "above (accuracy) the baseline's early on, not only at the end. FD over this few images is biased upward "
         "and noisy: compare the curves with each other, not with the usefulness table's FD.", "",
         "![learning curves](learning_curves.png)", "",
         "| run | " + " | ".join(f"{100 * f:.0f}% of its steps: images seen, FD, accuracy" for f in fractions) + " |",
         "|---" * (1 + len(fractions)) + "|"]
    for r in runs.values():
        cells = [f"{p['images_seen']:,}, {_sig(p['fd_judge2'])}, {_pct(p['accuracy_judge2'])}" for p in r["points"]]
        L.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return L + [""]


def _training_markdown(s: dict) -> list[str]:
    rows = [(s["models"][m]["label"], s["models"][m].get("training") or {}) for m in s["models"]]
    if not any(t.get("wall_s") for _, t in rows):
        return []
    L = ["## Training of each model", "", "Last logged throughput of the training step (img/s, the aligned "
         "models' includes the expert's forward pass and the alignment loss) and the stage's wall time "
         f"(compile included; {s['jobs']} stages at a time, so two stages share the machine).", "",
         "| model | steps | img/s | stage wall time (s) |", "|---|---|---|---|"]
    for label, t in rows:
        ips, wall = t.get("img_per_s"), t.get("wall_s")
        L.append(f"| {label} | {t.get('steps') or '—'} | {f'{ips:.0f}' if ips else '—'} | "
                 f"{f'{wall:.0f}' if wall else '—'} |")
    return L + [""]


def _markdown(s: dict, configs: presets.Configs) -> str:
    models, judges = list(s["models"]), s["judges"]
    base = s["baseline"]
    jn = {j: f"{j} ({judges[j]['arch']}, {judges[j]['image_size']} px)" for j in presets.JUDGES}
    hw = s["hardware"]
    L = [f"# Feature-aligned diffusion: reproduction, `{s['preset']}` preset", "",
         f"Data `{s['data']}`; {len(s['seeds'])} seeds ({', '.join(map(str, s['seeds']))}) shared by every model, "
         f"{s['num_per_class']} images per class and seed, classes {', '.join(s['classes'])}. "
         f"{hw['device_count']} x {hw['device_kind']} ({hw['backend']}); {s['elapsed_s']:.0f} s end to end "
         f"(stages, {s['jobs']} at a time, took {s['stages_total_wall_s']:.0f} s in all).", "",
         "## Result", "",
         f"The paper reports feature-aligned minus baseline = {100 * PAPER_DELTA:+.0f} points, judged by the ResNet50 "
         "expert the model was aligned to: that is the **expert** judge here. The second judge (another "
         "architecture and seed, same training split) was never an alignment target; agreement between the two "
         "says the difference is not only the aligned model imitating its own judge.", ""]
    L += [f"- {c}" for c in s["conclusions"]]
    L += ["", "## Generation accuracy", "",
          "Mean ± std (ddof=1) over seeds; Δ = paired difference to the baseline over the same seeds, "
          "mean [95% t-interval], in points. SSIM: mean pairwise SSIM within (seed, class) groups, lower = more "
          "diverse; real = the same number of real images per class.", "",
          f"| model | {jn['expert']} | Δ | {jn['judge2']} | Δ | SSIM generated | SSIM real | sampler |",
          "|---|---|---|---|---|---|---|---|"]
    for m in models:
        r = s["models"][m]
        cells = []
        for j in presets.JUDGES:
            a, pd = r["accuracy"][j], r["paired_difference_vs_baseline"][j]
            cells.append(f"{_pct(a['mean'])} ± {_pct(a['std'])}")
            cells.append("—" if pd is None else f"{_pts(pd['mean'])} [{_pts(pd['ci_low'])}, {_pts(pd['ci_high'])}]")
        L.append(f"| {r['label']} | " + " | ".join(cells) +
                 f" | {_num(r['ssim_generated'])} | {_num(r['ssim_real'])} | {r['sampler']} ({r['steps']} steps) |")
    L += ["", "![accuracy by judge](accuracy_by_judge.png)", ""]
    L += _utility_markdown(s)
    L += _memorisation_markdown(s)
    L += _training_markdown(s)
    L += _curves_markdown(s)
    L += ["## Judges", "",
          "| judge | architecture | input | seed | init | validation accuracy (best checkpoint) | re-evaluated "
          "| role |",
          "|---|---|---|---|---|---|---|---|"]
    for j in presets.JUDGES:
        i = judges[j]
        role = "the paper's judge and the alignment target" if j == "expert" else "independent second judge"
        L.append(f"| {j} | {i['arch']} (width {i['width']}) | {i['image_size']} px | {i['seed']} | "
                 f"{i['pretrained'] or 'scratch'} | {_pct(i['val_accuracy'])} of {i['num_val']} | "
                 f"{_pct(i['val_accuracy_reevaluated'])} | {role} |")
    L += ["", "## Accuracy per seed", "", "| seed | " + " | ".join(
        f"{s['models'][m]['label']} / {j}" for j in presets.JUDGES for m in models) + " |",
        "|---" * (1 + len(models) * len(presets.JUDGES)) + "|"]
    for seed in s["seeds"]:
        L.append(f"| {seed} | " + " | ".join(_num(s["models"][m]["accuracy"][j]["per_seed"].get(str(seed)))
                                              for j in presets.JUDGES for m in models) + " |")
    for j in presets.JUDGES:
        L += ["", f"## Accuracy per class, judged by {jn[j]}", "",
              "| class | " + " | ".join(s["models"][m]["label"] for m in models) + " | judge on real validation |",
              "|---" * (len(models) + 2) + "|"]
        real = judges[j].get("per_class_val_accuracy") or {}
        for c in s["classes"]:
            L.append(f"| {c} | " + " | ".join(_num(s["models"][m]["accuracy"][j]["per_class"].get(c)) for m in models)
                     + f" | {_num(real.get(c))} |")
    L += ["", "## SSIM diversity per class (lower = more diverse)", "",
          "| class | " + " | ".join(s["models"][m]["label"] for m in models) + " | real |",
          "|---" * (len(models) + 2) + "|"]
    for c in s["classes"] + ["overall"]:
        def get(m, key):
            r = s["models"][m]
            return r[key] if c == "overall" else r[f"{key}_per_class"].get(c)
        L.append(f"| {c} | " + " | ".join(_num(get(m, "ssim_generated")) for m in models) +
                 f" | {_num(get(base, 'ssim_real'))} |")
    L += ["", "## Figures", ""]
    for j in presets.JUDGES:
        d = s["sub_reports"][j]
        L += [f"Judged by {jn[j]} (full comparison: [{d}/report.md]({d}/report.md)):", "",
              f"![accuracy per seed]({d}/accuracy_per_seed.png)", ""]
        L += [f"![confusion {m}]({d}/confusion_{m}.png)" for m in models]
        L += [f"![confusion real]({d}/confusion_real.png)", ""]
    d = s["sub_reports"]["expert"]
    L += [f"![ssim per class]({d}/ssim_per_class.png)", "", f"![loss curves]({d}/loss_curves.png)", ""]
    L += [f"![grid {m}]({d}/grid_{m}.png)" for m in models]
    L += ["", f"## Deviations from the paper (`{s['preset']}` preset)", ""]
    L += [f"- {d}" for d in s["deviations"]] or ["- none"]
    L += ["- addition (not in the paper): the second judge.", "", "## Preset", "", "```",
          presets.describe(s["preset"]), "```", "", "## Hardware and software", ""]
    L += [f"- {k}: {v}" for k, v in {**s["hardware"], **s["versions"]}.items()]
    L += ["", "## Stages (wall time, compile included)", "", "| stage | seconds |", "|---|---|"]
    L += [f"| {k} | {v:.1f} |" for k, v in s["stages_wall_s"].items()]
    L += [f"| **all stages** (sum; {s['jobs']} at a time) | **{s['stages_total_wall_s']:.1f}** |",
          f"| **end to end** (until the report) | **{s['elapsed_s']:.1f}** |", "", "## Commands", "", "```"]
    L += s["commands"] + ["```", ""]
    return "\n".join(L)
