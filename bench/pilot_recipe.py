"""Pilots of the diffusion recipe: one trained run, several sampler settings, the usefulness numbers of each.

For each ``--settings`` entry it samples ``--per_class`` tiles per class (seed 0; the classes the run
generates by default), then measures them in a judge's space (judge2 in the presets): FD against the
real validation tiles, precision / recall (k = 3), the judge's generation accuracy, and (``--tstr``) the
validation accuracy of one classifier of the judge's recipe trained only on them (TSTR, seed 0). One
JSON line per setting goes to stdout and is appended to ``--out``.

  python bench/pilot_recipe.py --run out/pilot/vrec --judge out/pilot/judge2 \
      --settings ddim:50:1.5 ddpm:25:3 dpmpp_2m:20:2 --per_class 30 --out out/pilot/results.jsonl

A setting is ``SAMPLER:STEPS:GUIDANCE[:LO-HI]`` (the optional guidance interval in sigma units).
Choose settings on these numbers by FD or TSTR on the validation split, never by the judge's accuracy
alone (it rewards over-guided, undiverse tiles).
"""
from __future__ import annotations

import argparse
import inspect
import json
import time

import numpy as np


def parse_setting(text: str) -> dict:
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise SystemExit(f"pilot_recipe.py: error: setting {text!r} is not SAMPLER:STEPS:GUIDANCE[:LO-HI]")
    out = {"sampler": parts[0], "steps": int(parts[1]), "guidance_scale": float(parts[2])}
    if len(parts) == 4:
        lo, hi = (float(v) for v in parts[3].split("-"))
        out["guidance_interval"] = (lo, hi)
    return out


def generate(run, setting: dict, *, per_class: int, batch_size: int, seed: int = 0):
    """uint8 ``[N, H, W, C]`` tiles and their class indices (the run's default classes, ``per_class`` each)."""
    from fadjax import diffusion, sample as sample_lib, sampling
    classes = sample_lib.default_classes(run)
    labels = np.repeat([run.condition_labels[c] for c in classes], per_class)
    accepted = inspect.signature(sampling.sample).parameters
    extra = {k: v for k, v in setting.items() if k not in ("sampler", "steps", "guidance_scale")}
    if "prediction" in accepted:
        extra["prediction"] = run.config.diffusion.get("prediction", "epsilon")
    shape = (run.image_size, run.image_size, run.channels)
    out = []
    for start in range(0, len(labels), batch_size):
        ids = np.arange(start, start + batch_size)
        y = labels[ids % len(labels)]  # Padded to one compiled shape.
        x = sampling.sample(run.eps_fn, run.params, run.schedule, y, shape=shape, seed=seed, image_ids=ids,
                            sampler=setting["sampler"], steps=setting["steps"],
                            guidance_scale=setting["guidance_scale"], null_label=run.null_label, **extra)
        out.append(sampling.to_uint8(diffusion.from_model_range(x, run.data_range)))
    images = np.concatenate(out)[:len(labels)]
    class_index = np.asarray([run.class_names.index(c) for c in classes])
    return images, class_index[np.repeat(np.arange(len(classes)), per_class)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="the diffusion run's workdir")
    p.add_argument("--judge", required=True, help="the judge's workdir (judge2 in the presets)")
    p.add_argument("--settings", nargs="+", required=True, help="SAMPLER:STEPS:GUIDANCE[:LO-HI] ...")
    p.add_argument("--per_class", type=int, default=30)
    p.add_argument("--batch_size", type=int, default=105)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--raw", action="store_true", help="the raw parameters instead of the EMA")
    p.add_argument("--tstr", action="store_true", help="also train one TSTR classifier (seed 0)")
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    p.add_argument("--label", default="", help="a name for the lines (e.g. the recipe)")
    args = p.parse_args(argv)

    from fadjax import evaluate, runs, utility
    run = runs.load_diffusion_run(args.run, step=args.step, use_ema=not args.raw)
    judge = runs.load_expert_run(args.judge)
    val_x, val_y = judge.load_val_data()
    gen_classes = None
    for text in args.settings:
        setting = parse_setting(text)
        t0 = time.time()
        images, labels = generate(run, setting, per_class=args.per_class, batch_size=args.batch_size)
        sample_s = time.time() - t0
        if gen_classes is None:
            gen_classes = np.unique(labels)
            keep = np.isin(val_y, gen_classes)
            real_feats = utility.pooled_features(judge, val_x[keep])
        feats = utility.pooled_features(judge, images)
        pred = evaluate.classify(judge, images)
        prec, rec = utility.precision_recall(real_feats, feats, k=3)
        line = {"label": args.label, "run": args.run, "step": int(run.step), "ema": bool(run.used_ema),
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in setting.items()},
                "n": int(len(images)), "fd_judge": round(utility.frechet_distance(real_feats, feats), 2),
                "gen_accuracy": round(float(np.mean(pred == labels)), 4),
                "precision": round(float(prec), 3), "recall": round(float(rec), 3), "sample_s": round(sample_s, 1)}
        if args.tstr:
            spec = utility.spec_from_run(judge)
            r = utility.tstr(images, labels, judge.load_train_data(), (val_x, val_y), spec=spec, seeds=(0,))
            line["tstr"] = round(float(r["tstr_accuracy"]["mean"]), 4)
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
