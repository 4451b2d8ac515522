"""Checkpoints of a run: an orbax ``CheckpointManager`` per folder, checked file by file on resume.

Below both training and inference (``fadjax.train`` writes them, ``fadjax.runs`` reads them).

Two guarantees beyond orbax's own:

* **One orbax operation at a time per process.** orbax numbers its save operations with one
  process-wide counter and names the signals its save threads wait for after that number; two
  managers saving at once in threads of one process (``fadjax.reproduce --jobs N`` trains stages in
  threads) can each wait for the other's signal until a 300 s timeout (seen in CI:
  ``Timeout waiting for key 'awaitable_signals_contract_3/item_directory_creation'``). So every
  call into orbax holds one process-wide lock, and a save is synchronous: it returns once the
  checkpoint is final on disk.
* **A damaged checkpoint is detected.** Once a step is final, process 0 writes ``MANIFEST``
  beside its items: the size and SHA-256 of every file. Restoring verifies them first, so a file
  truncated or removed (a copy cut short, a full disk's clean-up) is named before orbax reads it;
  orbax alone may read a truncated data file without an error.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from fadjax import distributed
from fadjax import workdir as workdir_lib

MANIFEST = "fadjax_manifest.json"
_ORBAX = threading.RLock()  # Every orbax call of this process (see the module docstring).


class DamagedCheckpoint(RuntimeError):
    """A checkpoint's files differ from its manifest."""


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(step_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    return {p.relative_to(step_dir).as_posix(): p for p in sorted(step_dir.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def write_manifest(step_dir: pathlib.Path) -> None:
    """Records the size and SHA-256 of every file of a final checkpoint step (atomically)."""
    files = {rel: {"size": p.stat().st_size, "sha256": _sha256(p)} for rel, p in _files(step_dir).items()}
    workdir_lib.write_json(step_dir / MANIFEST, {"files": files})


def verify_manifest(step_dir: pathlib.Path) -> None:
    """Raises :class:`DamagedCheckpoint` naming the first file that is missing, resized or changed.

    A step without a manifest (saved by an older fadjax, or cut off between orbax's final rename
    and the manifest) is left to orbax.
    """
    path = step_dir / MANIFEST
    if not path.exists():
        return
    expected = json.loads(path.read_text())["files"]
    present = _files(step_dir)
    for rel, want in expected.items():
        p = present.get(rel)
        if p is None:
            raise DamagedCheckpoint(f"{rel} is missing")
        size = p.stat().st_size
        if size != want["size"]:
            raise DamagedCheckpoint(f"{rel} has {size} bytes, {want['size']} were saved")
        if _sha256(p) != want["sha256"]:
            raise DamagedCheckpoint(f"{rel} differs from the file that was saved (SHA-256)")


class Checkpointer:
    """An orbax ``CheckpointManager`` holding ``state`` (a pytree) and ``meta`` (JSON) per step."""

    def __init__(self, directory: str | os.PathLike, *, keep: int, best_mode: str | None = None,
                 read_only: bool = False, keep_period: int | None = None):
        """Opens (or creates) ``directory``.

        Args:
          directory: the checkpoint folder (one sub-folder per step).
          keep: the most recent steps kept (the best ones with ``best_mode``).
          best_mode: "max" or "min" of the ``metric`` given to :meth:`save`; None = keep the latest.
          read_only: never create, save or delete.
          keep_period: steps that are multiples of it are kept as well, whatever ``keep`` says
            (:func:`even_period`; the training loop also saves them).
        """
        self.keep_period = int(keep_period) if keep_period else None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=self.keep_period, create=not read_only, read_only=read_only,
            best_fn=(lambda m: m["metric"]) if best_mode else None,
            best_mode=best_mode or "max", keep_checkpoints_without_metrics=best_mode is None,
            enable_async_checkpointing=False)
        self.directory = pathlib.Path(directory).absolute()
        with _ORBAX:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        with _ORBAX:
            return self.manager.latest_step()

    def best_step(self) -> int | None:
        with _ORBAX:
            return self.manager.best_step()

    def save(self, step: int, state_tree, meta: dict, *, metric: float | None = None) -> None:
        """Saves ``step`` and its manifest; returns once both are on disk.

        A full disk raises :class:`fadjax.workdir.DiskFull` (one line), and orbax's
        write-to-temporary-then-rename leaves the previous checkpoint intact.
        """
        previous = self.latest_step()
        try:
            with _ORBAX:
                self.manager.save(
                    int(step),
                    args=ocp.args.Composite(state=ocp.args.StandardSave(state_tree), meta=ocp.args.JsonSave(meta)),
                    metrics={"metric": float(metric)} if metric is not None else None)
                self.manager.wait_until_finished()
            if distributed.is_main_process() and (self.directory / str(int(step))).is_dir():
                write_manifest(self.directory / str(int(step)))
        except Exception as e:  # noqa: BLE001  (re-raised unless it is a full disk)
            self._raise_if_disk_full(e, step, previous)
            raise

    def _raise_if_disk_full(self, e: BaseException, step, previous) -> None:
        if workdir_lib.disk_full(e):
            kept = (f"the previous checkpoint (step {previous}) is intact" if previous is not None else
                    "the checkpoints saved before are intact")
            raise workdir_lib.DiskFull(
                f"no space left on device while saving checkpoint step {step} in {self.directory}; {kept}; "
                f"free some space and rerun the same command to resume") from None

    def restore_readable(self, abstract_state=None, *, at_most: int | None = None):
        """``(step, state_tree, meta)`` of the newest checkpoint that can be read, or ``None`` when none is saved.

        A damaged checkpoint (its manifest does not match, or orbax cannot read it) is named in one
        line and moved to ``<directory>_damaged/<step>`` (kept, not deleted; out of orbax's sight, so
        the run saves that step again), and the next older one is tried. Every process tries the same
        steps; process 0 moves them once all have tried.

        Raises:
          fadjax.workdir.WorkdirError: checkpoints exist but none can be read.
        """
        with _ORBAX:
            all_steps = self.manager.all_steps()
        steps = sorted((s for s in all_steps if at_most is None or s <= at_most), reverse=True)
        damaged = []
        found = None
        for step in steps:
            try:
                verify_manifest(self.directory / str(step))
                tree, meta = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001  (any failure to read it: truncated, missing, corrupt)
                msg = " ".join(str(e).split())[:200]
                logging.warning("checkpoint %s cannot be read (%s: %s); trying the next older one",
                                self.directory / str(step), type(e).__name__, msg)
                print(f"fadjax: checkpoint {self.directory / str(step)} cannot be read ({type(e).__name__}: "
                      f"{msg[:120]}); moved to {self.directory}_damaged/{step} (kept) and trying the next older one",
                      file=sys.stderr, flush=True)
                damaged.append(step)
                continue
            found = (int(step), tree, meta)
            break
        if damaged:
            distributed.wait_for_all_processes("checkpoint_fallback")
            if distributed.is_main_process():
                keep = pathlib.Path(f"{self.directory}_damaged")
                keep.mkdir(parents=True, exist_ok=True)
                for step in damaged:
                    target = keep / str(step)
                    if target.exists():
                        target = keep / f"{step}.{int(time.time())}"
                    os.replace(self.directory / str(step), target)
            distributed.wait_for_all_processes("checkpoint_fallback_moved")
            with _ORBAX:
                self.manager.reload()
            if found is None:
                raise workdir_lib.WorkdirError(
                    f"no readable checkpoint in {self.directory}: steps {sorted(damaged)} are damaged (kept in "
                    f"{self.directory}_damaged); use a new --workdir or restore them from a copy")
            logging.info("resuming from the newest readable checkpoint, step %d", found[0])
        return found

    def restore(self, step: int, abstract_state=None):
        """Returns ``(state_tree, meta)``; with no ``abstract_state`` the arrays come back as saved."""
        with _ORBAX:
            if abstract_state is None:  # As saved, onto this process's first device (any topology).
                meta = ocp.StandardCheckpointer().metadata(self.directory / str(int(step)) / "state").item_metadata
                device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
                abstract_state = jax.tree.map(
                    lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), meta,
                    is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
            state_args = ocp.args.StandardRestore(abstract_state)
            out = self.manager.restore(int(step), args=ocp.args.Composite(state=state_args,
                                                                          meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def wait(self) -> None:
        """Waits for orbax's own background work (deleting old steps); saves are already final."""
        try:
            with _ORBAX:
                self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001  (an error of orbax's background work surfaces here)
            self._raise_if_disk_full(e, "in progress", None)
            raise

    def close(self) -> None:
        self.wait()
        with _ORBAX:
            self.manager.close()


def even_period(total: int, points: int | None) -> int | None:
    """Steps between ``points`` evenly spaced checkpoints of a ``total``-step run: ``ceil(total / points)``.

    Its multiples up to ``total``, and ``total`` itself, are :func:`even_steps`; None when ``points`` is None.

    Raises:
      ValueError: ``points`` < 1 or ``total`` < 1.
    """
    if points is None:
        return None
    if int(points) < 1 or int(total) < 1:
        raise ValueError(f"evenly kept checkpoints need points >= 1 and total >= 1 steps, got {points} and {total}")
    return -(-int(total) // int(points))


def even_steps(total: int, points: int) -> list[int]:
    """The steps of ``points`` evenly spaced checkpoints: the multiples of :func:`even_period` below ``total``,
    then ``total`` (e.g. 700 steps, 4 points: 175, 350, 525, 700; 10 steps, 4 points: 3, 6, 9, 10)."""
    k = even_period(total, points)
    return [s for s in range(k, int(total), k)] + [int(total)]


def saved_steps(directory: pathlib.Path) -> list[int]:
    """The steps saved under an orbax checkpoint folder (digit-named sub-folders)."""
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def abstract_like(tree, sharding):
    """ShapeDtypeStructs of ``tree`` with the given sharding (a restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype,
                                                       sharding=sharding), tree)
