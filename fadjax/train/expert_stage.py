"""The expert stage: train and validate the classifier the diffusion model is aligned to.

Paper §V-A: ResNet50 (ImageNet init when given), 1-channel stem, head 2048-256-ReLU-K,
Adam 1e-4 with StepLR(0.7) per epoch, batch 64, 224x224 inputs in [0, 1] with random flips,
80/20 split; the checkpoint with the best validation accuracy is kept.
"""
from __future__ import annotations

import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from fadjax import checkpoints
from fadjax import distributed
from fadjax import config_lib
from fadjax import workdir as workdir_lib
from fadjax import data as data_lib
from fadjax.data import pipeline
from fadjax.train import common
from fadjax.train import loop
from fadjax.data import from_config as inputs


def build_expert_module(config, num_classes: int):
    """``(module, variables_or_None)``: pretrained when ``expert.pretrained`` is set."""
    from fadjax.models import expert as expert_lib
    e = config.expert
    dtype = config_lib.compute_dtype(config)
    if e.pretrained:
        return expert_lib.from_pretrained(e.pretrained, in_channels=config.data.channels,
                                          num_classes=num_classes, head_hidden=e.head_hidden, dtype=dtype)
    kw = {"head_hidden": e.head_hidden}
    if e.arch.startswith("resnet"):
        kw["width"] = e.width
    return expert_lib.build_expert(e.arch, num_classes=num_classes, dtype=dtype, **kw), None


def train_sources(config, num_examples: int) -> list:
    """What each step draws: ``train.batch_size`` of the training split's examples."""
    return [pipeline.Source("train", num_examples, config.train.batch_size)]


def make_train_step(module, config, par: common.Parallel, *, num_examples: int):
    """The compiled step ``(state, data, consts) -> (state, metrics)``: ``data`` the device-resident
    ``{'images', 'labels'}`` of the training split (or the step's batch gathered on the host, the host input
    path), ``consts['lr']`` the learning-rate schedule's numbers (``common.lr_hparams``, a runtime argument)."""
    keys = pipeline.RunKeys(config.seed)
    sources = train_sources(config, num_examples)

    def draw(step, data):
        x, y, _ = pipeline.draw_examples(keys, step, data, sources, hflip=config.data.hflip, vflip=config.data.vflip,
                                         transpose=bool(config.data.get("transpose", False)))
        return x, y

    def loss_fn(params, batch_stats, x, y):
        variables = {"params": params}
        if batch_stats is not None:
            variables["batch_stats"] = batch_stats
            (logits, _), upd = module.apply(variables, x, train=True, mutable=["batch_stats"])
            new_stats = upd["batch_stats"]
        else:
            logits, _ = module.apply(variables, x, train=True)
            new_stats = None
        logits = logits.astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        return loss, (new_stats, acc)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def compute(state, batch, consts):
        # Under pmap the BatchNorm statistics are per device (like PyTorch DDP without SyncBN), averaged
        # after the step with the gradients.
        (loss, (stats, acc)), grads = grad_fn(state.params, state.batch_stats, *batch)
        return loss, acc, grads, stats

    def finish(state, out, consts):
        loss, acc, grads, new_stats = out
        lr = common.learning_rate(config.optim.schedule, state.step, consts["lr"])
        new, finite, gnorm = common.apply_gradients_if_finite(state, grads, loss, lr=lr, batch_stats=new_stats)
        return new, {"loss": loss, "train_accuracy": acc, "grad_norm": gnorm, "lr": lr,
                     "finite": finite.astype(jnp.float32)}

    return loop.data_parallel_step(par, draw=draw, compute=compute, finish=finish)


def make_predict(module):
    @jax.jit
    def predict(variables, x_uint8):
        logits, _ = module.apply(variables, pipeline.to_float(x_uint8), train=False)
        return jnp.argmax(logits, -1)
    return predict


def evaluate(predict, variables, images: np.ndarray, labels: np.ndarray, num_classes: int, batch: int):
    """Accuracy and confusion matrix (rows: true class, columns: predicted) on host arrays."""
    preds = pipeline.batched(lambda x: predict(variables, x), images, batch).astype(np.int64)
    conf = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(conf, (labels, preds), 1)
    return float(np.mean(preds == labels)) if len(labels) else float("nan"), conf


def _tree(state) -> dict:
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state}


def train(config, workdir) -> dict:
    """Trains the expert; resumes from ``workdir`` when it holds a checkpoint."""
    config_lib.validate(config)
    workdir = pathlib.Path(workdir)
    with common.guarded_workdir(workdir, config, what="training run") as changes:
        return _train(config, workdir, config_changes=changes)


