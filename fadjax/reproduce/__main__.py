"""Command line of ``python -m fadjax.reproduce`` (see the package docstring)."""
from __future__ import annotations

import pathlib
import shlex
import signal
import sys
from typing import Sequence

from absl import flags, logging

from fadjax import cli
from fadjax.reproduce import presets


FLAGS = cli.Flags("python -m fadjax.reproduce", epilog=(
    "Config fields: --GROUP.FIELD=VALUE, GROUP one of expert, judge2, diffusion (every model), pretrain or a "
    "model's name, e.g. --diffusion.train.num_steps=200 (as train.py's --config.FIELD=VALUE)."))
flags.DEFINE_enum("preset", "tiny", sorted(presets.PRESETS), "paper: the paper's settings; fast: one H200 in "
                  "~6.5 min; cpu: the real tiles on 2 CPU cores; tiny: demo data on a CPU in minutes.",
                  flag_values=FLAGS)
flags.DEFINE_string("data", None, "folder:PATH, tfds:NAME or demo[:N] (tiny's default: demo:200; paper, fast and "
                    "cpu need it, e.g. tfds:colorectal_histology to download the paper's dataset).", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output folder (default: reports/<preset>).", flag_values=FLAGS)
flags.DEFINE_string("seeds", None, "Sampling seeds of every model, e.g. 0-1 (default: the preset's).",
                    flag_values=FLAGS)
flags.DEFINE_string("cache_dir", None, "Folder of the decoded-data caches data_<size>px_<channels>ch.npz "
                    "(default: OUT/cache).", flag_values=FLAGS)
flags.DEFINE_string("xla_cache", None, "Persistent XLA compilation cache (default: OUT/xla_cache unless one is "
                    "configured; 'none' disables).", flag_values=FLAGS)
flags.DEFINE_integer("jobs", None, "Stages run at once, in threads (default: the preset's).", flag_values=FLAGS)
flags.DEFINE_string("models", None, "Comma-separated models to train beside the baseline, from: "
                    + ", ".join(presets.MODELS) + " (default: the paper's " + ",".join(presets.DEFAULT_MODELS)
                    + "); completed stages of OUT (judges, baseline, ...) are reused.", flag_values=FLAGS)
flags.DEFINE_bool("list_presets", False, "Print every preset's values and exit.", flag_values=FLAGS)
# Config fields: --GROUP.FIELD=VALUE (GROUP: expert, judge2, diffusion = every model, pretrain, or a model's
# name), e.g. --diffusion.train.num_steps=200, as train.py's --config.FIELD=VALUE (presets.parse_overrides).


def check_data(configs) -> None:
    """The data source of every stage exists and has classes, before any stage starts (DataError if not)."""
    from fadjax.data import DataError, sources
    for c in (configs.expert, *configs.models.values()):
        classes = [n.strip() for n in c.data.classes.split(",")] if c.data.get("classes") else None
        if sources.class_names(c.data.source, classes=classes) is None:
            raise DataError(f"--data {c.data.source!r}: no such folder")


def check_models(configs) -> None:
    """Every U-Net can be built at its image size and has its aligned feature, before any stage starts
    (ConfigError naming the model and the field if not): shapes only, no compile."""
    from fadjax import config_lib
    from fadjax.train import diffusion_stage
    named = {**({presets.PRETRAIN: configs.pretrain} if configs.pretrain is not None else {}), **configs.models}
    for name, c in named.items():
        if c.model.pretrained:  # Its architecture is in the weights' folder; the stage checks it.
            continue
        try:
            diffusion_stage.check_model(c)
        except config_lib.ConfigError as e:
            raise config_lib.ConfigError(f"model {name}: {e}") from None


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Runs the pipeline (``argv`` without the program name; None = ``sys.argv[1:]``); returns the summary.

    Raises:
      SystemExit(2): a bad flag or config override, or a data source that does not exist, named in
        one line before any stage starts.
      fadjax.workdir.WorkdirError: a busy, changed or interrupted OUT (``cli.run`` prints it in one line).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        flag_args, overrides = presets.parse_overrides(argv)
    except presets.PresetError as e:
        raise cli.usage_error(FLAGS.prog, str(e)) from None
    args = FLAGS.parse(flag_args)
    from fadjax.reproduce import pipeline
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
    from fadjax import config_lib
    from fadjax.data import DataError
    if not args.data and presets.PRESETS[args.preset]["needs_data"]:
        raise cli.usage_error(FLAGS.prog, f"--preset {args.preset} needs --data: folder:PATH (one folder per class, "
                                          f"e.g. the Kather 2016 tiles) or tfds:colorectal_histology (downloads it)")
    try:
        configs = presets.build(args.preset, data=args.data, seeds=args.seeds,
                                expert_workdir=str(out / "runs" / "expert"),
                                pretrain_workdir=str(out / "runs" / presets.PRETRAIN),
                                cache_dir=args.cache_dir or str(out / "cache"),
                                overrides=overrides, models=presets.parse_models(args.models))
        check_data(configs)
        check_models(configs)
    except (config_lib.ConfigError, DataError) as e:
        raise cli.usage_error(FLAGS.prog, str(e)) from None
    command = "python -m fadjax.reproduce " + shlex.join(argv)
    jobs = args.jobs or presets.PRESETS[args.preset]["jobs"]
    # A `timeout` or scheduler kill still records the interrupted stage's time in stages.json.
    signal.signal(signal.SIGTERM, _interrupt)
    return pipeline.run_all(configs, out, command=command, jobs=jobs, log_file=log_file)


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
    cli.run(main, FLAGS.prog)
