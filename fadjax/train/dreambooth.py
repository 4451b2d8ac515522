"""DreamBooth fine-tuning on one class (paper §V-C), with or without feature alignment.

Built on the diffusion stage as a task of its own (``DreamBoothTask``); the compiled step is the same one:

* **Start**: a diffusion run (``init_from``; its U-Net architecture, image size, conditioning and
  noise schedule are taken over, see ``INHERITED``) or pretrained U-Net weights (``model.pretrained``).
* **Labels**: the starting run's classes, then one extra row, the identifier (text
  ``"<identifier> <class>"`` through ``cond.prompt``, e.g. "sks tumor"), then the null label when
  the starting run had one or ``cond.label_dropout > 0``. In ``class_embed`` mode the identifier's
  row starts as a copy of the class's own row (and the null row as the starting run's); in
  ``clip`` mode it is the CLIP feature of its text.
* **Instance images**: the training-split images of the class (``data.classes``, one name; the
  data are loaded with every class so that the split and the labels are the starting run's).
* **Class-prior images**: before fine-tuning, the starting model samples
  ``dreambooth.num_class_images`` images of the class with the plain class label
  (``fadjax.sampling``, ``dreambooth.prior_sampler`` / ``prior_steps``), stored as
  ``<workdir>/prior_images.npz`` (uint8 + the settings that made them) and reused while the settings match.
* **Loss**: each step draws ``train.batch_size`` instance and ``dreambooth.prior_batch_size``
  prior images into one batch; the noise MSE weighs them ``1/B_inst`` and
  ``prior_weight/B_prior``, so ``noise_loss = instance + prior_weight * prior``; the alignment
  term (when enabled) sees ``x_t`` of every example. An epoch is one pass over the instance images.
* **Record**: ``run.json`` gets a ``dreambooth`` section and ``condition_overrides``
  ``{class: identifier label}``, so ``fadjax.sample`` samples the class with the identifier; the
  resolved config's ``sample.exclude_classes`` lists every other class, so by default
  ``fadjax.sample`` and ``fadjax.evaluate`` judge the instance class only (the paper's setting).
"""
from __future__ import annotations

import io
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fadjax import diffusion as diffusion_lib
from fadjax import checkpoints
from fadjax import distributed
from fadjax import config_lib
from fadjax import runs
from fadjax import sampling
from fadjax import workdir as workdir_lib
from fadjax import data as data_lib
from fadjax.data import pipeline
from fadjax.models import build
from fadjax.train import common
from fadjax.train import diffusion_stage
from fadjax.data import from_config as inputs

PRIOR_FILE = "prior_images.npz"
PRIOR_FORMAT = 1  # Version of the prior cache's settings record.

# Fields taken from the starting run (they fix the architecture and what the parameters mean).
INHERITED = ("data.image_size", "data.channels", "model.preset", "model.block_out_channels",
             "model.attention_head_dim", "model.cross_attention_dim", "model.norm_num_groups",
             "model.attention_levels", "model.layers_per_block",
             "model.pretrained", "cond.mode", "cond.prompt", "diffusion.num_train_timesteps",
             "diffusion.beta_schedule", "diffusion.data_range", "diffusion.prediction")
# What a starting run's config.json means by a field it does not have (written before the field existed).
INHERITED_MISSING = {"diffusion.data_range": "[0,1]", "diffusion.prediction": "epsilon"}
# Fields whose None means "the starting run's".
INHERITED_IF_UNSET = ("data.source", "cond.clip_path")


# ----------------------------------------------------------------------------- config

