"""The stages of the comparison, each skipped when its outputs are complete, resumed otherwise.

``stages.json`` in OUT records, per stage, a fingerprint of everything it depends on (its
resolved config, the fingerprints of the stages it reads), whether it completed and its wall
time (summed over the invocations that worked on it), and per invocation the exact command and
its elapsed time. A stage is skipped when it completed with the same fingerprint and its
outputs are still there. An interrupted stage resumes: training from its workdir's latest
checkpoint (``fadjax.train``), sampling from its complete seeds (``fadjax.sample``); evaluation
and the report are redone.

Stages form a graph (the aligned models need the expert, sampling its model, evaluation its
samples and judge). With ``jobs > 1`` independent stages run in threads: on a GPU most of a
small stage is XLA compilation on the host, which overlaps; the device runs one stage's
kernels at a time. Figures are drawn one at a time (pyplot is not thread-safe).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import pathlib
import queue
import sys
import threading
import time
from typing import Any, Callable

from absl import logging

from fadjax import workdir as workdir_lib
from fadjax.reproduce import presets

STAGES_FILE = "stages.json"


class ReproduceError(workdir_lib.WorkdirError):
    """An OUT folder that cannot be resumed with this invocation's settings."""


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Book:
    """``stages.json``: what each stage depends on, whether it completed, and its wall time."""

    def __init__(self, out: pathlib.Path, command: str, *, echo: bool = True):
        self.path = out / STAGES_FILE
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}, "invocations": []}
        self.invocation = {"command": command, "started": _now(), "ran": [], "skipped": []}
        self.data["invocations"].append(self.invocation)
        self.echo = echo
        self.t0 = time.perf_counter()
        self.lock = threading.RLock()
        self.running: dict[str, float] = {}  # Stage -> start (perf_counter) while it runs.
        self.save()

    def save(self) -> None:
        with self.lock:
            self.invocation["wall_s"] = round(time.perf_counter() - self.t0, 2)
            workdir_lib.write_json(self.path, self.data)

    def say(self, msg: str) -> None:
        """A progress line on stdout (and in the log) with the invocation's elapsed time."""
        line = f"[reproduce {time.perf_counter() - self.t0:7.1f}s] {msg}"
        logging.info(line)
        if self.echo:
            print(line, flush=True)

    def interrupted(self) -> None:
        """Adds the time of the stages still running to their record (the run was interrupted)."""
        with self.lock:
            now = time.perf_counter()
            for name, t in self.running.items():
                rec = self.data["stages"][name]
                rec["wall_s"] = round(rec["wall_s"] + now - t, 2)
                rec["interrupted"] = _now()
            self.running.clear()
            self.save()

    def elapsed_s(self) -> float:
        """Wall time of every invocation that ran a stage (this one up to now)."""
        self.save()
        return round(sum(i.get("wall_s", 0.0) for i in self.data["invocations"]
                         if i.get("ran") or i is self.invocation), 1)

    def stage(self, task: "Task") -> None:
        """Runs ``task`` unless it completed with the same fingerprint and its outputs are there."""
        with self.lock:
            rec = self.data["stages"].get(task.name)
            skip = bool(rec and rec.get("complete") and rec.get("fingerprint") == task.fp and task.outputs_ok())
            if skip:
                self.invocation["skipped"].append(task.name)
            else:
                if not rec or rec.get("fingerprint") != task.fp:
                    rec = {"fingerprint": task.fp, "wall_s": 0.0}
                rec.update(complete=False, started=_now())
                self.data["stages"][task.name] = rec
                self.invocation["ran"].append(task.name)
            self.save()
        if skip:
            self.say(f"{task.name}: complete, skipped (took {rec['wall_s']:.1f}s when it ran)")
            return
        self.say(f"{task.name}: {task.what or 'running'}")
        t = time.perf_counter()
        with self.lock:
            self.running[task.name] = t
        try:
            result = task.fn()
        finally:
            dt = time.perf_counter() - t
            with self.lock:
                if self.running.pop(task.name, None) is not None:  # Not yet counted by interrupted().
                    rec["wall_s"] = round(rec["wall_s"] + dt, 2)
                    rec["last_wall_s"] = round(dt, 2)
                    self.save()
        with self.lock:
            rec.update(complete=True, finished=_now(), result=result)
            self.save()
        self.say(f"{task.name}: done in {dt:.1f}s" + (f", {headline(result)}" if headline(result) else ""))


