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
from fadjax.data import pipeline
from fadjax.train import common
from fadjax.data import from_config as inputs


def build_expert_module(config, num_classes: int):
    """``(module, variables_or_None)``: pretrained when ``expert.pretrained`` is set."""
    from fadjax.models import expert as expert_lib
    e = config.expert
    dtype = common.compute_dtype(config)
    if e.pretrained:
        return expert_lib.from_pretrained(e.pretrained, in_channels=config.data.channels,
                                          num_classes=num_classes, head_hidden=e.head_hidden, dtype=dtype)
    kw = {"head_hidden": e.head_hidden}
    if e.arch.startswith("resnet"):
        kw["width"] = e.width
    return expert_lib.build_expert(e.arch, num_classes=num_classes, dtype=dtype, **kw), None


def _has_bn(variables) -> bool:
    return "batch_stats" in variables


def make_train_step(module, config, par: common.Parallel, *, num_examples: int):
    """The compiled step ``(state, images, labels, lr_hp) -> (state, metrics)``; ``lr_hp`` are the
    learning-rate schedule's numbers (``common.lr_hparams``), a runtime argument."""
    B = config.train.batch_size
    root = jax.random.key(config.seed)
    data_key, step_root = jax.random.split(jax.random.fold_in(root, 7))
    d = config.data

    def draw(step, images, labels):
        idx = pipeline.batch_indices(data_key, step, num_examples=num_examples, batch_size=B)
        x = pipeline.augment(jax.random.fold_in(step_root, step), pipeline.to_float(images[idx]),
                             hflip=d.hflip, vflip=d.vflip)
        return x, labels[idx]

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

    def finish(state, loss, acc, grads, new_stats, lr_hp):
        lr = common.learning_rate(config.optim.schedule, state.step, lr_hp)
        new, finite, gnorm = common.apply_gradients_if_finite(state, grads, loss, lr=lr, batch_stats=new_stats)
        return new, {"loss": loss, "train_accuracy": acc, "grad_norm": gnorm, "lr": lr,
                     "finite": finite.astype(jnp.float32)}

    if par.mode == "sharded":
        def step(state, images, labels, lr_hp):
            x, y = jax.lax.with_sharding_constraint(draw(state.step, images, labels), par.batch_sharded)
            (loss, (stats, acc)), grads = grad_fn(state.params, state.batch_stats, x, y)
            return finish(state, loss, acc, grads, stats, lr_hp)

        return jax.jit(step, donate_argnums=(0,), out_shardings=(par.replicated, par.replicated))

    n = par.num_devices

    def pstep(state, images, labels, lr_hp):
        x, y = draw(state.step, images, labels)
        i = jax.lax.axis_index(common.DATA_AXIS)
        x, y = (jax.lax.dynamic_slice_in_dim(a, i * (B // n), B // n) for a in (x, y))
        (loss, (stats, acc)), grads = grad_fn(state.params, state.batch_stats, x, y)
        # Per-device BatchNorm statistics (like PyTorch DDP without SyncBN), averaged after the step.
        grads, loss, acc, stats = jax.lax.pmean((grads, loss, acc, stats), common.DATA_AXIS)
        return finish(state, loss, acc, grads, stats, lr_hp)

    return jax.pmap(pstep, axis_name=common.DATA_AXIS, donate_argnums=(0,))


def make_predict(module):
    @jax.jit
    def predict(variables, x_uint8):
        logits, _ = module.apply(variables, pipeline.to_float(x_uint8), train=False)
        return jnp.argmax(logits, -1)
    return predict


def evaluate(predict, variables, images: np.ndarray, labels: np.ndarray, num_classes: int, batch: int):
    """Accuracy and confusion matrix (rows: true class, columns: predicted) on host arrays."""
    preds = []
    for i in range(0, len(labels), batch):
        xb = images[i:i + batch]
        pad = batch - len(xb)
        if pad:  # One compiled shape for every batch.
            xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
        preds.append(np.asarray(predict(variables, xb))[: batch - pad])
    preds = np.concatenate(preds) if preds else np.zeros((0,), np.int64)
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
        ds = inputs.load_dataset(config, workdir)
        train_idx, val_idx = inputs.load_split(config, workdir, ds)
    K = len(ds.class_names)
    num_train = len(train_idx)
    spe = pipeline.steps_per_epoch(num_train, config.train.batch_size)
    total = common.run_length(config.train, spe)
    tx = common.make_optimizer(config.optim)
    ckpt = checkpoints.Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints)
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
            start, tree, _ = ckpt.restore_readable(checkpoints.abstract_like(
                _tree(state), jax.sharding.SingleDeviceSharding(jax.local_devices()[0])), at_most=start)
            state = state.replace(step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"],
                                  opt_state=tree["opt_state"])
        if best.best_step() is not None:
            try:  # A damaged best checkpoint is moved aside; the next better one replaces it.
                found = best.restore_readable(at_most=best.best_step())
            except workdir_lib.WorkdirError:
                found = None
            best_acc = float(found[2].get("val_accuracy", -1.0)) if found else -1.0
        logging.info("resumed from step %d (best validation accuracy so far %.4f)", start, best_acc)

    if distributed.is_main_process():
        record = {
            "stage": "expert", "class_names": list(ds.class_names), "data_source": config.data.source,
            "expert_module": module_spec(module), "num_train": num_train, "num_val": len(val_idx),
            "steps_per_epoch": spe, "total_steps": total, "versions": workdir_lib.versions()}
        if config_changes:
            record["config_changes"] = config_changes
        workdir_lib.write_records(workdir, config, record)

    with phases("placement"):
        state = par.put_replicated(state)
        dev_images, dev_labels, lr_hp = par.put_replicated((
            ds.images[train_idx], ds.labels[train_idx].astype(np.int32),
            common.lr_hparams(config.optim, steps_per_epoch=spe, total_steps=total)))
    step_fn = make_train_step(module, config, par, num_examples=num_train)
    predict = make_predict(module)
    val_images, val_labels = ds.images[val_idx], ds.labels[val_idx].astype(np.int64)

    t = config.train
    writer = common.MetricWriter(workdir, resume_step=start)
    progress = common.Progress(total, start, desc=f"expert {workdir.name}", enabled=t.progress)
    step, buf, last = start, [], {}
    eval_every = max(1, int(t.eval_every_epoch)) * spe
    timer = common.Timer()
    if start < total:
        with phases("compile"):
            step_fn = step_fn.lower(state, dev_images, dev_labels, lr_hp).compile()
        distributed.wait_for_all_processes("expert_step_compiled")  # Outside "compile": a wait, not compiling.
    try:
        while step < total:
            state, m = step_fn(state, dev_images, dev_labels, lr_hp)
            buf.append(m)
            step += 1
            stop = workdir_lib.stop_requested()  # SIGTERM: every process saves this step and stops.
            do_eval = step % eval_every == 0 or step == total
            save_now = step % t.checkpoint_every == 0 or do_eval or stop
            if step % t.log_every == 0 or save_now:
                last = common.summarise_steps(buf, par, step=step, ckpt=ckpt)
                last["img_per_s"] = len(buf) * t.batch_size / timer.lap()
                last["epoch"] = step / spe
                logged, buf = len(buf), []
                if do_eval:
                    host = par.unreplicate(state)
                    variables = {"params": host.params}
                    if host.batch_stats is not None:
                        variables["batch_stats"] = host.batch_stats
                    acc, conf = evaluate(predict, variables, val_images, val_labels, K, t.eval_batch_size)
                    last["val_accuracy"] = acc
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
                writer.write(step, last)
                progress.update(logged, {k: last[k] for k in ("loss", "train_accuracy", "val_accuracy") if k in last})
                if not progress.bar:
                    logging.info("step %d/%d %s", step, total, {k: round(v, 5) for k, v in last.items()})
            if save_now:
                ckpt.save(step, _tree(par.unreplicate(state)), {"step": step, **last})
            if stop:
                ckpt.wait()
                raise workdir_lib.preempted_error(step, ckpt.directory)
    finally:
        progress.close()
        writer.close()
        ckpt.close()
        best.close()
    return {"workdir": str(workdir), "final_step": step, "best_val_accuracy": best_acc,
            "last_metrics": last, "setup_s": phases.times, "wall_s": time.time() - t_start}
