"""Generates class-conditional images from a trained diffusion run (paper §V-C).

    python -m fadjax.sample --workdir runs/fad --out gens/fad --num_per_class 10 --seeds 0-14

Writes ``OUT/seed_<s>/<class>/<i>.png`` (uint8, 1 or 3 channels) and ``OUT/manifest.json``.
Image ``i`` of class ``c`` under seed ``s`` always starts from the same noise,
``fold_in(key(s), class_index(c) * IMAGE_ID_STRIDE + i)`` (``class_index`` in the run's class
list), whatever the batch size, the other classes sampled or ``--num_per_class``; two runs with
the same class list and seeds therefore get the same noise (the paper's fixed seeds).

PNGs are written first, then ``seed_<s>/done.json`` once a seed is complete, and the manifest
last (tmp + rename; an old manifest is removed before any image is written), so an interrupted
run never leaves a manifest that lists missing files. A re-run skips seeds whose ``done.json``
records the same settings. The reference code's brightness rejection filter is not offered.

Faults: one sampling run per OUT (``OUT/.lock``, see :mod:`fadjax.workdir`). ``OUT/sampling.json``
records the settings; continuing a partial output (no manifest) with other settings stops naming
each changed setting (a setting an older fadjax did not record counts as None, its default). A
resumed run keeps the readable images it already wrote and samples again
any image that is missing or cannot be decoded (e.g. a PNG truncated by a full disk).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import numpy as np
from absl import flags, logging
from PIL import Image
from tqdm import tqdm

from fadjax import cli
from fadjax import diffusion as diffusion_lib
from fadjax import sampling
from fadjax.data import pipeline
from fadjax import workdir as workdir_lib
from fadjax.config_lib import parse_guidance_interval, parse_names, parse_seeds

IMAGE_ID_STRIDE = 100_000  # Image ids of class k are k * stride + i (i < stride).
MANIFEST = "manifest.json"
DONE = "done.json"
SETTINGS = "sampling.json"


class SamplingDrift(workdir_lib.WorkdirError):
    """A partial output folder was started with other sampling settings."""


def _readable(path: str) -> bool:
    """Whether ``path`` is a PNG that decodes completely."""
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def _same_settings(old: dict, new: dict) -> bool:
    """Whether two settings records agree; a key one of them lacks counts as None (settings added later
    record None at their default, so older outputs still match)."""
    return all(old.get(k) == new.get(k) for k in set(old) | set(new))


def _check_partial_output(out: str, settings: dict) -> bool:
    """Refuses to continue a partial ``out`` made with other settings; returns whether its images can be kept.

    Raises:
      SamplingDrift: ``out`` has no manifest (an interrupted run) and its ``sampling.json`` differs.
    """
    path = os.path.join(out, SETTINGS)
    if not os.path.exists(path):  # A new folder, or one of an older fadjax: trust done.json only.
        return not any(n.startswith("seed_") for n in os.listdir(out))
    try:
        with open(path) as f:
            previous = json.load(f)
    except ValueError:
        return False
    old = previous.get("settings", {})
    if _same_settings(old, settings):
        return bool(previous.get("keep_partial", False))
    if not os.path.exists(os.path.join(out, MANIFEST)):
        changed = "; ".join(f"{k} {old.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(old) | set(settings))
                            if old.get(k) != settings.get(k))
        raise SamplingDrift(f"{out} holds a partial sampling run with other settings: {changed}. Rerun with "
                            f"the same settings to finish it, or use another --out")
    return False  # A complete output replaced by one with other settings: its images are stale.


def _write_png(path: str, image: np.ndarray) -> None:
    """Writes a uint8 ``[H, W, C]`` image (C = 1 or 3) atomically."""
    tmp = path + ".tmp.png"
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp)
    os.replace(tmp, path)


def default_classes(run) -> list[str]:
    """The run's classes minus ``config.sample.exclude_classes``."""
    excluded = set(parse_names(run.config.sample.get("exclude_classes")) or [])
    return [c for c in run.class_names if c not in excluded]