def _train(config, workdir: pathlib.Path, *, config_changes) -> dict:
    from fadjax import plots
    from fadjax.runs import module_spec

    t_start = time.time()
    phases = common.Phases("expert")
    workdir.mkdir(parents=True, exist_ok=True)
    common.log_topology()
    par = common.make_parallel(config, config.train.batch_size)
    with phases("data"):
        ds = inputs.load_dataset(config, workdir, mmap=True)
        train_idx, val_idx = inputs.load_split(config, workdir, ds)
    K = len(ds.class_names)
    num_train = len(train_idx)
    spe = pipeline.steps_per_epoch(num_train, config.train.batch_size)
    total = common.run_length(config.train, spe)
    tx = common.make_optimizer(config.optim)
    ckpt = checkpoints.Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints,
                                    keep_period=checkpoints.even_period(total, config.train.get("keep_evenly")))
    best = checkpoints.Checkpointer(workdir / "best", keep=1, best_mode="max")
    start = distributed.agreed_step(ckpt.latest_step() or 0)
    with phases("init"):
        module, variables = build_expert_module(config, K)

        def make_state(v):
            return common.TrainState.create(apply_fn=None, params=v["params"], tx=tx, batch_stats=v.get("batch_stats"))

        def init_variables(key):
            from fadjax.models import expert as expert_lib
            return expert_lib.init_expert(module, key, image_size=config.data.image_size,
                                          in_channels=config.data.channels)

        # A resumed run needs only the shapes. Otherwise the random draws are one compiled program (its
        # key an argument, see common.run_init), the optimizer state another (eagerly, one dispatch per leaf).
        key = jax.random.fold_in(jax.random.key(config.seed), 1)
        if variables is None and start:
            state = jax.eval_shape(lambda: make_state(init_variables(key)))
        else:
            if variables is None:
                variables = common.run_init(init_variables, key)
            state = jax.block_until_ready(jax.jit(make_state)(variables))
    logging.info("expert %s: %.2fM parameters, %d classes, %d train / %d val images", config.expert.arch,
                 sum(x.size for x in jax.tree.leaves(state.params)) / 1e6, K, num_train, len(val_idx))

    best_acc = -1.0
    if start:
        with phases("restore"):
            start, state, _ = loop.restore(ckpt, state, par, start=start, to_tree=_tree)
        if best.best_step() is not None:
            try:  # A damaged best checkpoint is moved aside; the next better one replaces it.
                found = best.restore_readable(at_most=best.best_step())
            except workdir_lib.WorkdirError:
                found = None
            best_acc = float(found[2].get("val_accuracy", -1.0)) if found else -1.0
        logging.info("resumed from step %d (best validation accuracy so far %.4f)", start, best_acc)

    with phases("placement"):
        state = par.put_replicated(state)
        train_data = {"images": data_lib.Rows(ds.images, train_idx), "labels": ds.labels[train_idx].astype(np.int32)}
        lr = par.put_replicated({"lr": common.lr_hparams(config.optim, steps_per_epoch=spe, total_steps=total)})
        dev_data, feed, placement = loop.place_data(config, par, train_data, train_sources(config, num_train),
                                                    start=start, total=total)
    step_args = (lr,) if feed is not None else (dev_data, lr)

    if distributed.is_main_process():
        record = {
            "stage": "expert", "class_names": list(ds.class_names), "data_source": config.data.source,
            "expert_module": module_spec(module), "num_train": num_train, "num_val": len(val_idx),
            "steps_per_epoch": spe, "total_steps": total, "versions": workdir_lib.versions(),
            "input_path": placement}
        if config_changes:
            record["config_changes"] = config_changes
        workdir_lib.write_records(workdir, config, record)

    step_fn = make_train_step(module, config, par, num_examples=num_train)
    predict = make_predict(module)
    val_labels = ds.labels[val_idx].astype(np.int64)
    # On the host path the validation images are read batch by batch too.
    val_images = (data_lib.Rows(ds.images, val_idx) if placement["path"] == "host"
                  else np.asarray(ds.images[val_idx]))

    def validate(step, state) -> dict:
        """Validation accuracy; a new best is saved in ``best/`` with its confusion matrix and figure."""
        nonlocal best_acc
        host = par.unreplicate(state)
        variables = {"params": host.params}
        if host.batch_stats is not None:
            variables["batch_stats"] = host.batch_stats
        acc, conf = evaluate(predict, variables, val_images, val_labels, K, config.train.eval_batch_size)
        if acc > best_acc:
            best_acc = acc
            best.save(step, {"params": host.params, "batch_stats": host.batch_stats},
                      {"step": step, "val_accuracy": acc, "confusion": conf.tolist(),
                       "class_names": list(ds.class_names)}, metric=acc)
            if distributed.is_main_process():
                workdir_lib.write_json(workdir / "expert_eval.json", {
                    "step": step, "val_accuracy": acc, "num_val": int(len(val_labels)),
                    "class_names": list(ds.class_names), "confusion": conf.tolist(),
                    "per_class_accuracy": dict(zip(ds.class_names, (np.diag(conf) / np.maximum(conf.sum(1), 1)).tolist()))})
                plots.confusion(conf, ds.class_names, ds.class_names, workdir / "confusion.png",
                                title=f"Expert validation confusion (step {step}, acc {acc:.3f})")
        logging.info("step %d: validation accuracy %.4f (best %.4f)", step, acc, best_acc)
        return {"val_accuracy": acc}

    step, last = start, {}
    try:
        if start < total:
            step_fn = loop.compile_for(step_fn, state, (feed.spec(), lr) if feed is not None else step_args,
                                       phases=phases, barrier="expert_step_compiled")
            out = loop.run(workdir=workdir, train_cfg=config.train, par=par, state=state, step_fn=step_fn,
                           step_args=step_args, ckpt=ckpt, start=start, total=total, steps_per_epoch=spe,
                           desc=f"expert {workdir.name}", shown=("loss", "train_accuracy", "val_accuracy"),
                           to_tree=_tree, eval_every=max(1, int(config.train.eval_every_epoch)) * spe,
                           evaluate=validate, feed=feed)
            step, last = out["final_step"], out["last_metrics"]
    finally:
        ckpt.close()
        best.close()
    return {"workdir": str(workdir), "final_step": step, "best_val_accuracy": best_acc,
            "last_metrics": last, "setup_s": phases.times, "wall_s": time.time() - t_start,
            "input_path": placement["path"]}
