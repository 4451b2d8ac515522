"""Command line of ``python -m fadjax.reproduce`` (see the package docstring)."""
from __future__ import annotations

import argparse
import pathlib
import shlex
import signal
import sys
from typing import Sequence

from absl import logging


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from fadjax.reproduce import presets
    p = argparse.ArgumentParser(prog="python -m fadjax.reproduce",
                                description="The paper's comparison end to end (resumable).")
    p.add_argument("--preset", choices=sorted(presets.PRESETS), default="tiny",
                   help="paper: the paper's settings; fast: one H200 in ~6.5 min; tiny: demo data, a CPU")
    p.add_argument("--data", default=None,
                   help="folder:PATH, tfds:NAME or demo[:N] (tiny's default: demo:24; paper and fast need it, "
                        "e.g. tfds:colorectal_histology to download the paper's dataset)")
    p.add_argument("--out", default=None, help="output folder (default: reports/<preset>)")
    p.add_argument("--seeds", default=None, help="sampling seeds of every model, e.g. 0-1 (default: the preset's)")
    p.add_argument("--cache_dir", default=None,
                   help="folder of the decoded-data caches data_<size>px_<channels>ch.npz (default: OUT/cache)")
    p.add_argument("--xla_cache", default=None,
                   help="persistent XLA compilation cache (default: OUT/xla_cache unless one is configured; "
                        "'none' disables)")
    p.add_argument("--jobs", type=int, default=None,
                   help="stages run at once, in threads (default: the preset's; fast: 3)")
    p.add_argument("--set", action="append", default=[], metavar="GROUP.FIELD=VALUE",
                   help="override a config field: GROUP is expert, judge2, diffusion (every model), "
                        "pretrain or a model's name; e.g. --set diffusion.train.num_steps=200 (repeatable)")
    p.add_argument("--models", default=None,
                   help="comma-separated models to train beside the baseline, from: "
                        + ", ".join(presets.MODELS) + " (default: the paper's " + ",".join(presets.DEFAULT_MODELS)
                        + "); completed stages of OUT (judges, baseline, ...) are reused")
    p.add_argument("--list_presets", action="store_true", help="print every preset's values and exit")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Runs the pipeline; a bad flag, preset field or data source prints one line and exits 2."""
    from fadjax import config_lib
    from fadjax.data import DataError
    from fadjax.reproduce import presets
    try:
        return _main(argv)
    except (presets.PresetError, config_lib.ConfigError, DataError) as e:
        print(f"python -m fadjax.reproduce: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def check_data(configs) -> None:
    """The data source of every stage exists and has classes, before any stage starts (DataError if not)."""
    from fadjax.data import DataError, sources
    for c in (configs.expert, *configs.models.values()):
        classes = [n.strip() for n in c.data.classes.split(",")] if c.data.get("classes") else None
        if sources.class_names(c.data.source, classes=classes) is None:
            raise DataError(f"--data {c.data.source!r}: no such folder")


def _main(argv: Sequence[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from fadjax.reproduce import pipeline, presets
    if args.list_presets:
        for name in presets.PRESETS:
            print(presets.describe(name))
        return None
    out = pathlib.Path(args.out or f"reports/{args.preset}")
    log_file = _log_to_file(out)
    import jax
    current = jax.config.jax_compilation_cache_dir
    # Persistent compilation cache: a resumed run, and models of one architecture, compile once. An
    # explicit --xla_cache wins; else a cache the user configured; else OUT/xla_cache.
    cache = None if args.xla_cache == "none" else args.xla_cache or current or str(out / "xla_cache")
    if cache is not None and cache != current:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    configs = presets.build(args.preset, data=args.data, seeds=args.seeds,
                            expert_workdir=str(out / "runs" / "expert"),
                            pretrain_workdir=str(out / "runs" / presets.PRETRAIN),
                            cache_dir=args.cache_dir or str(out / "cache"),
                            overrides=presets.parse_overrides(args.set), models=presets.parse_models(args.models))
    check_data(configs)
    command = "python -m fadjax.reproduce " + shlex.join(argv)
    jobs = args.jobs or presets.PRESETS[args.preset]["jobs"]
    # A `timeout` or scheduler kill still records the interrupted stage's time in stages.json.
    signal.signal(signal.SIGTERM, _interrupt)
    from fadjax.workdir import WorkdirError
    try:
        return pipeline.run_all(configs, out, command=command, jobs=jobs, log_file=log_file)
    except WorkdirError as e:  # A busy folder, config drift, SIGTERM's save, a full disk: one line.
        sys.exit(f"fadjax.reproduce: {e}")


def _log_to_file(out: pathlib.Path) -> pathlib.Path:
    """Sends every log record (fadjax's, absl's, orbax's, JAX's) to ``OUT/reproduce.log``, none to the terminal.

    The terminal keeps what the pipeline prints itself: a line per stage, progress bars, the result.
    """
    import logging as std_logging
    out.mkdir(parents=True, exist_ok=True)
    path = out / "reproduce.log"
    handler = std_logging.FileHandler(path)
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"))
    root = std_logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(std_logging.INFO)
    std_logging.captureWarnings(True)  # Python warnings (deprecations of libraries) too.
    logging.set_verbosity(logging.INFO)
    absl_handler = logging.get_absl_handler()
    if absl_handler in root.handlers:
        root.removeHandler(absl_handler)
    return path


def _interrupt(signum, frame):
    from fadjax import workdir
    workdir.request_stop(signum)  # Training stages in worker threads save their current step and stop.
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    main()