def generate(run, out: str, *, seeds: Sequence[int], num_per_class: int, classes: Sequence[str] | None = None,
             sampler: str | None = None, steps: int | None = None, eta: float = 0.0,
             guidance_scale: float | None = None, batch_size: int | None = None,
             karras_sigmas: bool | None = None, guidance_interval=None, progress: bool = True) -> dict:
    """Samples ``num_per_class`` images per class and seed and writes them under ``out``.

    Args:
      run: a loaded diffusion run (``fadjax.runs.load_diffusion_run``).
      out: output folder.
      seeds: sampling seeds.
      num_per_class: images per class and seed.
      classes: class names to sample; ``None`` = all but ``config.sample.exclude_classes``.
      sampler: one of ``fadjax.sampling.SAMPLERS``; ``None`` = ``config.sample.sampler``.
      steps: sampling steps; ``None`` = ``config.sample.steps`` when ``sampler`` is the config's sampler,
        else (or when that is ``None`` too) the sampler's default: all training steps (DDPM), 50 (DDIM),
        25 (``dpmpp_2m``, ``euler``, ``heun``).
      eta: DDIM stochasticity.
      guidance_scale: classifier-free guidance; ``None`` = ``config.sample.guidance_scale``.
      batch_size: images per compiled call; ``None`` = ``config.sample.batch_size``.
      karras_sigmas: ``dpmpp_2m`` on Karras sigmas; ``None`` = ``config.sample.karras_sigmas`` (False
        when the run's config predates it).
      guidance_interval: guide only where ``lo < sigma <= hi``: ``(lo, hi)`` or ``"lo,hi"``, ``"none"`` =
        every step; ``None`` = ``config.sample.guidance_interval``.
      progress: show a progress bar over batches.

    Returns:
      The manifest (also written to ``out/manifest.json``).
    """
    cfg = run.config.sample
    if steps is None and sampler in (None, cfg.sampler):
        steps = cfg.get("steps")  # The config's steps go with the config's sampler only.
    sampler = sampler or cfg.sampler
    guidance_scale = float(cfg.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale)
    karras_sigmas = bool(cfg.get("karras_sigmas", False) if karras_sigmas is None else karras_sigmas)
    try:
        interval = parse_guidance_interval(cfg.get("guidance_interval") if guidance_interval is None
                                           else guidance_interval)
    except ValueError as e:
        raise ValueError(f"guidance_interval {e}") from None
    batch_size = int(batch_size or cfg.batch_size)
    classes = list(classes) if classes else default_classes(run)
    seeds = [int(s) for s in seeds]
    unknown = [c for c in classes if c not in run.class_names]
    if unknown:
        raise ValueError(f"classes {unknown} are not classes of the run {run.workdir} ({run.class_names})")
    if not 1 <= num_per_class <= IMAGE_ID_STRIDE:
        raise ValueError(f"num_per_class must be in [1, {IMAGE_ID_STRIDE}], got {num_per_class}")
    num_steps = sampling.resolve_steps(run.schedule.num_steps, sampler, steps)
    settings = {
        "workdir": os.path.abspath(str(run.workdir)), "step": int(run.step), "used_ema": bool(run.used_ema),
        "sampler": sampler, "steps": num_steps, "eta": float(eta) if sampler == "ddim" else None,
        "guidance_scale": guidance_scale, "null_label": run.null_label, "classes": classes,
        "num_per_class": int(num_per_class), "image_size": int(run.image_size), "channels": int(run.channels),
        # None where they change nothing (and in records of older versions: see _same_settings).
        "karras_sigmas": karras_sigmas if sampler == "dpmpp_2m" else None,
        "guidance_interval": list(interval) if interval is not None and guidance_scale != 1.0 else None,
    }
    os.makedirs(out, exist_ok=True)
    with workdir_lib.WorkdirLock(out, what="sampling run"):
        return _generate(run, out, settings, seeds=seeds, classes=classes, num_per_class=num_per_class,
                         sampler=sampler, steps=steps, eta=eta, guidance_scale=guidance_scale,
                         batch_size=batch_size, progress=progress)