def _validate(config) -> None:
    db = config.dreambooth
    names = config_lib.parse_names(config.data.classes)
    if not names or len(names) != 1:
        raise config_lib.ConfigError(
            f"config.data.classes: DreamBooth fine-tunes on ONE class, got {config.data.classes!r} "
            "(e.g. --config.data.classes=tumor)")
    if not config.init_from and not config.model.pretrained:
        raise config_lib.ConfigError(
            "config.init_from: DreamBooth needs a starting model: --config.init_from=runs/baseline "
            "(a diffusion run) or --config.model.pretrained=segmind/tiny-sd")
    if not str(db.identifier).strip():
        raise config_lib.ConfigError("config.dreambooth.identifier: must be a non-empty token such as 'sks'")
    if db.prior_batch_size < 0:
        raise config_lib.ConfigError(f"config.dreambooth.prior_batch_size: {db.prior_batch_size} must be >= 0")
    if db.prior_weight < 0:
        raise config_lib.ConfigError(f"config.dreambooth.prior_weight: {db.prior_weight} must be >= 0")
    if db.prior_batch_size and db.num_class_images < db.prior_batch_size:
        raise config_lib.ConfigError(
            f"config.dreambooth.num_class_images: {db.num_class_images} is fewer than the "
            f"{db.prior_batch_size} prior images each step draws (dreambooth.prior_batch_size)")
    if db.prior_sampler not in config_lib.SAMPLERS:
        raise config_lib.ConfigError(
            f"config.dreambooth.prior_sampler: {db.prior_sampler!r} is not one of {config_lib.SAMPLERS}")
    try:
        sampling.timesteps(config.diffusion.num_train_timesteps, db.prior_sampler, db.prior_steps)
    except ValueError as e:
        raise config_lib.ConfigError(f"config.dreambooth.prior_steps: {e}") from None


def resolve_config(config, *, source_config=None) -> tuple[ml_collections.ConfigDict, dict]:
    """The config the run trains with: the starting run's architecture fields and every class loaded.

    ``data.classes`` names the instance class; it moves to ``dreambooth.class_name`` and
    ``data.classes`` becomes the starting run's own class restriction (None = all classes).

    Returns:
      ``(config, changed)``: the resolved config and ``{field: starting run's value}`` of the
      fields that took another value from the starting run.
    """
    out = ml_collections.ConfigDict(config.to_dict())
    _validate(out)
    out.dreambooth.class_name = config_lib.parse_names(config.data.classes)[0]
    changed = {}
    if source_config is not None:
        for path in INHERITED + INHERITED_IF_UNSET:
            section, key = path.split(".")
            new = source_config[section].get(key, INHERITED_MISSING.get(path))
            if path in INHERITED_IF_UNSET and out[section][key] is not None:
                continue
            if out[section][key] != new:
                changed[path] = new
            out[section][key] = new
        if changed:
            logging.info("taken from the starting run %s: %s", config.init_from, changed)
        out.data.classes = source_config.data.get("classes")
    else:
        out.data.classes = None
        if not out.data.source:
            raise config_lib.ConfigError(
                "config.data.source: starting from model.pretrained, set the data source "
                "(e.g. --config.data.source=folder:/path/to/tiles)")
    config_lib.validate(out)
    return out, changed


# ----------------------------------------------------------------------------- labels and params

def identifier_text(config, class_name: str) -> str:
    """The identifier row's text: ``cond.prompt`` applied to ``"<identifier> <class>"``."""
    return config.cond.prompt.format(f"{config.dreambooth.identifier} {class_name}")


def label_space(class_names, *, config, class_name: str, source: build.LabelSpace | None) -> build.LabelSpace:
    """The starting run's classes and extra rows, the identifier, and the null label if any."""
    text = identifier_text(config, class_name)
    extra = tuple(source.extra) if source is not None else ()
    if text not in extra:
        extra = extra + (text,)
    has_null = bool(config.cond.label_dropout > 0 or (source is not None and source.has_null))
    return build.LabelSpace(tuple(class_names), extra, has_null)


def row_sources(labels: build.LabelSpace, source: build.LabelSpace, *, class_name: str, identifier: str) -> list:
    """For each row of ``labels``, the row of ``source`` it starts from (None = fresh).

    Classes and extra rows the starting run has keep theirs; the new identifier starts from the
    class's own row; the null row from the starting run's null row.
    """
    out = []
    for r in range(labels.size):
        if r < labels.num_classes:
            out.append(r)
        elif r == labels.null_label:
            out.append(source.null_label)
        else:
            text = labels.extra[r - labels.num_classes]
            if text in source.extra:
                out.append(source.extra_label(text))
            elif text == identifier:
                out.append(source.class_names.index(class_name))
            else:
                out.append(None)
    return out


