"""The diffusion stage: baseline and feature-aligned training in one compiled step.

One call of the step draws the batch from the device-resident training images, noises it
(``x_t = q_sample(x0, t, eps)``), runs the U-Net (which also returns its named features), runs
the frozen expert on ``x_t`` (or ``x0`` for the Table I ablation), projects the expert's
features with ``W_p``, adds ``w2 * (1 - cos)`` to ``w1 * MSE``, and applies Adam (and the EMA).
The baseline is the same step with the alignment term compiled out.
"""
from __future__ import annotations

import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from fadjax import align as align_lib
from fadjax import checkpoints
from fadjax import distributed
from fadjax import config_lib
from fadjax import diffusion as diffusion_lib
from fadjax import workdir as workdir_lib
from fadjax import data as data_lib
from fadjax.data import pipeline
from fadjax.models import build
from fadjax.train import common
from fadjax.train import loop
from fadjax.data import from_config as inputs


def _resize(x, size: int | None):
    if size is None or x.shape[1] == size:
        return x
    return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bilinear")


def make_loss_fn(model: build.DiffusionModel, config, schedule: diffusion_lib.Schedule, expert=None):
    """``loss_fn(params, consts, x0, labels, noise, t, weights) -> (loss, aux)`` of one (local) batch.

    ``weights`` ``[B]`` weighs each example's noise MSE (``1/B`` each for a plain mean; DreamBooth
    weighs its prior images by ``prior_weight``); under pmap each device rescales its share to sum to 1.
    ``consts`` holds what the step reads but never trains: ``expert`` variables, the
    ``text_features`` of CLIP conditioning and the run's numbers ``hp`` (:func:`step_hparams`: loss
    weights, whether the expert sees x0); being runtime values, runs that differ only in them
    share one compiled step.
    """
    a = config.align
    use_align = bool(a.enabled)
    align_mode = a.get("mode", "pooled")
    data_range = config.diffusion.data_range
    prediction = config.diffusion.get("prediction", "epsilon")
    weighting = config.diffusion.get("loss_weighting", "none")
    snr_gamma = float(config.diffusion.get("snr_gamma", 5.0))

    def loss_fn(params, consts, x0, labels, noise, t, weights):
        # x0 [B, H, W, C] in [0, 1]; the model diffuses it in its data range.
        x0_model = diffusion_lib.to_model_range(x0, data_range)
        x_t = diffusion_lib.q_sample(schedule, x0_model, t, noise)
        out, feats = model(params, x_t, t, labels, consts.get("text_features"))
        target = diffusion_lib.training_target(schedule, x0_model, t, noise, prediction)
        per_example = jnp.mean(jnp.square(out.astype(jnp.float32) - target), axis=(1, 2, 3))  # [B]
        per_example = per_example * diffusion_lib.loss_weight(schedule, t, weighting=weighting,
                                                              prediction=prediction, gamma=snr_gamma)
        noise_loss = jnp.sum(weights * per_example)
        hp = consts["hp"]
        loss = hp["noise_weight"] * noise_loss
        aux = {"noise_loss": noise_loss}
        if use_align:
            # The expert sees its own [0, 1] scale: x0, or x_t mapped back by the data range's affine map.
            x_e = jnp.where(hp["expert_clean"], x0, diffusion_lib.from_model_range(x_t, data_range))
            x_e = _resize(x_e, a.expert_resize)
            _, e_feats = expert.apply(consts["expert"], x_e, train=False)
            align_loss = align_lib.alignment_loss(
                align_mode, params["proj"], e_feats[a.expert_feature], feats[a.unet_feature])
            loss = loss + hp["align_weight"] * align_loss
            aux["align_loss"] = align_loss
        return loss, aux

    return loss_fn


