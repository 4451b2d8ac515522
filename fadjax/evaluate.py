"""Judges generated images with the expert classifier (paper §V-D), or a real test set.

    python -m fadjax.evaluate --generated gens/fad --expert_workdir runs/expert \
        --real folder:/path/to/tiles --out reports/fad
    python -m fadjax.evaluate --expert_workdir runs/expert --real folder:/path/to/test_tiles --out reports/test

Without ``--generated`` the expert judges every image of the ``--real`` source (a test set kept
apart from training): ``OUT/metrics.json`` holds ``real_accuracy``, the accuracy per class and
the confusion matrix, drawn in ``confusion_real.png`` (:func:`judge_real`).

With ``--utility`` (and ``--generated``) it also measures whether the synthetic data is useful
(:mod:`fadjax.utility`): TSTR/TRTR accuracy, augmentation gain, and Fréchet distance and
precision/recall in the pooled features of the judge given by ``--judge2_workdir`` (the expert
when none is given), with classifiers of that judge's architecture and recipe. They go to
``OUT/metrics.json`` under ``utility`` and to ``OUT/utility.png``; the memorisation check
(:mod:`fadjax.memorisation`: nearest training tiles of the generated vs the validation tiles) goes
under ``memorisation`` and to ``OUT/memorisation.png``::

    python -m fadjax.evaluate --generated gens/fad --expert_workdir runs/expert \
        --judge2_workdir runs/judge2 --out reports/fad --utility --utility_seeds 3 --augment_fraction 0.1

Writes ``OUT/metrics.json`` and ``confusion_generated.png``, ``confusion_real.png``,
``ssim.png``, ``grid.png`` plus ``real_examples.npz`` (real images per class, for ``report``).

* Generation accuracy: the expert (at its own training size, eval mode) classifies every
  generated image; accuracy per seed, mean and standard deviation over seeds (``ddof=1``),
  accuracy per class, confusion counts (rows: generated classes, columns: all expert classes).
* SSIM diversity (``fadjax.metrics`` pairing rule) of the generated images, and of real images
  grouped the same way: for every seed ``s`` and class ``c`` of the generations,
  ``num_per_class`` real images of ``c`` drawn without replacement by
  ``np.random.default_rng([s, class_index])`` (all of them when the class has fewer), at the
  generated size. Real images come from the expert run's validation split when ``--real`` is
  the expert's data source (the default), else from all images of the given source.
* The expert's accuracy and confusion on its own validation split (real data).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import numpy as np
from absl import flags, logging
from PIL import Image

from fadjax import cli
from fadjax import metrics, plots
from fadjax import workdir as workdir_lib
from fadjax.data import images as data_images
from fadjax.data import pipeline
from fadjax.sample import MANIFEST

REAL_EXAMPLES = "real_examples.npz"


def read_manifest(generated_dir: str) -> dict:
    """The manifest of a ``fadjax.sample`` output folder, checked to list existing images.

    Raises:
      FileNotFoundError: no folder, no manifest (e.g. an interrupted run), or missing images.
      ValueError: the manifest lists no images.
    """
    if not os.path.isdir(generated_dir):
        raise FileNotFoundError(f"generated folder {generated_dir!r} does not exist")
    path = os.path.join(generated_dir, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no generated images in {generated_dir!r}: {MANIFEST} is missing "
                                "(run `python -m fadjax.sample`; an interrupted run writes no manifest)")
    with open(path) as f:
        manifest = json.load(f)
    if not manifest.get("images"):
        raise ValueError(f"the generated folder {generated_dir!r} is empty: its manifest lists no images")
    missing = [e["file"] for e in manifest["images"] if not os.path.exists(os.path.join(generated_dir, e["file"]))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images listed in {path} are missing, e.g. {missing[:3]}")
    return manifest


def read_png(path: str) -> np.ndarray:
    a = np.asarray(Image.open(path))
    return a[..., None] if a.ndim == 2 else a[..., :3]


def _read_generated(generated_dir: str, file: str) -> np.ndarray:
    """A generated image; a damaged one (e.g. truncated) stops with one line saying how to redo it."""
    path = os.path.join(generated_dir, file)
    try:
        return read_png(path)
    except (OSError, SyntaxError, ValueError) as e:
        raise workdir_lib.WorkdirError(
            f"generated image {path} cannot be decoded ({e}); rerun `python -m fadjax.sample` with the same "
            f"--out {generated_dir} to sample it again") from None


def classify(expert, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Expert predictions for uint8 ``[N,H,W,C]`` images, in fixed-size (padded) batches."""
    fn = jax.jit(expert.classify_fn)
    images = data_images.match_channels(images, expert.channels)
    return pipeline.batched(lambda x: np.argmax(fn(x.astype(np.float32) / 255.0), axis=-1), images,
                            batch_size).astype(np.int64)