def init_params(model, params, source_run, *, class_name: str, identifier: str):
    """``init_params`` hook: checks the U-Net matches and initialises the conditioning rows."""
    if model.unet.config != source_run.model.unet.config:
        a, b = model.unet.config.to_dict(), source_run.model.unet.config.to_dict()
        diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
        raise config_lib.ConfigError(f"config.model: the U-Net differs from the starting run's: {diff}")
    if "embedding" not in params["cond"]:  # clip: the identifier is a new text, no new row.
        return params
    table = params["cond"]["embedding"]["embedding"]  # [rows, dim]
    src = np.asarray(source_run.params["cond"]["embedding"]["embedding"])
    rows = row_sources(model.labels, source_run.labels, class_name=class_name, identifier=identifier)
    for r, s in enumerate(rows):
        if s is not None:
            table = table.at[r].set(jnp.asarray(src[s], table.dtype))
    logging.info("conditioning rows from the starting run's rows %s", rows)
    return {**params, "cond": {**params["cond"], "embedding": {"embedding": table}}}


# ----------------------------------------------------------------------------- prior images

def generate_prior_images(eps_fn, params, schedule, label: int, *, num_images: int, shape, sampler: str,
                          steps: int | None, seed: int, batch_size: int, data_range: str = "[0,1]",
                          prediction: str = "epsilon") -> np.ndarray:
    """``num_images`` samples of one label, uint8 ``[N, H, W, C]``; image ``i`` uses ``fold_in(key(seed), i)``.

    ``prediction`` is what ``eps_fn`` outputs (``fadjax.diffusion.PREDICTIONS``)."""
    bs = min(int(batch_size), int(num_images))
    out = []
    for ids, n in pipeline.fixed_batches(list(range(num_images)), bs):
        x = sampling.sample(eps_fn, params, schedule, [label] * bs, shape=shape, seed=seed, image_ids=ids,
                            sampler=sampler, steps=steps, prediction=prediction)
        out.append(sampling.to_uint8(diffusion_lib.from_model_range(x, data_range))[:n])
        logging.info("prior images: %d/%d", ids[n - 1] + 1, num_images)
    return np.concatenate(out)