def make_draw_fn(config, sources, *, null_label: int | None):
    """``draw(step, data) -> (x0, y, noise, t, weights)`` of the GLOBAL batch of a step.

    ``data`` holds the device-resident arrays the ``sources`` (``pipeline.Source``) name, e.g.
    ``{'images': uint8 [N,H,W,C], 'labels': int32 [N]}`` of the training split; ``weights`` weigh each
    example's noise MSE (``Source.weight / batch_size`` each).

    Every random draw has the global batch shape and depends only on the seed and the step
    (``pipeline.RunKeys``), so one device, eight devices, pmap and sharded all see the same batch,
    and a resumed run continues exactly like an uninterrupted one.
    """
    max_t = int(config.diffusion.max_train_timestep)
    p_drop = float(config.cond.label_dropout)
    keys = pipeline.RunKeys(config.seed)

    def draw(step, data):
        x0, y, weights = pipeline.draw_examples(keys, step, data, sources, hflip=config.data.hflip,
                                                vflip=config.data.vflip,
                                                transpose=bool(config.data.get("transpose", False)))
        b = x0.shape[0]
        if null_label is not None and p_drop > 0:
            y = jnp.where(jax.random.bernoulli(keys.step(step, "drop"), p_drop, (b,)), null_label, y)
        noise = jax.random.normal(keys.step(step, "noise"), x0.shape, jnp.float32)
        t = jax.random.randint(keys.step(step, "t"), (b,), 0, max_t)
        return x0, y, noise, t, weights

    return draw


def step_hparams(config, *, steps_per_epoch: int, total_steps: int) -> dict:
    """The run's numbers the compiled step reads at run time (``consts['hp']``): the learning-rate
    schedule's, the EMA decay, the loss weights w1 and w2, and whether the expert sees x0."""
    f = np.float32
    hp = {"lr": common.lr_hparams(config.optim, steps_per_epoch=steps_per_epoch, total_steps=total_steps),
          "noise_weight": f(config.diffusion.loss_weight), "align_weight": f(config.align.weight),
          "expert_clean": np.bool_(config.align.expert_input == "clean")}
    if config.train.get("ema_sigma_rel", 0.0) > 0:
        hp["ema_power"] = f(common.power_ema_gamma(float(config.train.ema_sigma_rel)))
    elif config.train.ema_decay is not None:
        hp["ema_decay"] = f(config.train.ema_decay)
    return hp


def uses_ema(train_cfg) -> bool:
    """Whether a run keeps an EMA of its parameters (a fixed decay or the power-function EMA)."""
    return train_cfg.ema_decay is not None or train_cfg.get("ema_sigma_rel", 0.0) > 0


def make_train_step(loss_fn, draw, par: common.Parallel, *, schedule: str, ema_warmup: bool = False):
    """The compiled step ``(state, data, consts) -> (state, metrics)`` for ``par``.

    ``schedule`` names the learning-rate schedule (``config.optim.schedule``); its numbers, like the
    EMA decay, come from ``consts['hp']`` (:func:`step_hparams`).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def compute(state, batch, consts):
        (loss, aux), grads = grad_fn(state.params, consts, *batch)
        return grads, loss, aux

    def finish(state, out, consts):
        grads, loss, aux = out
        hp = consts["hp"]
        lr = common.learning_rate(schedule, state.step, hp["lr"])
        new, finite, grad_norm = common.apply_gradients_if_finite(
            state, grads, loss, lr=lr, ema_decay=hp.get("ema_decay"), ema_warmup=ema_warmup,
            ema_power=hp.get("ema_power"))
        metrics = {"loss": loss, **aux, "grad_norm": grad_norm, "lr": lr, "finite": finite.astype(jnp.float32)}
        return new, metrics

    def localize(local, n):  # Each device's example weights sum to 1; pmean averages.
        return local[:-1] + (local[-1] * n,)

    return loop.data_parallel_step(par, draw=draw, compute=compute, finish=finish, localize=localize)


def _checkpoint_tree(state: common.TrainState) -> dict:
    """What a checkpoint holds. The step's randomness is ``fold_in(key(config.seed), step)``, so
    the seed (in ``meta``) and the step restore the RNG exactly."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
            "ema_params": state.ema_params}


def _text_features(config, workdir: pathlib.Path, labels: build.LabelSpace):
    """CLIP text features of the label texts, computed once and stored in the workdir."""
    if config.cond.mode != "clip":
        return None
    path = workdir / "text_features.npy"
    texts = labels.texts(config.cond.prompt)
    if path.exists():
        feats = np.load(path, allow_pickle=False)
        if feats.shape[0] == len(texts):
            return build.null_padded(feats, labels)
    from fadjax.models import conditioning
    feats = np.asarray(conditioning.compute_clip_text_features(config.cond.clip_path, texts), np.float32)
    if distributed.is_main_process():
        np.save(path, feats)
    return build.null_padded(feats, labels)