def headline(result) -> str:
    """A stage's result in a few words (validation accuracy, final loss, images made, accuracy)."""
    if not isinstance(result, dict):
        return ""
    parts = []
    if result.get("best_val_accuracy") is not None:
        parts.append(f"validation accuracy {100 * result['best_val_accuracy']:.1f}%")
    if result.get("last_loss") is not None:
        parts.append(f"loss {result['last_loss']:.4f}")
    if result.get("img_per_s"):
        parts.append(f"{result['img_per_s']:.0f} img/s")
    if result.get("images") is not None:
        parts.append(f"{result['images']} images")
    if result.get("tstr_accuracy") is not None:
        parts.append(f"TSTR {100 * result['tstr_accuracy']:.1f}% (real-trained {100 * result['trtr_accuracy']:.1f}%), "
                     f"augmentation gain {100 * result['augment_gain']:+.1f} points, FD {result['fd_judge2']:.3g}")
    if result.get("curve_points"):
        parts.append(f"{result['curve_points']} checkpoints: FD {result['fd_first']:.3g} -> {result['fd_last']:.3g}, "
                     f"accuracy {_percent(result['accuracy_first'])} -> {_percent(result['accuracy_last'])} (judge2)")
    if result.get("accuracy_mean") is not None:
        std = result.get("accuracy_std")
        parts.append(f"generation accuracy {100 * result['accuracy_mean']:.1f}%"
                     + (f" ± {100 * std:.1f}" if std is not None and std == std else ""))
    return ", ".join(parts)