def read_prior_cache(path: pathlib.Path, settings: dict) -> np.ndarray | None:
    """The cached prior images when ``path`` holds images made with exactly ``settings``, else None."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            cached = json.loads(str(f["settings"]))
            images = f["images"]
    except (OSError, ValueError, KeyError) as e:
        logging.warning("prior image cache %s is unreadable (%s); generating it again", path, e)
        return None
    shape = (settings["num_images"], settings["image_size"], settings["image_size"], settings["channels"])
    if cached != settings or images.dtype != np.uint8 or images.shape != shape:
        diff = {k: (cached.get(k), settings.get(k)) for k in sorted(set(cached) | set(settings))
                if cached.get(k) != settings.get(k)}
        logging.warning("prior image cache %s was made with other settings %s (cached, wanted); "
                        "generating it again", path, diff or {"images": (images.shape, shape)})
        return None
    return images


def write_prior_cache(path: pathlib.Path, images: np.ndarray, settings: dict) -> None:
    """Writes ``images`` (uint8) and ``settings`` (JSON) atomically, process 0 only."""
    if not distributed.is_main_process():
        return
    buf = io.BytesIO()
    np.savez(buf, images=np.asarray(images, np.uint8), settings=np.asarray(json.dumps(settings, sort_keys=True)))
    with workdir_lib.atomic_write(str(path)) as f:
        f.write(buf.getvalue())


def _source_step(workdir) -> int:
    ckpt = checkpoints.Checkpointer(pathlib.Path(workdir) / "checkpoints", keep=1, read_only=True)
    step = ckpt.latest_step()
    ckpt.close()
    if step is None:
        raise FileNotFoundError(f"{workdir} has no checkpoints; train it first")
    return int(step)


def prior_settings(config, *, class_label: int) -> dict:
    """What makes the prior images: the starting model, the class, the sampler, the seed, the sizes."""
    db = config.dreambooth
    if config.init_from:
        start = {"init_from": str(pathlib.Path(config.init_from).absolute()), "step": _source_step(config.init_from),
                 "use_ema": bool(db.prior_use_ema)}
    else:
        start = {"pretrained": str(config.model.pretrained), "seed": int(config.seed)}
    return {"format": PRIOR_FORMAT, "start": start, "class_name": db.class_name, "class_label": int(class_label),
            "sampler": db.prior_sampler,
            "steps": int(len(sampling.timesteps(config.diffusion.num_train_timesteps, db.prior_sampler, db.prior_steps))),
            "seed": int(db.prior_seed), "num_images": int(db.num_class_images),
            "image_size": int(config.data.image_size), "channels": int(config.data.channels)}


def _starting_model(config, workdir: pathlib.Path, labels: build.LabelSpace):
    """``(eps_fn, params, schedule)`` of the model fine-tuning starts from."""
    if config.init_from:
        run = runs.load_diffusion_run(config.init_from, use_ema=bool(config.dreambooth.prior_use_ema))
        logging.info("prior images from %s step %d (%s params)", run.workdir, run.step,
                     "EMA" if run.used_ema else "raw")
        return run.eps_fn, run.params, run.schedule
    # Pretrained U-Net + the conditioner exactly as the trainer initialises it (same key).
    from fadjax.models import unet_convert
    module, unet_params = unet_convert.from_pretrained(
        config.model.pretrained, in_channels=config.data.channels, out_channels=config.data.channels,
        dtype=config_lib.compute_dtype(config), attention=config.model.attention)
    model = build.build_diffusion_model(module, cond_mode=config.cond.mode, labels=labels)
    text_features = diffusion_stage._text_features(config, workdir, labels)
    k_model, _ = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 1))
    params = model.init(k_model, image_size=config.data.image_size, channels=config.data.channels,
                        unet_params=unet_params, text_features=text_features)

    def eps_fn(params, x, t, y):
        return model(params, x, t, y, text_features)[0]

    schedule = diffusion_lib.make_schedule(config.diffusion.num_train_timesteps, config.diffusion.beta_schedule)
    return eps_fn, params, schedule


def prior_images(config, workdir: pathlib.Path, labels: build.LabelSpace, settings: dict) -> tuple[np.ndarray, bool]:
    """The class-prior images: from the cache when it holds images made with ``settings``, else sampled and cached.

    Returns:
      ``(images uint8 [N,H,W,C], generated)``.
    """
    db = config.dreambooth
    path = workdir / PRIOR_FILE
    images = read_prior_cache(path, settings)
    if images is not None:
        logging.info("reusing %d prior images of %r from %s", len(images), db.class_name, path)
        return images, False
    eps_fn, params, schedule = _starting_model(config, workdir, labels)
    images = generate_prior_images(
        eps_fn, params, schedule, settings["class_label"], num_images=db.num_class_images,
        shape=(config.data.image_size, config.data.image_size, config.data.channels),
        sampler=db.prior_sampler, steps=db.prior_steps, seed=db.prior_seed, batch_size=config.sample.batch_size,
        data_range=config.diffusion.data_range, prediction=config.diffusion.get("prediction", "epsilon"))
    write_prior_cache(path, images, settings)
    logging.info("wrote %d prior images of %r to %s", len(images), db.class_name, path)
    return images, True


# ----------------------------------------------------------------------------- the batch

def sources(config, data) -> list:
    """DreamBooth's sources: each step's batch is ``B_inst`` instance then ``B_prior`` prior images, the
    prior images' noise MSE weighted by ``prior_weight``."""
    b_inst, b_prior = int(config.train.batch_size), int(config.dreambooth.prior_batch_size)
    out = [pipeline.Source("instance", len(data["labels"]), b_inst)]
    if b_prior:
        out.append(pipeline.Source("prior", len(data["prior_labels"]), b_prior, images="prior_images",
                                   labels="prior_labels", weight=float(config.dreambooth.prior_weight)))
    return out


def make_draw(config, data, null_label):
    """DreamBooth's draw: the plain stage's draw over its two :func:`sources`."""
    return diffusion_stage.make_draw_fn(config, sources(config, data), null_label=null_label)


# ----------------------------------------------------------------------------- train

class DreamBoothTask(diffusion_stage.Task):
    """The diffusion stage's task for DreamBooth: the instance images under the identifier's row, the
    prior images under the plain class's, the identifier's row initialised from the class's, and the
    ``dreambooth`` section of ``run.json``."""

    def __init__(self, config, *, labels: build.LabelSpace, class_label: int, identifier_label: int,
                 prior: np.ndarray | None, record: dict):
        super().__init__(config)
        self.labels, self.class_label, self.identifier_label = labels, class_label, identifier_label
        self.prior, self.record = prior, record

    def label_space(self, ds) -> build.LabelSpace:
        return self.labels

    def train_data(self, ds, train_idx, labels) -> dict:
        idx = train_idx[ds.labels[train_idx] == self.class_label]
        data = {"images": data_lib.Rows(ds.images, idx), "labels": np.full(len(idx), self.identifier_label, np.int32)}
        if self.prior is not None:
            data.update(prior_images=self.prior, prior_labels=np.full(len(self.prior), self.class_label, np.int32))
        return data

    def sources(self, data) -> list:
        return sources(self.config, data)

    def make_draw(self, data, null_label):
        return make_draw(self.config, data, null_label)

    def init_params(self, model, params, source_run):
        return init_params(model, params, source_run, class_name=self.record["class_name"],
                           identifier=self.record["identifier_text"])

    def run_record(self, record: dict) -> dict:
        record["condition_overrides"] = {self.record["class_name"]: self.identifier_label}
        record["dreambooth"] = self.record
        return record


