"""Learning curves: how a diffusion model's samples improve along its training.

At the evenly kept checkpoints of a run (``train.keep_evenly``, e.g. 4: at 1/4, 1/2, 3/4 and the
end of its steps; :func:`fadjax.checkpoints.even_steps`) a few images per class are sampled with
the run's sampling settings (:func:`fadjax.sample.generate`, the same noise per image at every
checkpoint) and measured by a judge (an expert run, judge2 in ``fadjax.reproduce``):

* ``fd_judge2``: the Fréchet distance between the judge's pooled features of the generated images
  and of the real validation images of the generated classes (:mod:`fadjax.utility`; not
  Inception-FID, and biased upward at few images: compare points measured with the same number);
* ``accuracy_judge2``: the share of generated images the judge classifies as their class (as
  :mod:`fadjax.evaluate` judges them).

The x axis is training images seen, steps x batch size, continuing from the images the run's
starting weights had seen (``init_from``, e.g. a shared pre-training: :func:`images_before`).
Every checkpoint is sampled by one compiled program: the parameters are an argument of the
sampler and the batch has the same shape each time. ``OUT/step_<N>/`` keeps each checkpoint's
images (a rerun skips those already complete) and ``OUT/curve.json`` the curve.
"""
from __future__ import annotations

import os
import pathlib
import time
from typing import Sequence

import numpy as np
from absl import logging

from fadjax import checkpoints
from fadjax import metrics
from fadjax import workdir as workdir_lib

CURVE_FILE = "curve.json"


def images_before(config) -> int:
    """Training images the starting weights of a run had seen: those of its ``init_from`` run up to that
    run's latest checkpoint (and, recursively, of the run that one started from); 0 from scratch.

    Args:
      config: the run's (resolved) diffusion config.

    Raises:
      FileNotFoundError: the ``init_from`` run has no config or no checkpoint.
    """
    source = config.get("init_from")
    if not source:
        return 0
    source_config = workdir_lib.read_config(source)
    steps = checkpoints.saved_steps(pathlib.Path(source) / "checkpoints")
    if not steps:
        raise FileNotFoundError(f"{source} (init_from) has no checkpoint: its images seen are unknown")
    return images_before(source_config) + steps[-1] * int(source_config.train.batch_size)


def images_seen(config, steps: Sequence[int]) -> list[int]:
    """Training images seen by a run at each of ``steps``: ``images_before + step * batch size``."""
    offset = images_before(config)
    return [offset + int(s) * int(config.train.batch_size) for s in steps]


def curve_steps(workdir) -> list[int]:
    """The evenly kept steps of a run (``train.keep_evenly`` of its config, ``total_steps`` of ``run.json``).

    Raises:
      ValueError: the run kept no evenly spaced checkpoints (``train.keep_evenly`` is None).
    """
    config = workdir_lib.read_config(workdir)
    points = config.train.get("keep_evenly")
    if not points:
        raise ValueError(f"{workdir} was trained without train.keep_evenly: it keeps no evenly spaced "
                         f"checkpoints to draw a learning curve from; train it with --config.train.keep_evenly=4")
    total = int(workdir_lib.read_json(pathlib.Path(workdir) / workdir_lib.RUN_FILE)["total_steps"])
    return checkpoints.even_steps(total, int(points))


def _classifier(judge, batch_size: int):
    """The judge's predictions for uint8 images, as ``fadjax.evaluate.classify`` but compiled once for every
    checkpoint of a curve."""
    import jax
    from fadjax.data import images as data_images
    from fadjax.data import pipeline
    fn = jax.jit(judge.classify_fn)

    def classify(images: np.ndarray) -> np.ndarray:
        x = data_images.match_channels(np.asarray(images), judge.channels)
        return pipeline.batched(lambda b: np.argmax(fn(b.astype(np.float32) / 255.0), axis=-1), x, batch_size)

    return classify