def _generate(run, out, settings, *, seeds, classes, num_per_class, sampler, steps, eta, guidance_scale,
              batch_size, progress) -> dict:
    keep_partial = _check_partial_output(out, settings)
    if jax.process_index() == 0:
        if os.path.exists(os.path.join(out, MANIFEST)):
            os.remove(os.path.join(out, MANIFEST))
        workdir_lib.write_json(os.path.join(out, SETTINGS), {"settings": settings, "keep_partial": keep_partial})

    def rel(seed, name, i):
        return os.path.join(f"seed_{seed}", name, f"{i}.png")

    def seed_done(seed):
        path = os.path.join(out, f"seed_{seed}", DONE)
        try:
            with open(path) as f:
                return _same_settings(json.load(f), settings)
        except (OSError, ValueError):
            return False

    def todo(seed):
        """The images of ``seed`` to sample: all, or (a complete seed, or a partial one of these
        settings) those missing or damaged."""
        every = [(c, i) for c in classes for i in range(num_per_class)]
        if not (seed_done(seed) or keep_partial):
            return every
        out_ = []
        for c, i in every:
            path = os.path.join(out, rel(seed, c, i))
            if not os.path.exists(path):
                out_.append((c, i))
            elif not _readable(path):
                logging.warning("damaged image %s (cannot be decoded): sampling it again", path)
                out_.append((c, i))
        return out_

    todo_by_seed = {s: todo(s) for s in seeds}
    todo_seeds = [s for s in seeds if todo_by_seed[s]]
    if len(todo_seeds) < len(seeds):
        logging.info("skipping %d complete seeds", len(seeds) - len(todo_seeds))
    draws = [(s, c, i) for s in todo_seeds for c, i in todo_by_seed[s]]
    remaining = {s: len(todo_by_seed[s]) for s in todo_seeds}
    for s in todo_seeds:
        for c in classes:
            os.makedirs(os.path.join(out, f"seed_{s}", c), exist_ok=True)
    shape = (run.image_size, run.image_size, run.channels)
    prediction = getattr(run, "prediction", "epsilon")  # Stand-in runs without the attribute predict noise.
    logging.info("sampling %d images (%s, %d steps, guidance %.2f, interval %s, %s model) in batches of %d",
                 len(draws), sampler, settings["steps"], guidance_scale, settings["guidance_interval"],
                 prediction, batch_size)
    eps_fn = run.eps_fn  # Fetched once: compilations are cached per function object.
    # Several processes (jax.distributed) share the batches round-robin; every image depends only
    # on its (seed, class, index), so the split never changes a picture.
    pid, nproc = jax.process_index(), jax.process_count()
    batches = list(pipeline.fixed_batches(draws, batch_size))[pid::nproc]
    for padded, n in tqdm(batches, disable=not progress or pid != 0, desc="batches", unit="batch"):
        chunk = padded[:n]
        x = sampling.sample(
            eps_fn, run.params, run.schedule, [run.condition_labels[c] for _, c, _ in padded],
            shape=shape, seed=[s for s, _, _ in padded],
            image_ids=[run.class_names.index(c) * IMAGE_ID_STRIDE + i for _, c, i in padded],
            sampler=sampler, steps=steps, eta=eta, guidance_scale=guidance_scale, null_label=run.null_label,
            prediction=prediction, karras_sigmas=bool(settings["karras_sigmas"]),
            guidance_interval=settings["guidance_interval"])
        images = sampling.to_uint8(diffusion_lib.from_model_range(x, run.data_range))  # [0, 1] -> uint8
        for (s, c, i), img in zip(chunk, images):
            _write_png(os.path.join(out, rel(s, c, i)), img)
            remaining[s] -= 1
            if remaining[s] == 0 and nproc == 1:
                workdir_lib.write_json(os.path.join(out, f"seed_{s}", DONE), settings)
    if nproc > 1:  # Gather: wait for every process's images, then process 0 marks and lists them.
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("fadjax.sample: images written")
        if pid != 0:
            return {}
        for s in todo_seeds:
            missing = [rel(s, c, i) for c in classes for i in range(num_per_class)
                       if not os.path.exists(os.path.join(out, rel(s, c, i)))]
            if missing:
                raise RuntimeError(f"seed {s}: {len(missing)} images were not written, e.g. {missing[:3]}")
            workdir_lib.write_json(os.path.join(out, f"seed_{s}", DONE), settings)

    manifest = dict(settings)
    manifest.update({
        "class_names": list(run.class_names),
        "prediction": prediction,
        "seeds": seeds,
        "metrics_jsonl": os.path.join(settings["workdir"], "metrics.jsonl"),
        "image_id_rule": f"fold_in(key(seed), class_names.index(class) * {IMAGE_ID_STRIDE} + index)",
        "images": [{"seed": s, "class": c, "label": int(run.condition_labels[c]), "index": i, "file": rel(s, c, i)}
                   for s in seeds for c in classes for i in range(num_per_class)],
        "counts": {"images": len(seeds) * len(classes) * num_per_class, "seeds": len(seeds),
                   "classes": len(classes), "per_class": num_per_class * len(seeds)},
    })
    workdir_lib.write_json(os.path.join(out, MANIFEST), manifest)
    logging.info("wrote %d images and %s", manifest["counts"]["images"], os.path.join(out, MANIFEST))
    return manifest