def check_model(config, model=None) -> dict:
    """The U-Net's feature shapes, after checking that it can halve the image size at each level and has
    ``align.unet_feature`` (ConfigError naming the field if not). Cheap (shapes only): ``fadjax.reproduce``
    checks every model this way before any stage starts. ``model`` None = the config's own U-Net."""
    if model is None:
        model = build.build_diffusion_model(build.unet(config), cond_mode=config.cond.mode,
                                            labels=build.LabelSpace(("class",)))
    image_size = config.data.image_size
    levels = len(model.unet.config.block_out_channels) - 1
    if image_size % (2 ** levels):
        raise config_lib.ConfigError(
            f"config.data.image_size: {image_size} cannot be halved {levels} times by the U-Net "
            f"(use a multiple of {2 ** levels})")
    feat_shapes = model.feature_shapes(image_size=image_size, channels=config.data.channels)
    if config.align.enabled and config.align.unet_feature not in feat_shapes:
        raise config_lib.ConfigError(
            f"config.align.unet_feature: {config.align.unet_feature!r} is not a U-Net feature; "
            f"choose one of {sorted(feat_shapes)}")
    return feat_shapes


def _check_same_class_path(config, params, source_params) -> None:
    """A run fine-tuned from another (``init_from``) has the class in its time embedding exactly when that
    run had it: otherwise the class path would be dropped, or added with random weights, silently."""
    ours, theirs = "class_embedding" in params["unet"], "class_embedding" in source_params["unet"]
    if ours != theirs:
        raise config_lib.ConfigError(
            f"config.model.class_to_time: {ours} here, but the init_from run {config.init_from} was trained with "
            f"class_to_time={theirs}; set the same")


def _models(config, labels: build.LabelSpace):
    """(pretrained U-Net params or None, the run's DiffusionModel, its U-Net's feature shapes)."""
    unet_module = unet_params = None
    if config.model.pretrained:  # The U-Net from pretrained weights.
        from fadjax.models import unet_convert
        unet_module, unet_params = unet_convert.from_pretrained(
            config.model.pretrained, in_channels=config.data.channels, out_channels=config.data.channels,
            dtype=config_lib.compute_dtype(config), attention=config.model.attention)
    if unet_module is None:
        unet_module = build.unet(config)
    model = build.build_diffusion_model(unet_module, cond_mode=config.cond.mode, labels=labels)
    feat_shapes = check_model(config, model)
    return unet_params, model, feat_shapes


def _load_expert(config, ds, feat_shapes: dict):
    """(the trained expert run, its feature width, the U-Net feature's width), checked against the data."""
    from fadjax import runs
    expert_run = runs.load_expert_run(config.align.expert_workdir, dtype=config_lib.compute_dtype(config))
    if list(expert_run.class_names) != list(ds.class_names):
        raise config_lib.ConfigError(
            f"config.align.expert_workdir: the expert was trained on classes {expert_run.class_names}, "
            f"this run's data has {ds.class_names}")
    e_size = config.align.expert_resize or config.data.image_size
    e_shapes = expert_run.feature_shapes(image_size=e_size, channels=config.data.channels)
    if config.align.expert_feature not in e_shapes:
        raise config_lib.ConfigError(
            f"config.align.expert_feature: {config.align.expert_feature!r} is not an expert feature; "
            f"choose one of {sorted(e_shapes)}")
    a = config.align
    if a.mode == "tokens" and len(e_shapes[a.expert_feature]) != 4:
        raise config_lib.ConfigError(
            f"config.align.expert_feature: {a.expert_feature!r} {e_shapes[a.expert_feature]} is not spatial; "
            f"align.mode='tokens' needs one of {sorted(k for k, v in e_shapes.items() if len(v) == 4)}")
    e_dim = e_shapes[a.expert_feature][-1]
    u_dim = feat_shapes[a.unet_feature][-1]
    d_in, d_out = align_lib.projector_io(a.mode, expert_dim=e_dim, unet_dim=u_dim)
    logging.info("aligning U-Net %s %s to expert %s %s (%s input), %s mode, %s projector %d -> %d",
                 a.unet_feature, feat_shapes[a.unet_feature], a.expert_feature, e_shapes[a.expert_feature],
                 a.expert_input, a.mode, a.projector, d_in, d_out)
    return expert_run, e_dim, u_dim


