"""Trains one stage of fadjax: the expert classifier or a (feature-aligned) diffusion model.

  python train.py --config configs/expert.py --workdir runs/expert
  python train.py --config configs/feature_aligned.py --workdir runs/fad \
      --config.align.expert_workdir=runs/expert
  python train.py --config configs/feature_aligned.py:tiny --workdir /tmp/t   # CPU-sized demo

Running the same command again on the same workdir resumes from its latest checkpoint.
Several hosts: the same command on each, with --coordinator=host0:1234 --num_processes=N
--process_id=I (or --distributed on Cloud TPU, where JAX discovers them).
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder: checkpoints, logs, metrics.jsonl.")
flags.DEFINE_string("coordinator", None, "host:port of process 0 for multi-process training.")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process training).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process training).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detection (Cloud TPU, SLURM).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from fadjax import distributed
    distributed.initialize(coordinator=FLAGS.coordinator, num_processes=FLAGS.num_processes,
                           process_id=FLAGS.process_id, auto=FLAGS.distributed)
    from fadjax import cli, train
    try:
        summary = train.run(FLAGS.config, FLAGS.workdir)
    except cli.user_errors() as e:
        # A user's bad value, a busy workdir, config drift, SIGTERM's save, a full disk: one line naming
        # what happened, exit status 1, no traceback.
        sys.exit(f"train.py: {e}")
    logging.info("done: %s", summary)


if __name__ == "__main__":
    app.run(main)