def train(config, workdir) -> dict:
    """DreamBooth fine-tuning (see the module docstring); resumes from ``workdir``.

    Args:
      config: a DreamBooth config (``configs/dreambooth.py``).
      workdir: the run's folder; holds ``prior_images.npz`` beside the usual run files.

    Returns:
      The diffusion stage's summary plus ``prior_images`` (path, count, whether generated now).

    Raises:
      ConfigError: naming the field, for a class the starting run lacks, no starting model, etc.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    source_config = source_labels = None
    if config.init_from:
        source_config = workdir_lib.read_config(config.init_from)
        source_labels = build.LabelSpace.from_dict(
            workdir_lib.read_json(pathlib.Path(config.init_from) / workdir_lib.RUN_FILE)["labels"])
    config, inherited = resolve_config(config, source_config=source_config)
    db = config.dreambooth
    class_name = db.class_name
    b_prior = int(db.prior_batch_size)
    try:
        common.make_parallel(config, config.train.batch_size + b_prior)
    except config_lib.ConfigError as e:
        raise config_lib.ConfigError(
            f"config.dreambooth.prior_batch_size: train.batch_size + prior_batch_size = "
            f"{config.train.batch_size + b_prior} must split evenly over the devices ({e})") from None

    ds = inputs.load_dataset(config, workdir)
    class_names = tuple(source_labels.class_names) if source_labels is not None else tuple(ds.class_names)
    if list(ds.class_names) != list(class_names):
        raise config_lib.ConfigError(
            f"config.data.source: {config.data.source} has classes {list(ds.class_names)}, the starting run "
            f"{config.init_from} was trained on {list(class_names)}")
    if class_name not in class_names:
        raise config_lib.ConfigError(
            f"config.data.classes: {class_name!r} is not a class of the starting run "
            f"({config.init_from or config.model.pretrained}): {list(class_names)}")
    k = class_names.index(class_name)
    train_idx, _ = inputs.load_split(config, workdir, ds)
    instance_idx = train_idx[ds.labels[train_idx] == k]  # The trainer makes the same (seeded) split.
    if len(instance_idx) < config.train.batch_size:
        raise config_lib.ConfigError(
            f"config.train.batch_size: {config.train.batch_size} exceeds the {len(instance_idx)} training images "
            f"of {class_name!r}")
    config.sample.exclude_classes = ",".join(c for c in class_names if c != class_name)
    labels = label_space(class_names, config=config, class_name=class_name, source=source_labels)
    ident = identifier_text(config, class_name)
    ident_label = labels.extra_label(ident)
    logging.info("DreamBooth on %r (label %d) with identifier %r (label %d); label space %s",
                 class_name, k, ident, ident_label, labels.to_dict())

    prior, generated, settings = None, False, None
    if b_prior:
        settings = prior_settings(config, class_label=k)
        prior, generated = prior_images(config, workdir, labels, settings)

    start = ({"init_from": str(pathlib.Path(config.init_from).absolute())} if config.init_from
             else {"pretrained": config.model.pretrained})
    record = {
        "class_name": class_name, "class_label": k, "identifier": db.identifier,
        "identifier_text": ident, "identifier_label": ident_label,
        "num_instance_images": int(len(instance_idx)), "instance_batch_size": int(config.train.batch_size),
        "prior_batch_size": b_prior, "prior_weight": float(db.prior_weight),
        "prior_images": {"file": PRIOR_FILE, **settings} if b_prior else None,
        "start": start, "inherited": inherited,
    }
    task = DreamBoothTask(config, labels=labels, class_label=k, identifier_label=ident_label, prior=prior,
                          record=record)
    summary = diffusion_stage.train(config, workdir, task=task)
    summary["prior_images"] = {"path": str(workdir / PRIOR_FILE) if b_prior else None,
                               "num_images": 0 if prior is None else int(len(prior)), "generated": generated}
    return summary