class Task:
    """What a diffusion run trains on: the plain stage's choices, each a method DreamBooth overrides
    (``fadjax.train.dreambooth.DreamBoothTask``)."""

    def __init__(self, config):
        self.config = config

    def label_space(self, ds) -> build.LabelSpace:
        """The conditioning rows: the data's classes (and the null label when guidance is trained)."""
        return build.LabelSpace(tuple(ds.class_names), has_null=self.config.cond.label_dropout > 0)

    def train_data(self, ds, train_idx: np.ndarray, labels: build.LabelSpace) -> dict:
        """The host arrays the draw reads: ``{'images', 'labels'}`` of the training split (the images a lazy
        ``Rows`` view: the device path copies them to the device(s), the host path reads each step's)."""
        return {"images": data_lib.Rows(ds.images, train_idx), "labels": ds.labels[train_idx].astype(np.int32)}

    def sources(self, data: dict) -> list:
        """What each step draws from ``data`` (``pipeline.Source``s)."""
        return [pipeline.Source("train", len(data["labels"]), self.config.train.batch_size)]

    def make_draw(self, data: dict, null_label: int | None):
        """``draw(step, data) -> (x0, y, noise, t, weights)`` of the global batch (:func:`make_draw_fn`)."""
        return make_draw_fn(self.config, self.sources(data), null_label=null_label)

    def init_params(self, model, params, source_run):
        """The parameters after ``init_from``'s were merged in (``source_run``: that run)."""
        return params

    def run_record(self, record: dict) -> dict:
        """What ``run.json`` holds, before it is written."""
        return record


def train(config, workdir, *, task: Task | None = None) -> dict:
    """Trains a diffusion model; resumes from ``workdir`` when it holds a checkpoint.

    Args:
      config: a diffusion config (see ``configs/baseline.py``, ``configs/feature_aligned.py``).
      workdir: the run's folder (checkpoints, logs, split, resolved config).
      task: what the run trains on (default: :class:`Task`, the plain stage; DreamBooth gives its own).

    Returns:
      A summary dict (final step, last logged metrics, wall time).
    """
    config_lib.validate(config)
    workdir = pathlib.Path(workdir)
    with common.guarded_workdir(workdir, config, what="training run") as changes:
        return _train(config, workdir, task=task or Task(config), config_changes=changes)