def _percent(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


@dataclasses.dataclass
class Task:
    """One stage: ``fn`` runs it; ``deps`` name the tasks it reads; ``fp`` fingerprints its inputs."""

    name: str
    deps: tuple[str, ...]
    fp: str
    outputs_ok: Callable[[], bool]
    fn: Callable[[], Any]
    what: str = ""


def execute(tasks: list[Task], book: Book, *, jobs: int) -> None:
    """Runs every task after its dependencies, up to ``jobs`` at a time, in list order.

    After a failure nothing new starts; the tasks in flight finish, then the first error is raised.
    An interrupt (Ctrl-C, SIGTERM) records the running stages' time and returns at once: the
    worker threads are daemons, so the process can exit while they are inside a compile.
    """
    by_name = {t.name: t for t in tasks}
    for t in tasks:
        missing = [d for d in t.deps if d not in by_name]
        if missing:
            raise ValueError(f"task {t.name} depends on unknown {missing}")
    if jobs <= 1:
        for t in tasks:
            book.stage(t)
        return
    finished: queue.Queue = queue.Queue()

    def work(t):
        try:
            book.stage(t)
            finished.put((t.name, None))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            finished.put((t.name, e))

    pending, done, running = list(tasks), set(), set()
    error = None
    with _serialized_plots():
        try:
            while pending or running:
                if error is None:
                    for t in [t for t in pending if all(d in done for d in t.deps)][:jobs - len(running)]:
                        pending.remove(t)
                        running.add(t.name)
                        threading.Thread(target=work, args=(t,), name=f"stage {t.name}", daemon=True).start()
                else:
                    pending = []
                if not running:
                    if pending:
                        raise ValueError(f"tasks {[t.name for t in pending]} wait for each other")
                    break
                try:
                    name, e = finished.get(timeout=1.0)
                except queue.Empty:
                    continue
                running.discard(name)
                if e is None:
                    done.add(name)
                else:
                    error = error or e
        except BaseException:
            book.interrupted()
            if workdir_lib.stop_pending():  # SIGTERM: let running training stages save their step first.
                deadline = time.time() + 120.0
                while running and time.time() < deadline:
                    try:
                        running.discard(finished.get(timeout=1.0)[0])
                    except queue.Empty:
                        continue
            raise
    if error is not None:
        raise error


@contextlib.contextmanager
def _serialized_plots():
    """Draws ``fadjax.plots`` figures one at a time while stages run in threads."""
    from fadjax import plots
    lock = threading.Lock()
    names = [n for n in ("confusion", "grouped_bars", "per_seed", "curves", "image_grid", "learning_curves")
             if hasattr(plots, n)]
    originals = {n: getattr(plots, n) for n in names}

    def serial(f):
        @functools.wraps(f)
        def g(*a, **k):
            with lock:
                return f(*a, **k)
        return g

    for n, f in originals.items():
        setattr(plots, n, serial(f))
    try:
        yield
    finally:
        for n, f in originals.items():
            setattr(plots, n, f)


# ----------------------------------------------------------------------------- training

def _training_dict(config) -> dict:
    """The config as train writes it, without what never changes the trained weights."""
    d = json.loads(json.dumps(config.to_dict(), default=str))
    d.pop("sample", None)
    d.get("train", {}).pop("progress", None)
    d.get("train", {}).pop("allow_config_change", None)
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
    if old != new:  # A field added since at None (e.g. train.keep_evenly) is no change.
        a, b = _flat(old), _flat(new)
        diff = [f"{k}: {a.get(k)!r} (there) != {b.get(k)!r} (now)"
                for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if not diff:
            return
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


def train_task(name: str, config, workdir: pathlib.Path, deps: dict[str, str]) -> Task:
    """Training of the expert, the second judge or a diffusion model; ``deps``: name -> fingerprint."""
    from fadjax import train as train_lib
    expert = config.stage == "expert"
    check_workdir(workdir, config)
    if expert:
        what = f"training {config.expert.arch} at {config.data.image_size}px, {config.train.num_epochs} epochs"
    else:
        length = f"{config.train.num_steps} steps" if config.train.num_steps else f"{config.train.num_epochs} epochs"
        what = (f"training U-Net ({config.model.block_out_channels or 'tiny-sd'}), batch {config.train.batch_size}, "
                f"{length}, " + (f"aligned to the expert on {config.align.expert_input} input"
                                 if config.align.enabled else "no alignment"))

    def run():
        s = train_lib.run(config, workdir)
        out = {k: s.get(k) for k in ("final_step", "total_steps", "best_val_accuracy", "start_step", "setup_s") if k in s}
        last = s.get("last_metrics") or {}
        if not expert and "loss" in last:
            out.update(last_loss=last["loss"], img_per_s=last.get("img_per_s"))
        return out

    return Task(f"train/{name}", tuple(deps), fingerprint({"config": _training_dict(config), "deps": deps}),
                lambda: training_complete(workdir, expert=expert), run, what)


def same_split(a: pathlib.Path, b: pathlib.Path) -> None:
    sa, sb = (json.loads((w / "split.json").read_text()) for w in (a, b))
    if sa["train"]["indices"] != sb["train"]["indices"] or sa["val"]["indices"] != sb["val"]["indices"]:
        raise ReproduceError(f"{a} and {b} were trained on different splits; both judges must share one")


# ----------------------------------------------------------------------------- sampling and evaluation

def sampling_settings(sample_cfg) -> dict:
    """What the report samples with. ``karras_sigmas`` and ``guidance_interval`` appear only when set (not
    False/None), so the fingerprints of outputs made before they existed still hold."""
    from fadjax.config_lib import parse_guidance_interval, parse_seeds
    out = {"seeds": parse_seeds(sample_cfg.seeds), "num_per_class": int(sample_cfg.num_per_class),
           "sampler": sample_cfg.sampler, "steps": sample_cfg.get("steps"),
           "guidance_scale": float(sample_cfg.guidance_scale), "batch_size": int(sample_cfg.batch_size)}
    if sample_cfg.get("karras_sigmas"):
        out["karras_sigmas"] = True
    interval = parse_guidance_interval(sample_cfg.get("guidance_interval"))
    if interval is not None:
        out["guidance_interval"] = list(interval)
    return out


def sample_task(name: str, run_dir: pathlib.Path, out: pathlib.Path, settings: dict, model: Task) -> Task:
    from fadjax import sample as sample_lib

    def run():
        from fadjax import runs
        r = runs.load_diffusion_run(run_dir)
        m = sample_lib.generate(r, str(out), seeds=settings["seeds"], num_per_class=settings["num_per_class"],
                                sampler=settings["sampler"], steps=settings["steps"],
                                guidance_scale=settings["guidance_scale"], batch_size=settings["batch_size"],
                                karras_sigmas=settings.get("karras_sigmas", False),
                                guidance_interval=settings.get("guidance_interval") or "none",
                                progress=sys.stderr.isatty())
        return {"images": m["counts"]["images"], "steps": m["steps"], "sampler": m["sampler"]}

    what = (f"sampling {len(settings['seeds'])} seeds x {settings['num_per_class']} per class "
            f"({settings['sampler']}, {settings['steps'] or 'all'} steps)")
    return Task(f"sample/{name}", (model.name,), fingerprint({"model": model.fp, "settings": settings}),
                lambda: (out / sample_lib.MANIFEST).exists(), run, what)


def eval_task(name: str, judge_name: str, judge: Callable, gens: Task, judge_task: Task, gens_dir: pathlib.Path,
              out: pathlib.Path, batch_size: int) -> Task:
    def run():
        from fadjax import evaluate as evaluate_lib
        m = evaluate_lib.evaluate(str(gens_dir), judge(), str(out), batch_size=batch_size)
        return {"accuracy_mean": m["accuracy"]["mean"], "accuracy_std": m["accuracy"]["std"]}

    return Task(f"eval/{judge_name}/{name}", (gens.name, judge_task.name),
                fingerprint({"deps": [gens.fp, judge_task.fp], "batch_size": batch_size}),
                lambda: (out / "metrics.json").exists(), run, f"judging {name} with {judge_name}")


def utility_task(name: str, judge: Callable, gens: Task, judge_task: Task, gens_dir: pathlib.Path,
                 out: pathlib.Path, settings: dict, cache: dict) -> Task:
    """Usefulness of one model's images (``fadjax.evaluate.evaluate_utility``) with judge2's features and
    classifier recipe, and the memorisation check (nearest training tiles, ``memorisation.png``); ``cache``
    shares the real-data reference classifiers and features between models."""
    def run():
        from fadjax import evaluate as evaluate_lib
        spec = {"epochs": settings["epochs"]} if settings.get("epochs") else None
        u = evaluate_lib.evaluate_utility(str(gens_dir), judge(), str(out), judge_role="judge2",
                                          seeds=tuple(range(int(settings["seeds"]))),
                                          augment_fraction=float(settings["augment_fraction"]),
                                          spec_overrides=spec, cache=cache)
        memo = json.loads((out / "metrics.json").read_text()).get("memorisation") or {}
        return {"tstr_accuracy": u["tstr_accuracy"]["mean"], "trtr_accuracy": u["trtr_accuracy"]["mean"],
                "augment_gain": u["augment_gain"]["mean"], "fd_judge2": u["fd_judge2"]["value"],
                "near_copies_pixels": (memo.get("pixels") or {}).get("near_copies_generated")}

    return Task(f"utility/{name}", (gens.name, judge_task.name),
                fingerprint({"deps": [gens.fp, judge_task.fp], "settings": settings, "memorisation": 1}),
                lambda: (out / "metrics.json").exists() and (out / "memorisation.png").exists(), run,
                f"utility of {name}'s images (TSTR, augmentation, FD, memorisation)")


def curve_settings(configs: presets.Configs) -> dict:
    """The learning curves' sampling: the report's sampler, steps and guidance, ``configs.curves``'s images."""
    from fadjax.config_lib import parse_seeds
    s = sampling_settings(configs.sample)
    seeds = parse_seeds(configs.sample.seeds)[:int(configs.curves.get("seeds", 1))]
    return {**s, "seeds": seeds, "num_per_class": int(configs.curves["num_per_class"])}


def curve_task(name: str, run_dir: pathlib.Path, out: pathlib.Path, settings: dict, model: Task, judge: Callable,
               judge_task: Task, judge_batch_size: int) -> Task:
    """The learning curve of one run (``fadjax.curves``): sampled and judged by judge2 at its evenly kept
    checkpoints. Resumes from the checkpoints already sampled; other inputs start it afresh."""
    fp = fingerprint({"model": model.fp, "judge": judge_task.fp, "settings": settings,
                      "judge_batch_size": judge_batch_size})

    def run():
        import shutil
        from fadjax import curves
        stamp = out / "fingerprint.txt"  # Images of other weights or settings are not resumed.
        if out.exists() and (not stamp.exists() or stamp.read_text() != fp):
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fp)
        sampler = {k: v for k, v in settings.items() if k not in ("seeds", "num_per_class", "batch_size")}
        c = curves.learning_curve(run_dir, judge(), out, seeds=settings["seeds"],
                                  num_per_class=settings["num_per_class"], batch_size=settings["batch_size"],
                                  judge_batch_size=judge_batch_size, progress=sys.stderr.isatty(), **sampler)
        first, last = c["points"][0], c["points"][-1]
        return {"curve_points": len(c["points"]), "fd_first": first["fd_judge2"], "fd_last": last["fd_judge2"],
                "accuracy_first": first["accuracy_judge2"], "accuracy_last": last["accuracy_judge2"]}

    what = (f"learning curve: {len(settings['seeds'])} seed(s) x {settings['num_per_class']} per class at each "
            f"evenly kept checkpoint, judged by judge2")
    return Task(f"curve/{name}", (model.name, judge_task.name), fp,
                lambda: (out / "curve.json").exists(), run, what)


# ----------------------------------------------------------------------------- everything

def layout(out: pathlib.Path, models=tuple(presets.MODELS)) -> dict:
    """Where each stage writes, under OUT (every model's folder is its name: runs of one OUT are shared by
    invocations with different ``--models``)."""
    return {
        "runs": {n: out / "runs" / n for n in ("expert", "judge2", presets.PRETRAIN, *models)},
        "gens": {n: out / "gens" / n for n in models},
        # eval/<model> is judged by the expert (the paper's judge), eval2/<model> by the second judge.
        "eval": {"expert": {n: out / "eval" / n for n in models}, "judge2": {n: out / "eval2" / n for n in models}},
        "utility": {n: out / "utility" / n for n in models},
        "curves": {n: out / "curves" / n for n in (presets.PRETRAIN, *models)},
    }


def plan(configs: presets.Configs, out: pathlib.Path) -> tuple[list[Task], dict]:
    """Every stage as a task, in the order they are started; and the layout of OUT."""
    from fadjax.reproduce import summary as summary_lib
    paths = layout(out, tuple(configs.models))
    tasks: dict[str, Task] = {}
    start = {}  # The shared pre-training every model starts from, when the preset has one: it starts first,
    if configs.pretrain is not None:  # the longest stage, so that the judges train beside it (jobs > 1).
        name = presets.PRETRAIN
        tasks[name] = train_task(name, configs.pretrain, paths["runs"][name], {})
        start = {tasks[name].name: tasks[name].fp}
    for j, c in (("expert", configs.expert), ("judge2", configs.judge2)):
        tasks[j] = train_task(j, c, paths["runs"][j], {})
    for name, c in configs.models.items():
        deps = {**start, **({"train/expert": tasks["expert"].fp} if c.align.enabled else {})}
        tasks[name] = train_task(name, c, paths["runs"][name], deps)
    settings = sampling_settings(configs.sample)
    gens = {n: sample_task(n, paths["runs"][n], paths["gens"][n], settings, tasks[n]) for n in configs.models}

    loaded: dict[str, Any] = {}
    load_lock = threading.Lock()

    def judge(j):
        def get():
            from fadjax import runs
            with load_lock:
                if j not in loaded:
                    loaded[j] = runs.load_expert_run(paths["runs"][j])
                return loaded[j]
        return get

    evals = [eval_task(n, j, judge(j), gens[n], tasks[j], paths["gens"][n], paths["eval"][j][n],
                       int(jc.train.eval_batch_size))
             for j, jc in (("expert", configs.expert), ("judge2", configs.judge2)) for n in configs.models]

    utils = []
    if configs.utility is not None:
        cache: dict = {}
        utils = [utility_task(n, judge("judge2"), gens[n], tasks["judge2"], paths["gens"][n], paths["utility"][n],
                              configs.utility, cache) for n in configs.models]

    def report():
        same_split(paths["runs"]["expert"], paths["runs"]["judge2"])
        summary_lib.write(configs, out, paths)

    curves = []
    if configs.curves is not None:  # The pre-training's, then each model's.
        cs = curve_settings(configs)
        named = [presets.PRETRAIN] * (configs.pretrain is not None) + list(configs.models)
        curves = [curve_task(n, paths["runs"][n], paths["curves"][n], cs, tasks[n], judge("judge2"),
                             tasks["judge2"], int(configs.judge2.train.eval_batch_size)) for n in named]

    report_task = Task("report", tuple(e.name for e in evals + utils + curves),
                       fingerprint({"evals": [e.fp for e in evals], "utility": [u.fp for u in utils],
                                    **({"curves": [c.fp for c in curves]} if curves else {}),
                                    "deviations": presets.deviations(configs)}),
                       lambda: all((out / f).exists() for f in summary_lib.OUTPUTS), report, "writing the report")
    return [*tasks.values(), *gens.values(), *evals, *utils, *curves, report_task], paths


def run_all(configs: presets.Configs, out: pathlib.Path, *, command: str, jobs: int = 1, echo: bool = True,
            log_file: pathlib.Path | None = None) -> dict:
    """Runs (or skips) every stage and writes the report; returns the summary.

    Args:
      configs: the resolved configs (``presets.build``).
      out: the output folder.
      command: the command line, recorded in ``stages.json`` and the report.
      jobs: stages run at once (threads); 1 = one after the other.
      echo: print progress lines and the result table on stdout.
      log_file: where the detailed log goes (named in the first line).
    """
    with workdir_lib.WorkdirLock(out, what="reproduce run"):  # One reproduce per output folder.
        return _run_all(configs, out, command=command, jobs=jobs, echo=echo, log_file=log_file)


def _run_all(configs, out: pathlib.Path, *, command: str, jobs: int, echo: bool, log_file) -> dict:
    from fadjax.reproduce import summary as summary_lib
    out.mkdir(parents=True, exist_ok=True)
    tasks, _ = plan(configs, out)
    book = Book(out, command, echo=echo)
    book.data["preset"] = configs.preset
    book.data["jobs"] = jobs
    book.say(f"preset {configs.preset}, data {configs.expert.data.source}, out {out}, {jobs} stage(s) at a time"
             + (f"; log: {log_file}" if log_file else ""))
    execute(tasks, book, jobs=jobs)
    summary = json.loads((out / "summary.json").read_text())
    if echo:
        print("\n".join(summary_lib.terminal_table(summary)), flush=True)
    book.say(f"all stages complete in {book.elapsed_s():.1f}s; report: {out / 'report.md'}")
    return summary
