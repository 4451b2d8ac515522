"""The stages of the comparison, each skipped when its outputs are complete, resumed otherwise.

``stages.json`` in OUT records, per stage, a fingerprint of everything it depends on (its
resolved config, the fingerprints of the stages it reads), whether it completed and its wall
time (summed over the invocations that worked on it), and per invocation the exact command. A
stage is skipped when it completed with the same fingerprint and its outputs are still there.
An interrupted stage resumes: training from its workdir's latest checkpoint (``fadjax.train``),
sampling from its complete seeds (``fadjax.sample``); evaluation and the report are redone.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import pathlib
import sys
import time
from typing import Any, Callable

from absl import logging

from fadjax.reproduce import presets

STAGES_FILE = "stages.json"


class ReproduceError(RuntimeError):
    """An OUT folder that cannot be resumed with this invocation's settings."""


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: pathlib.Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


class Book:
    """``stages.json``: what each stage depends on, whether it completed, and its wall time."""

    def __init__(self, out: pathlib.Path, command: str, *, echo: bool = True):
        self.path = out / STAGES_FILE
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}, "invocations": []}
        self.invocation = {"command": command, "started": _now(), "ran": [], "skipped": []}
        self.data["invocations"].append(self.invocation)
        self.echo = echo
        self.t0 = time.perf_counter()
        self.save()

    def save(self) -> None:
        self.invocation["wall_s"] = round(time.perf_counter() - self.t0, 2)
        _write_json(self.path, self.data)

    def say(self, msg: str) -> None:
        """A progress line on stdout (and in the log) with the invocation's elapsed time."""
        line = f"[reproduce {time.perf_counter() - self.t0:7.1f}s] {msg}"
        logging.info(line)
        if self.echo:
            print(line, flush=True)

    def stage(self, name: str, fp: str, outputs_ok: Callable[[], bool], fn: Callable[[], Any], *,
              what: str = "") -> Any:
        """Runs ``fn`` unless the stage completed with fingerprint ``fp`` and ``outputs_ok()``.

        Returns:
          What ``fn`` returned, now or when the stage completed (a JSON-able value).
        """
        rec = self.data["stages"].get(name)
        if rec and rec.get("complete") and rec.get("fingerprint") == fp and outputs_ok():
            self.invocation["skipped"].append(name)
            self.save()
            self.say(f"{name}: complete, skipped (took {rec['wall_s']:.1f}s when it ran)")
            return rec.get("result")
        if not rec or rec.get("fingerprint") != fp:
            rec = {"fingerprint": fp, "wall_s": 0.0}
        rec.update(complete=False, started=_now())
        self.data["stages"][name] = rec
        self.invocation["ran"].append(name)
        self.save()
        self.say(f"{name}: {what or 'running'}")
        t = time.perf_counter()
        try:
            result = fn()
        finally:
            dt = time.perf_counter() - t
            rec["wall_s"] = round(rec["wall_s"] + dt, 2)
            rec["last_wall_s"] = round(dt, 2)
            self.save()
        rec.update(complete=True, finished=_now(), result=result)
        self.save()
        self.say(f"{name}: done in {dt:.1f}s")
        return result

    def wall_times(self) -> dict[str, float]:
        return {k: v["wall_s"] for k, v in self.data["stages"].items()}


# ----------------------------------------------------------------------------- training