def learning_curve(workdir, judge, out, *, seeds: Sequence[int], num_per_class: int, sampler: str | None = None,
                   steps: int | None = None, guidance_scale: float | None = None, batch_size: int | None = None,
                   judge_batch_size: int = 64, progress: bool = False, **sampler_options) -> dict:
    """Samples and measures a run at each of its evenly kept checkpoints; writes ``out/curve.json``.

    Args:
      workdir: the diffusion run's folder (trained with ``train.keep_evenly``).
      judge: the loaded judge (``fadjax.runs.load_expert_run``): its pooled features and its predictions.
      out: output folder (``step_<N>/`` images per checkpoint, ``curve.json``).
      seeds: sampling seeds.
      num_per_class: images per class and seed at each checkpoint.
      sampler, steps, guidance_scale: as :func:`fadjax.sample.generate` (None = the run's config).
      batch_size: images per compiled sampling call; None = all of one checkpoint's images in one call.
        Every call has this shape, so all checkpoints share one compiled sampler.
      judge_batch_size: the judge's batch size.
      progress: a progress bar over sampling batches.
      **sampler_options: further arguments of :func:`fadjax.sample.generate` (e.g. ``karras_sigmas``).

    Returns:
      ``{"workdir", "points": [{"step", "fraction", "images_seen", "fd_judge2", "accuracy_judge2",
      "used_ema", "sampling_s"}], "images_before", "batch_size", "total_steps", "num_images", "num_real_val",
      "used_ema", "sampler", "steps", "guidance_scale", "seeds", "num_per_class", "judge"}`` (the first point's
      ``sampling_s`` includes compiling the sampler).

    Raises:
      FileNotFoundError: a kept checkpoint is missing (e.g. deleted by hand).
      ValueError: the run kept no evenly spaced checkpoints, or the judge lacks a generated class.
    """
    from fadjax import evaluate, runs, sample, utility
    workdir, out = pathlib.Path(workdir), pathlib.Path(out)
    kept = curve_steps(workdir)
    config = workdir_lib.read_config(workdir)
    total = int(workdir_lib.read_json(workdir / workdir_lib.RUN_FILE)["total_steps"])
    offset = images_before(config)
    seen = [offset + s * int(config.train.batch_size) for s in kept]
    out.mkdir(parents=True, exist_ok=True)

    run = None
    real_feats = None
    points = []
    for step, x in zip(kept, seen):
        loaded = runs.load_diffusion_run(workdir, step=step)
        if run is None:
            run = loaded
            classes = sample.default_classes(run)
            unknown = [c for c in classes if c not in judge.class_names]
            if unknown:
                raise ValueError(f"the judge ({judge.workdir}) does not know the classes {unknown} of {workdir}")
            n_images = len(seeds) * len(classes) * int(num_per_class)
            batch_size = min(int(batch_size or n_images), n_images)
            val_x, val_y = judge.load_val_data()
            keep = np.isin(np.asarray(val_y), [judge.class_names.index(c) for c in classes])
            real_feats = utility.pooled_features(judge, np.asarray(val_x)[keep])
            classify = _classifier(judge, judge_batch_size)
        else:  # The first run's eps_fn (and its compiled sampler) with this checkpoint's parameters.
            run.params, run.step, run.used_ema = loaded.params, loaded.step, loaded.used_ema
        t = time.perf_counter()
        folder = out / f"step_{step}"
        manifest = sample.generate(run, str(folder), seeds=seeds, num_per_class=int(num_per_class), sampler=sampler,
                                   steps=steps, guidance_scale=guidance_scale, batch_size=batch_size,
                                   progress=progress, **sampler_options)
        sampling_s = time.perf_counter() - t
        images, labels, _ = evaluate.generated_arrays(str(folder), judge.class_names)
        accuracy = metrics.accuracy(labels, classify(images))
        fd = utility.frechet_distance(real_feats, utility.pooled_features(judge, images))
        points.append({"step": int(step), "fraction": step / total, "images_seen": int(x), "fd_judge2": fd,
                       "accuracy_judge2": accuracy, "used_ema": bool(run.used_ema), "sampling_s": sampling_s})
        logging.info("learning curve of %s: step %d/%d (%d images seen), FD %.4g, accuracy %.3f, sampled in %.1fs",
                     workdir, step, total, x, fd, accuracy, sampling_s)
    result = metrics.json_safe({
        "workdir": os.path.abspath(str(workdir)), "points": points, "images_before": offset,
        "batch_size": int(config.train.batch_size), "total_steps": total, "num_images": n_images,
        "num_real_val": int(len(real_feats)), "used_ema": all(p["used_ema"] for p in points),
        "sampler": manifest["sampler"], "steps": manifest["steps"], "guidance_scale": manifest["guidance_scale"],
        "seeds": [int(s) for s in seeds], "num_per_class": int(num_per_class),
        "judge": {"workdir": os.path.abspath(str(judge.workdir)), "image_size": int(judge.image_size)},
    })
    workdir_lib.write_json(out / CURVE_FILE, result)
    return result