FLAGS = cli.Flags("python -m fadjax.sample")
flags.DEFINE_string("workdir", None, "Diffusion run folder.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output folder.", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=FLAGS)
flags.DEFINE_bool("no_ema", False, "Use the raw parameters, not the EMA.", flag_values=FLAGS)
flags.DEFINE_enum("sampler", None, list(sampling.SAMPLERS), "Default: the run's config.", flag_values=FLAGS)
flags.DEFINE_integer("steps", None, "Sampling steps (default: the run's config).", flag_values=FLAGS)
flags.DEFINE_float("eta", 0.0, "DDIM stochasticity.", flag_values=FLAGS)
flags.DEFINE_integer("num_per_class", None, "Images per class and seed (default: the run's config).", flag_values=FLAGS)
flags.DEFINE_string("seeds", None, "E.g. 0-14 or 0,3,5 (default: the run's config).", flag_values=FLAGS)
flags.DEFINE_string("classes", None, "Comma-separated class names (default: all but excluded).", flag_values=FLAGS)
flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale.", flag_values=FLAGS)
flags.DEFINE_string("guidance_interval", None, "Guide only at noise levels sigma in (lo, hi]: 'lo,hi'; 'none' = "
                    "every step (default: the run's config).", flag_values=FLAGS)
flags.DEFINE_bool("karras_sigmas", None, "dpmpp_2m on Karras sigmas (default: the run's config).", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", None, "Images per compiled call.", flag_values=FLAGS)
flags.DEFINE_bool("no_progress", False, "No progress bar.", flag_values=FLAGS)
flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process sampling).", flag_values=FLAGS)
flags.DEFINE_integer("num_processes", None, "Number of processes.", flag_values=FLAGS)
flags.DEFINE_integer("process_id", None, "This process's index.", flag_values=FLAGS)
flags.mark_flags_as_required(["workdir", "out"], flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> dict:
    """Samples (``argv`` without the program name; None = ``sys.argv[1:]``); returns the manifest.

    Raises:
      SystemExit(2): a bad flag. A folder that is not a run, a busy or mismatched ``--out``, a bad
        ``--guidance_interval``: the error (one line from ``cli.run``).
    """
    args = FLAGS.parse(argv)
    try:
        parse_guidance_interval(args.guidance_interval)
    except ValueError as e:
        raise cli.UserError(f"--guidance_interval {e}") from None
    logging.set_verbosity(logging.INFO)
    from fadjax import distributed
    distributed.initialize(coordinator=args.coordinator, num_processes=args.num_processes,
                           process_id=args.process_id)
    from fadjax.runs import load_diffusion_run
    run = load_diffusion_run(args.workdir, step=args.step, use_ema=not args.no_ema)
    cfg = run.config.sample
    return generate(run, args.out, seeds=parse_seeds(args.seeds if args.seeds is not None else cfg.seeds),
                    num_per_class=args.num_per_class or cfg.num_per_class, classes=parse_names(args.classes),
                    sampler=args.sampler, steps=args.steps, eta=args.eta, guidance_scale=args.guidance_scale,
                    batch_size=args.batch_size, karras_sigmas=args.karras_sigmas,
                    guidance_interval=args.guidance_interval, progress=not args.no_progress)


if __name__ == "__main__":
    cli.run(main, FLAGS.prog)