def _train(config, workdir: pathlib.Path, *, task: Task, config_changes) -> dict:
    from fadjax import runs

    t_start = time.time()
    phases = common.Phases("diffusion")
    workdir.mkdir(parents=True, exist_ok=True)
    common.log_topology()
    par = common.make_parallel(config, config.train.batch_size)

    with phases("data"):
        ds = inputs.load_dataset(config, workdir, mmap=True)
        train_idx, _ = inputs.load_split(config, workdir, ds)
    labels = task.label_space(ds)
    with phases("models"):
        text_features = _text_features(config, workdir, labels)
        unet_params, model, feat_shapes = _models(config, labels)
    image_size, channels = config.data.image_size, config.data.channels
    expert = expert_run = None
    if config.align.enabled:
        with phases("expert"):
            expert_run, e_dim, u_dim = _load_expert(config, ds, feat_shapes)
        expert = expert_run.module

    # Training data on the device(s).
    train_data = task.train_data(ds, train_idx, labels)
    num_train = len(train_data["labels"])
    spe = pipeline.steps_per_epoch(num_train, config.train.batch_size)
    total = common.run_length(config.train, spe)
    tx = common.make_optimizer(config.optim)
    schedule = diffusion_lib.make_schedule(config.diffusion.num_train_timesteps, config.diffusion.beta_schedule)
    ckpt = checkpoints.Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints,
                                    keep_period=checkpoints.even_period(total, config.train.get("keep_evenly")))
    start = distributed.agreed_step(ckpt.latest_step() or 0)  # May fall back below, past a damaged checkpoint.

    # Parameters: resume > init_from > pretrained > scratch.
    keep_ema = uses_ema(config.train)

    k_model, k_proj = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 1))

    def init_model(key):  # U-Net and conditioner (with pretrained U-Net weights: only the conditioner is new)
        return model.init(key, image_size=image_size, channels=channels, unet_params=unet_params,
                          text_features=text_features)

    def init_proj(key):
        a = config.align
        d_in, d_out = align_lib.projector_io(a.mode, expert_dim=e_dim, unet_dim=u_dim)
        return align_lib.init_projector(key, d_in, d_out, kind=a.projector, hidden=a.projector_hidden)

    def fresh_params():
        params = init_model(k_model)
        if config.align.enabled:
            params["proj"] = init_proj(k_proj)
        return params

    def make_state(params):
        return common.TrainState.create(apply_fn=None, params=params, tx=tx,
                                        ema_params=jax.tree.map(jnp.copy, params) if keep_ema else None)

    with phases("init"):
        # A resumed run needs only the shapes (its checkpoint holds the values, init_from's included).
        # Otherwise each random part is one compiled program with its key as an argument (every model of
        # one architecture shares the U-Net's), then the optimizer state and the EMA are built in one
        # more (eagerly, every leaf would be a dispatch).
        if start:
            state = jax.eval_shape(lambda: make_state(fresh_params()))
        else:
            params = common.run_init(init_model, k_model) if unet_params is None else init_model(k_model)
            if config.align.enabled:
                params["proj"] = common.run_init(init_proj, k_proj)
            if config.init_from:
                src = runs.load_diffusion_run(config.init_from, use_ema=False)
                _check_same_class_path(config, params, src.params)
                params = runs.merge_params(params, src.params, source_name=config.init_from)
                params = task.init_params(model, params, src)
            state = jax.block_until_ready(jax.jit(make_state)(params))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    df, tc = config.diffusion, config.train
    ema = (f"power-function EMA, sigma_rel {tc.ema_sigma_rel}" if tc.get("ema_sigma_rel", 0.0) > 0
           else f"EMA decay {tc.ema_decay}" if tc.ema_decay is not None else "no EMA")
    logging.info("objective: %s prediction, %s weighting; %s; symmetries: %s", df.get("prediction", "epsilon"),
                 df.get("loss_weighting", "none"), ema,
                 "all 8" if config.data.get("transpose") and config.data.hflip and config.data.vflip else
                 f"hflip {config.data.hflip}, vflip {config.data.vflip}, transpose {config.data.get('transpose', False)}")
    logging.info("parameters: %.1fM (%s)", n_params / 1e6,
                 ", ".join(f"{k} {sum(x.size for x in jax.tree.leaves(v)) / 1e6:.2f}M" for k, v in state.params.items()))

    if start:
        with phases("restore"):
            start, state, _ = loop.restore(ckpt, state, par, start=start, to_tree=_checkpoint_tree)
        logging.info("resumed from %s at step %d", ckpt.directory, start)
    if start >= total:
        logging.info("run already complete (%d/%d steps)", start, total)

    # Everything the step reads, on the device(s); the training images there or, too large, on the host.
    consts = {"text_features": text_features, "hp": step_hparams(config, steps_per_epoch=spe, total_steps=total)}
    if expert_run is not None:
        consts["expert"] = expert_run.variables
    with phases("placement"):
        state = par.put_replicated(state)
        consts = par.put_replicated(consts)
        dev_data, feed, placement = loop.place_data(config, par, train_data, task.sources(train_data),
                                                    start=start, total=total)

    # Run record.
    if distributed.is_main_process():
        record = {"stage": "diffusion", "labels": labels.to_dict(), "data_source": config.data.source,
                  "num_train": num_train, "steps_per_epoch": spe, "total_steps": total,
                  "versions": workdir_lib.versions(), "parameters": n_params,
                  "unet_config": model.unet.config.to_dict(), "input_path": placement}
        if expert_run is not None:
            record["expert"] = {"workdir": str(pathlib.Path(config.align.expert_workdir).absolute()),
                                "step": expert_run.step, "sha256": expert_run.checkpoint_sha256,
                                "val_accuracy": expert_run.val_accuracy}
        if config_changes:
            record["config_changes"] = config_changes
        record = task.run_record(record)
        workdir_lib.write_records(workdir, config, record)

    loss_fn = make_loss_fn(model, config, schedule, expert)
    draw = task.make_draw(train_data, labels.null_label)
    step_fn = make_train_step(loss_fn, draw, par, schedule=config.optim.schedule,
                              ema_warmup=bool(config.train.get("ema_warmup", False)))

    summary = {"workdir": str(workdir), "total_steps": total, "start_step": start, "setup_s": phases.times,
               "input_path": placement["path"]}
    if start < total:
        step_args = (consts,) if feed is not None else (dev_data, consts)
        step_fn = loop.compile_for(step_fn, state, (feed.spec(), consts) if feed is not None else step_args,
                                   phases=phases, barrier="diffusion_step_compiled")
        summary.update(loop.run(workdir=workdir, train_cfg=config.train, par=par, state=state, step_fn=step_fn,
                                step_args=step_args, ckpt=ckpt, start=start, total=total,
                                steps_per_epoch=spe, desc=f"train {workdir.name}",
                                shown=("loss", "noise_loss", "align_loss"), to_tree=_checkpoint_tree,
                                meta={"seed": config.seed}, feed=feed))
    ckpt.close()
    summary["wall_s"] = time.time() - t_start
    return summary