def _resize(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    from fadjax.data import images as images_lib
    return np.stack([images_lib.to_array(images_lib.from_array(a), image_size=size, channels=channels)
                     for a in images])


def _same_source(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    if a.startswith("folder:") and b.startswith("folder:"):
        return os.path.realpath(a[7:]) == os.path.realpath(b[7:])
    return a == b


def real_images(expert, real: str | None, *, size: int, channels: int) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """Real images at the generated size for the SSIM reference.

    Args:
      expert: the loaded expert run.
      real: a data source string; ``None`` = the expert's own data source.
      size: side of the generated images.
      channels: channels of the generated images.

    Returns:
      ``(images uint8 [N,size,size,channels], labels [N], class_names, description)``.
    """
    from fadjax import data
    source = expert.split.get("source")
    real = real or source
    if _same_source(real, source):
        val_idx = np.asarray(expert.split["val_idx"], np.int64)
        try:
            ds = data.load(real, image_size=size, channels=channels,
                           classes=expert.config.data.get("classes"), progress=False)
            if list(ds.files) != list(expert.split["files"]):
                raise data.DataError(f"{real} no longer lists the files of the expert's split")
        except data.DataError as e:
            logging.warning("%s; resizing the expert's validation images instead", e)
            x, y = expert.load_val_data()
            return _resize(x, size, channels), np.asarray(y), list(expert.class_names), \
                f"{source} (expert validation split, resized from {expert.image_size})"
        return ds.images[val_idx], ds.labels[val_idx], list(ds.class_names), f"{real} (expert validation split)"
    ds = data.load(real, image_size=size, channels=channels, progress=False)
    return ds.images, ds.labels, list(ds.class_names), f"{real} (all images)"


def real_groups(images, labels, class_names, *, classes, seeds, num_per_class) -> dict:
    """``{(seed, class): uint8 images}``: the module docstring's deterministic draw per seed and class."""
    groups = {}
    for c in classes:
        if c not in class_names:
            continue
        k = class_names.index(c)
        pool = np.flatnonzero(np.asarray(labels) == k)
        if pool.size < 2:
            logging.warning("only %d real image(s) of class %r: no real SSIM for it", pool.size, c)
            continue
        if pool.size < num_per_class:
            logging.warning("only %d real images of class %r for groups of %d", pool.size, c, num_per_class)
        for s in seeds:
            pick = np.random.default_rng([int(s), k]).choice(pool, size=min(num_per_class, pool.size), replace=False)
            groups[(int(s), c)] = images[np.sort(pick)]
    return groups


def _ssim_of(groups: dict, classes: Sequence[str]) -> dict:
    return metrics.group_ssim({k: v.astype(np.float32) / 255.0 for k, v in groups.items()}, classes)


def evaluate(generated_dir: str, expert, out: str, *, real: str | None = None, batch_size: int = 64,
             grid_per_class: int = 8) -> dict:
    """Evaluates one folder of generations; writes ``out/metrics.json`` and figures.

    Args:
      generated_dir: output folder of ``fadjax.sample``.
      expert: the loaded expert run (``fadjax.runs.load_expert_run``).
      out: output folder.
      real: data source of the real reference images; ``None`` = the expert's own data.
      batch_size: expert batch size.
      grid_per_class: images per class (synthetic and real) in ``grid.png`` and ``real_examples.npz``.

    Returns:
      The metrics written to ``metrics.json``.

    Raises:
      ValueError: the generated classes are not classes of the expert (both lists named).
    """
    manifest = read_manifest(generated_dir)
    classes, seeds = list(manifest["classes"]), [int(s) for s in manifest["seeds"]]
    unknown = [c for c in classes if c not in expert.class_names]
    if unknown:
        raise ValueError(f"the expert ({expert.workdir}) does not know the generated classes {unknown}: "
                         f"expert classes {list(expert.class_names)}, generated classes {classes}")
    os.makedirs(out, exist_ok=True)
    with workdir_lib.WorkdirLock(out, what="evaluation"):
        return _evaluate(manifest, generated_dir, expert, out, classes=classes, seeds=seeds, real=real,
                         batch_size=batch_size, grid_per_class=grid_per_class)


def _evaluate(manifest, generated_dir, expert, out, *, classes, seeds, real, batch_size, grid_per_class) -> dict:
    entries = manifest["images"]
    images = np.stack([_read_generated(generated_dir, e["file"]) for e in entries])  # [N,H,W,C] uint8
    size, channels = images.shape[1], images.shape[-1]
    true = np.array([expert.class_names.index(e["class"]) for e in entries])
    entry_seeds = np.array([int(e["seed"]) for e in entries])
    logging.info("classifying %d generated images", len(images))
    pred = classify(expert, images, batch_size)
    k = len(expert.class_names)

    per_seed = {s: metrics.accuracy(true[entry_seeds == s], pred[entry_seeds == s]) for s in seeds}
    mean, std = metrics.mean_std(list(per_seed.values()))
    rows = [expert.class_names.index(c) for c in classes]
    cm_gen = metrics.confusion_matrix(true, pred, k)[rows]
    per_class_acc = {c: metrics.accuracy(true[true == r], pred[true == r]) for c, r in zip(classes, rows)}

    gen_groups = {}
    for e, img in zip(entries, images):
        gen_groups.setdefault((int(e["seed"]), e["class"]), []).append(img)
    gen_groups = {key: np.stack(v) for key, v in gen_groups.items()}
    ssim_gen = _ssim_of(gen_groups, classes)

    real_x, real_y, real_names, real_desc = real_images(expert, real, size=size, channels=channels)
    groups_real = real_groups(real_x, real_y, real_names, classes=classes, seeds=seeds,
                              num_per_class=int(manifest["num_per_class"]))
    ssim_real = _ssim_of(groups_real, classes)

    logging.info("classifying the expert's validation split")
    val_x, val_y = expert.load_val_data()
    val_pred = classify(expert, np.asarray(val_x), batch_size)
    cm_real = metrics.confusion_matrix(val_y, val_pred, k)

    examples = {c: real_x[np.asarray(real_y) == real_names.index(c)][:grid_per_class] if c in real_names
                else np.zeros((0, size, size, channels), np.uint8) for c in classes}
    np.savez_compressed(os.path.join(out, REAL_EXAMPLES), class_names=np.array(classes),
                        **{f"class_{i}": examples[c] for i, c in enumerate(classes)})

    result = {
        "generated": {
            "dir": os.path.abspath(generated_dir), "manifest": os.path.abspath(os.path.join(generated_dir, MANIFEST)),
            **{key: manifest.get(key) for key in ("workdir", "step", "used_ema", "sampler", "steps", "eta",
                                                  "guidance_scale", "num_per_class", "image_size", "channels",
                                                  "counts")},
            "classes": classes, "seeds": seeds,
        },
        "diffusion_run": {"workdir": manifest.get("workdir"), "metrics_jsonl": manifest.get("metrics_jsonl")},
        "expert": {"workdir": os.path.abspath(str(expert.workdir)), "class_names": list(expert.class_names),
                   "image_size": int(expert.image_size),
                   "val_accuracy_checkpoint": None if expert.val_accuracy is None else float(expert.val_accuracy)},
        "accuracy": {"per_seed": {str(s): v for s, v in per_seed.items()}, "mean": mean, "std": std,
                     "std_ddof": 1, "per_class": per_class_acc, "num_images": int(len(images))},
        "confusion_generated": {"rows": classes, "cols": list(expert.class_names), "counts": cm_gen.tolist()},
        "ssim": {
            "pairing": "mean over unordered pairs i<j within each (seed, class) group, then mean over seeds; "
                       "overall = mean over classes",
            "generated": ssim_gen,
            "real": ssim_real,
            "real_source": real_desc,
        },
        "expert_validation": {"accuracy": metrics.accuracy(val_y, val_pred), "num_images": int(len(val_y)),
                              "confusion": {"rows": list(expert.class_names), "cols": list(expert.class_names),
                                            "counts": cm_real.tolist()}},
        "real_examples": REAL_EXAMPLES,
    }
    _write_metrics(out, result)

    run_name = os.path.basename(os.path.normpath(generated_dir))
    plots.confusion(cm_gen, classes, expert.class_names, os.path.join(out, "confusion_generated.png"),
                    title=f"Expert on generated images ({run_name}): accuracy {mean:.3f}")
    plots.confusion(cm_real, expert.class_names, expert.class_names, os.path.join(out, "confusion_real.png"),
                    title=f"Expert on real validation images: accuracy {result['expert_validation']['accuracy']:.3f}")
    cats = classes + ["overall"]
    plots.grouped_bars({"generated": {**ssim_gen["per_class"], "overall": ssim_gen["overall"]},
                        "real": {**ssim_real["per_class"], "overall": ssim_real["overall"]}}, cats,
                       os.path.join(out, "ssim.png"), title=f"SSIM diversity ({run_name}; lower = more diverse)",
                       ylabel="mean pairwise SSIM")
    first = seeds[0]
    plots.image_grid([(c, gen_groups.get((first, c), np.zeros((0,) + images.shape[1:], np.uint8))[:grid_per_class],
                       examples[c]) for c in classes],
                     os.path.join(out, "grid.png"), title=f"{run_name}: synthetic (seed {first}) vs real")
    logging.info("generation accuracy %.4f +- %.4f over %d seeds; wrote %s", mean, std, len(seeds), out)
    return result


def judge_real(expert, real: str, out: str, *, batch_size: int = 64) -> dict:
    """Classifies every image of the data source ``real`` with ``expert``; writes ``out/metrics.json``.

    The images are read at the expert's own size and channels; their classes must be classes of
    the expert (matched by name, so a test set may hold a subset of them).

    Returns:
      ``{'real_accuracy', 'per_class_accuracy', 'confusion', 'num_images', ...}``.

    Raises:
      ValueError: the source has classes the expert does not know (both lists named).
    """
    from fadjax import data
    ds = data.load(real, image_size=expert.image_size, channels=expert.channels, progress=False)
    unknown = [c for c in ds.class_names if c not in expert.class_names]
    if unknown:
        raise ValueError(f"the expert ({expert.workdir}) does not know the classes {unknown} of {real}: "
                         f"expert classes {list(expert.class_names)}, test classes {list(ds.class_names)}")
    os.makedirs(out, exist_ok=True)
    true = np.array([expert.class_names.index(ds.class_names[y]) for y in ds.labels], np.int64)
    logging.info("classifying %d real images of %s", len(true), real)
    pred = classify(expert, ds.images, batch_size)
    k = len(expert.class_names)
    rows = [expert.class_names.index(c) for c in ds.class_names]
    cm = metrics.confusion_matrix(true, pred, k)[rows]
    result = {
        "real_accuracy": metrics.accuracy(true, pred),
        "per_class_accuracy": {c: metrics.accuracy(true[true == r], pred[true == r])
                               for c, r in zip(ds.class_names, rows)},
        "confusion": {"rows": list(ds.class_names), "cols": list(expert.class_names), "counts": cm.tolist()},
        "num_images": int(len(true)),
        "per_class_count": {c: int(np.sum(true == r)) for c, r in zip(ds.class_names, rows)},
        "real": real,
        "expert": {"workdir": os.path.abspath(str(expert.workdir)), "class_names": list(expert.class_names),
                   "image_size": int(expert.image_size),
                   "val_accuracy_checkpoint": None if expert.val_accuracy is None else float(expert.val_accuracy)},
    }
    _write_metrics(out, result)
    plots.confusion(cm, list(ds.class_names), expert.class_names, os.path.join(out, "confusion_real.png"),
                    title=f"Expert on {len(true)} real test images: accuracy {result['real_accuracy']:.3f}")
    logging.info("real accuracy %.4f on %d images; wrote %s", result["real_accuracy"], len(true), out)
    return result


def generated_arrays(generated_dir: str, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(uint8 images, class indices in class_names, generation seeds)`` of a ``fadjax.sample`` folder.

    Raises:
      FileNotFoundError / ValueError: as :func:`read_manifest`, or generated classes that are not in
        ``class_names`` (both lists named).
    """
    manifest = read_manifest(generated_dir)
    entries = manifest["images"]
    unknown = sorted({e["class"] for e in entries} - set(class_names))
    if unknown:
        raise ValueError(f"the judge does not know the generated classes {unknown}: judge classes "
                         f"{list(class_names)}, generated classes {list(manifest['classes'])}")
    images = np.stack([read_png(os.path.join(generated_dir, e["file"])) for e in entries])
    labels = np.array([list(class_names).index(e["class"]) for e in entries], np.int32)
    seeds = np.array([int(e["seed"]) for e in entries], np.int64)
    return images, labels, seeds


def evaluate_utility(generated_dir: str, judge, out: str, *, judge_role: str = "judge2", seeds: Sequence[int] = (0, 1, 2),
                     augment_fraction: float = 0.1, spec_overrides: dict | None = None,
                     cache: dict | None = None, memorisation: bool = True) -> dict:
    """Utility metrics (:func:`fadjax.utility.utility_metrics`) of one folder of generations.

    Real data: the judge's own training and validation splits (its data source and split records).
    Adds them to ``out/metrics.json`` under ``utility`` (creating it when absent) and draws
    ``out/utility.png``. With ``memorisation``, also the memorisation check
    (:func:`fadjax.memorisation.memorisation_metrics`: each generated tile's distance to its nearest
    training tile, in pixels and the judge's pooled features, against the validation tiles'): under
    ``memorisation`` in ``out/metrics.json``, the closest pairs in ``out/memorisation.png``.

    Args:
      generated_dir: output folder of ``fadjax.sample``.
      judge: the loaded judge run (``fadjax.runs.load_expert_run``): feature space and classifier recipe.
      out: output folder.
      judge_role: how the record names the judge (``"judge2"`` or ``"expert (no --judge2_workdir)"``).
      seeds: classifier seeds.
      augment_fraction: share of the real training split in the augmentation experiment.
      spec_overrides: :class:`fadjax.utility.ClassifierSpec` fields to override (e.g. ``epochs``).
      cache: shared between calls on one judge: its real-data reference classifiers train once (and the
        real tiles' features and nearest-training distances of the memorisation check are computed once).
      memorisation: also run the memorisation check.

    Returns:
      The utility dict (the memorisation record is in ``out/metrics.json`` only).
    """
    from fadjax import utility
    images, labels, gen_seeds = generated_arrays(generated_dir, judge.class_names)
    logging.info("utility: judge %s (%s); %d generated images", judge.workdir, judge_role, len(images))
    spec = utility.spec_from_run(judge, **(spec_overrides or {}))
    logging.info("utility: classifier %s", spec)
    real_train, real_val = judge.load_train_data(), judge.load_val_data()
    result = utility.utility_metrics(images, labels, real_train, real_val, judge=judge, gen_seeds=gen_seeds,
                                     spec=spec, seeds=seeds, augment_fraction=augment_fraction,
                                     judge_role=judge_role, log=logging.info, cache=cache)
    result["real_source"] = f"{judge.split.get('source')} (the judge's training / validation split)"
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "metrics.json")
    metrics_all = {}
    if os.path.exists(path):
        with open(path) as f:
            metrics_all = json.load(f)
    metrics_all["utility"] = result
    run_name = os.path.basename(os.path.normpath(generated_dir))
    if memorisation:
        metrics_all["memorisation"] = _memorisation(generated_dir, images, labels, real_train, real_val, judge,
                                                    judge_role, out, run_name, cache)
    else:
        metrics_all.pop("memorisation", None)  # Not a stale record of other generations.
    _write_metrics(out, metrics_all)
    plots.utility({run_name: result}, os.path.join(out, "utility.png"),
                  title=f"Utility of {run_name}'s images (judge: {judge_role})")
    t, g, fd = result["tstr_accuracy"], result["augment_gain"], result["fd_judge2"]
    logging.info("utility: TSTR %.3f (TRTR %.3f), augment gain %+.1f points, FD %.3g (real vs real %.3g), "
                 "precision %.3f, recall %.3f; wrote %s", t["mean"], result["trtr_accuracy"]["mean"],
                 100 * g["mean"], fd["value"], result["real_vs_real"]["fd_judge2"]["mean"],
                 result["precision"]["value"], result["recall"]["value"], out)
    return result


def _memorisation(generated_dir: str, images, labels, real_train, real_val, judge, judge_role: str, out: str,
                  run_name: str, cache: dict | None) -> dict:
    """The memorisation check of one folder of generations against the judge's training split; draws
    ``out/memorisation.png``. Validation tiles: those of the generated classes."""
    from fadjax import memorisation as memo_lib
    from fadjax import utility
    val_x, val_y = real_val
    val_x = np.asarray(val_x)[np.isin(np.asarray(val_y), np.unique(labels))]
    train_x = np.asarray(real_train[0])
    m = memo_lib.memorisation_metrics(images, train_x, val_x, features=lambda x: utility.pooled_features(judge, x),
                                      feature_name="judge2", cache=cache)
    m["feature_space"] = f"pooled features of {judge_role} ({judge.workdir})"
    m["train_split"] = "the judge's training split"
    manifest = read_manifest(generated_dir)
    m["same_split_as_generator"] = memo_lib.generator_split_matches(manifest.get("workdir"), judge.split)
    files, train_idx = judge.split.get("files"), judge.split.get("train_idx")
    for pair in m["closest_pairs"]:  # Which files: the generated image and the training tile it is nearest.
        pair["generated_file"] = manifest["images"][pair["generated"]]["file"]
        pair["train_file"] = files[train_idx[pair["train"]]] if files and train_idx else None
    if m["same_split_as_generator"] is False:
        logging.warning("memorisation: %s was trained on another split than the judge's; the distances are to "
                        "the judge's training split", run_name)
    memo_lib.closest_pairs_figure(images, train_x, m["closest_pairs"], os.path.join(out, memo_lib.FIGURE),
                                  title=f"{run_name}: closest generated tiles to the training split (pixels)")
    p, f = m["pixels"], m["judge2"]
    logging.info("memorisation: near-copies %s%% in pixels, %s%% in judge features (validation tiles: %s%%, %s%%); "
                 "median nearest-training distance %.3g in pixels (validation %s)",
                 *(("n/a" if v is None else f"{100 * v:.1f}") for v in (
                     p["near_copies_generated"], f["near_copies_generated"], p["near_copies_validation"],
                     f["near_copies_validation"])), p["median_generated"],
                 "n/a" if p["median_validation"] is None else f"{p['median_validation']:.3g}")
    return metrics.json_safe(m)


def _write_metrics(out: str, result: dict) -> None:
    workdir_lib.write_json(os.path.join(out, "metrics.json"), result)


FLAGS = cli.Flags("python -m fadjax.evaluate")
flags.DEFINE_string("generated", None, "Output folder of fadjax.sample; without it the expert judges the --real "
                    "test set.", flag_values=FLAGS)
flags.DEFINE_string("expert_workdir", None, "Expert run folder.", flag_values=FLAGS)
flags.DEFINE_string("real", None, "Data source of real images (default: the expert's data); without --generated, "
                    "a test set to judge (required then), e.g. folder:/path/to/test_tiles.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output folder.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "Expert batch size.", flag_values=FLAGS)
# Utility of the synthetic data (fadjax.utility).
flags.DEFINE_bool("utility", False, "Also measure TSTR/TRTR, augmentation gain, FD and precision/recall "
                  "(needs --generated).", flag_values=FLAGS)
flags.DEFINE_string("judge2_workdir", None, "Judge run whose features and classifier recipe the utility metrics "
                    "use (default: the expert).", flag_values=FLAGS)
flags.DEFINE_integer("utility_seeds", 3, "Classifier seeds 0..N-1 (>= 2 for intervals).", flag_values=FLAGS)
flags.DEFINE_float("augment_fraction", 0.1, "Share of the real training split in the augmentation experiment.",
                   flag_values=FLAGS)
flags.DEFINE_integer("utility_epochs", None, "Epochs of each utility classifier (default: the judge's "
                     "train.num_epochs).", flag_values=FLAGS)
flags.mark_flags_as_required(["expert_workdir", "out"], flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> dict:
    """Judges (``argv`` without the program name; None = ``sys.argv[1:]``); returns the metrics.

    Raises:
      SystemExit(2): a bad flag.
      cli.UserError: a bad input, named in one line (``cli.run`` prints it).
    """
    args = FLAGS.parse(argv)
    if args.utility and args.generated is None:
        raise cli.UserError("--utility needs --generated DIR (the images whose utility is measured)")
    if args.generated is None and not args.real:
        raise cli.UserError("give --generated DIR (images to judge) or --real SOURCE (a real test set to judge)")
    if args.utility:
        if args.utility_seeds < 1:
            raise cli.UserError(f"--utility_seeds must be >= 1, got {args.utility_seeds}")
        if not 0.0 < args.augment_fraction <= 1.0:
            raise cli.UserError(f"--augment_fraction must be in (0, 1], got {args.augment_fraction}")
        if args.utility_epochs is not None and args.utility_epochs < 1:
            raise cli.UserError(f"--utility_epochs must be >= 1, got {args.utility_epochs}")
    if args.generated is not None:
        try:
            read_manifest(args.generated)
        except (FileNotFoundError, ValueError) as e:
            raise cli.UserError(f"--generated: {e}") from None
    logging.set_verbosity(logging.INFO)
    from fadjax.runs import load_expert_run
    try:
        expert = load_expert_run(args.expert_workdir)
    except (FileNotFoundError, ValueError) as e:
        raise cli.UserError(f"--expert_workdir: {e}") from None
    try:
        if args.generated is None:
            with workdir_lib.WorkdirLock(args.out, what="evaluation"):
                return judge_real(expert, args.real, args.out, batch_size=args.batch_size)
        result = evaluate(args.generated, expert, args.out, real=args.real, batch_size=args.batch_size)
    except workdir_lib.WorkdirError as e:  # A busy --out, a damaged generated image: one line.
        raise cli.UserError(str(e)) from None
    except ValueError as e:
        raise cli.UserError(str(e)) from None
    if not args.utility:
        return result
    judge, role = expert, "expert (no --judge2_workdir given)"
    if args.judge2_workdir:
        try:
            judge, role = load_expert_run(args.judge2_workdir), "judge2"
        except (FileNotFoundError, ValueError) as e:
            raise cli.UserError(f"--judge2_workdir: {e}") from None
    logging.info("utility metrics judged by %s: %s", role, judge.workdir)
    try:
        result["utility"] = evaluate_utility(
            args.generated, judge, args.out, judge_role=role, seeds=range(args.utility_seeds),
            augment_fraction=args.augment_fraction, spec_overrides={"epochs": args.utility_epochs})
    except ValueError as e:
        raise cli.UserError(f"utility: {e}") from None
    return result


if __name__ == "__main__":
    cli.run(main, FLAGS.prog)