def _training_dict(config) -> dict:
    """The config as train writes it, without what never changes the trained weights."""
    d = json.loads(json.dumps(config.to_dict(), default=str))
    d.pop("sample", None)
    d.get("train", {}).pop("progress", None)
    return d


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_workdir(workdir: pathlib.Path, config) -> None:
    """Refuses to resume a workdir trained with other settings (it would mix two runs)."""
    path = workdir / "config.json"
    if not path.exists():
        return
    old = _training_dict(type(config)(json.loads(path.read_text())))
    new = _training_dict(config)
    if old != new:
        a, b = _flat(old), _flat(new)
        diff = [f"{k}: {a.get(k)!r} (there) != {b.get(k)!r} (now)" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        raise ReproduceError(f"{workdir} holds a run trained with other settings:\n  " + "\n  ".join(diff) +
                             "\nUse another --out, or delete that folder to retrain it.")


def _steps_saved(directory: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def training_complete(workdir: pathlib.Path, *, expert: bool) -> bool:
    try:
        record = json.loads((workdir / "run.json").read_text())
    except (OSError, ValueError):
        return False
    steps = _steps_saved(workdir / "checkpoints")
    done = bool(steps) and steps[-1] >= int(record.get("total_steps", 1 << 60))
    return done and (not expert or bool(_steps_saved(workdir / "best")))


def train(book: Book, name: str, config, workdir: pathlib.Path, deps: list[str]) -> str:
    """Trains one stage (expert, judge or diffusion model); returns its fingerprint."""
    from fadjax import train as train_lib
    fp = fingerprint({"config": _training_dict(config), "deps": deps})
    expert = config.stage == "expert"
    check_workdir(workdir, config)
    if expert:
        what = f"training {config.expert.arch} at {config.data.image_size}px, {config.train.num_epochs} epochs"
    else:
        length = (f"{config.train.num_steps} steps" if config.train.num_steps else f"{config.train.num_epochs} epochs")
        what = (f"training U-Net ({config.model.block_out_channels or 'tiny-sd'}), batch {config.train.batch_size}, "
                f"{length}, " + (f"aligned to the expert on {config.align.expert_input} input"
                                 if config.align.enabled else "no alignment"))

    def run():
        s = train_lib.run(config, workdir)
        return {k: s.get(k) for k in ("final_step", "total_steps", "best_val_accuracy", "start_step") if k in s}

    book.stage(f"train/{name}", fp, lambda: training_complete(workdir, expert=expert), run, what=what)
    return fp


def same_split(a: pathlib.Path, b: pathlib.Path) -> None:
    sa, sb = (json.loads((w / "split.json").read_text()) for w in (a, b))
    if sa["train"]["indices"] != sb["train"]["indices"] or sa["val"]["indices"] != sb["val"]["indices"]:
        raise ReproduceError(f"{a} and {b} were trained on different splits; both judges must share one")


# ----------------------------------------------------------------------------- sampling and evaluation

def sampling_settings(sample_cfg) -> dict:
    from fadjax.config_lib import parse_seeds
    return {"seeds": parse_seeds(sample_cfg.seeds), "num_per_class": int(sample_cfg.num_per_class),
            "sampler": sample_cfg.sampler, "steps": sample_cfg.get("steps"),
            "guidance_scale": float(sample_cfg.guidance_scale), "batch_size": int(sample_cfg.batch_size)}


def sample(book: Book, name: str, run_dir: pathlib.Path, out: pathlib.Path, settings: dict, model_fp: str) -> str:
    from fadjax import runs
    from fadjax import sample as sample_lib
    fp = fingerprint({"model": model_fp, "settings": settings})

    def run():
        r = runs.load_diffusion_run(run_dir)
        m = sample_lib.generate(r, str(out), seeds=settings["seeds"], num_per_class=settings["num_per_class"],
                                sampler=settings["sampler"], steps=settings["steps"],
                                guidance_scale=settings["guidance_scale"], batch_size=settings["batch_size"],
                                progress=sys.stderr.isatty())
        return {"images": m["counts"]["images"], "steps": m["steps"], "sampler": m["sampler"]}

    n = len(settings["seeds"])
    book.stage(f"sample/{name}", fp, lambda: (out / sample_lib.MANIFEST).exists(), run,
               what=f"sampling {n} seeds x {settings['num_per_class']} per class ({settings['sampler']}, "
                    f"{settings['steps'] or 'all'} steps)")
    return fp


def evaluate(book: Book, name: str, judge_name: str, judge: Callable, gens: pathlib.Path, out: pathlib.Path,
             deps: list[str], batch_size: int) -> str:
    from fadjax import evaluate as evaluate_lib
    fp = fingerprint({"deps": deps, "batch_size": batch_size})

    def run():
        m = evaluate_lib.evaluate(str(gens), judge(), str(out), batch_size=batch_size)
        return {"accuracy_mean": m["accuracy"]["mean"], "accuracy_std": m["accuracy"]["std"]}

    book.stage(f"eval/{judge_name}/{name}", fp, lambda: (out / "metrics.json").exists(), run,
               what=f"judging {name} with {judge_name}")
    return fp


# ----------------------------------------------------------------------------- everything

def layout(out: pathlib.Path) -> dict:
    """Where each stage writes, under OUT."""
    models = [m[0] for m in presets.MODELS]
    return {
        "runs": {n: out / "runs" / n for n in ("expert", "judge2", *models)},
        "gens": {n: out / "gens" / n for n in models},
        # eval/<model> is judged by the expert (the paper's judge), eval2/<model> by the second judge.
        "eval": {"expert": {n: out / "eval" / n for n in models}, "judge2": {n: out / "eval2" / n for n in models}},
    }


def run_all(configs: presets.Configs, out: pathlib.Path, *, command: str, echo: bool = True) -> dict:
    """Runs (or skips) every stage and writes the report; returns the summary."""
    from fadjax import runs
    from fadjax.reproduce import summary as summary_lib

    out.mkdir(parents=True, exist_ok=True)
    book = Book(out, command, echo=echo)
    book.data["preset"] = configs.preset
    paths = layout(out)
    book.say(f"preset {configs.preset}, data {configs.expert.data.source}, out {out}")
    fps = {}
    fps["expert"] = train(book, "expert", configs.expert, paths["runs"]["expert"], [])
    fps["judge2"] = train(book, "judge2", configs.judge2, paths["runs"]["judge2"], [])
    same_split(paths["runs"]["expert"], paths["runs"]["judge2"])
    for name, c in configs.models.items():
        fps[name] = train(book, name, c, paths["runs"][name], [fps["expert"]] if c.align.enabled else [])

    settings = sampling_settings(configs.sample)
    gen_fps = {name: sample(book, name, paths["runs"][name], paths["gens"][name], settings, fps[name])
               for name in configs.models}

    loaded: dict[str, Any] = {}

    def judge(j):
        def get():
            if j not in loaded:
                loaded[j] = runs.load_expert_run(paths["runs"][j])
            return loaded[j]
        return get

    eval_fps = []
    for j, jcfg in (("expert", configs.expert), ("judge2", configs.judge2)):
        for name in configs.models:
            eval_fps.append(evaluate(book, name, j, judge(j), paths["gens"][name], paths["eval"][j][name],
                                     [gen_fps[name], fps[j]], int(jcfg.train.eval_batch_size)))

    def report():
        summary_lib.write(configs, out, paths, book)

    report_fp = fingerprint({"evals": eval_fps, "deviations": presets.deviations(configs)})
    book.stage("report", report_fp, lambda: all((out / f).exists() for f in summary_lib.OUTPUTS), report,
               what="writing the report")
    book.say(f"all stages complete; report: {out / 'report.md'}")
    book.save()
    return json.loads((out / "summary.json").read_text())
