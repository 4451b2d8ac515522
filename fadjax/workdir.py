"""What keeps a run's folder sound against its user's mistakes and its machine's faults.

* :class:`WorkdirLock`: one run per folder (``fcntl.flock`` on ``FOLDER/.lock``, held while the run
  lives; the OS releases it when the holder dies, so a dead holder never blocks).
* :func:`config_drift`: a rerun must train what the folder holds (field-by-field comparison of the
  saved resolved config with the new one; fields that only extend or observe a run are accepted).
* :func:`install_preemption` / :func:`stop_requested`: SIGTERM asks the run to save at the current
  step and stop; in a multi-process run every process agrees on that step.
* :func:`disk_full`: an ENOSPC anywhere in an exception's chain.
* :func:`atomic_write` / :func:`write_json`: every record of a run (JSON, caches) is written to a
  temporary file beside its target and renamed over it, so a crash never leaves half a file.
* :func:`write_records` / :func:`read_config` / :func:`read_json`: a run's ``config.json`` and
  ``run.json`` (with :func:`versions`), written by training and read by inference.

Inference (``fadjax.sample``, ``fadjax.evaluate``) uses it too, so it imports no training code.
Every error here is a :class:`WorkdirError` whose message is one line for the user.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import pathlib
import platform
import signal
import socket
import subprocess
import threading
import uuid
from typing import Any

from absl import logging

LOCK_NAME = ".lock"


class WorkdirError(RuntimeError):
    """A run cannot go on for a reason its user can act on; the message is one line."""


class WorkdirLocked(WorkdirError):
    """Another live run holds the folder."""


class ConfigDrift(WorkdirError):
    """The rerun's config would change what the folder's run trained."""


class Preempted(WorkdirError):
    """SIGTERM: the run saved a checkpoint at the current step and stopped."""


class DiskFull(WorkdirError):
    """No space left while saving; the previous checkpoint is intact."""


def _process_index() -> int:
    import jax
    return jax.process_index()


def _process_count() -> int:
    import jax
    return jax.process_count()


def _all_agree(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (one small all-gather; free on one process)."""
    if _process_count() == 1:
        return bool(flag)
    import numpy as np
    from jax.experimental import multihost_utils
    return bool(np.max(multihost_utils.process_allgather(np.int32(bool(flag)))))


# ----------------------------------------------------------------------------- lock

class WorkdirLock:
    """An exclusive lock on ``directory`` for one run (process 0 of a multi-process run takes it).

    ``with WorkdirLock(dir, what="training"):`` or :meth:`acquire` / :meth:`release`. A second run
    (another process, or another call in this one) fails at once with :class:`WorkdirLocked` naming
    the holder's pid, host and start time. The lock is an ``flock``: the OS drops it when its holder
    exits, however it exits, so the file left behind never blocks the next run.
    """

    def __init__(self, directory: str | os.PathLike, *, what: str = "run"):
        self.directory = pathlib.Path(directory)
        self.path = self.directory / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        error = None
        if _process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                holder = _read_holder(fd)
                os.close(fd)
                error = (f"{self.directory} is in use by another {self.what} ({holder}); wait for it to end, "
                         f"or use another folder")
            else:
                info = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
                os.fsync(fd)
                self._fd = fd
        # The other processes of a multi-process run stop too when process 0 could not take it.
        if _all_agree(error is not None):
            self.release()
            raise WorkdirLocked(error or f"{self.directory} is in use by another run (see process 0)")
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # No stale holder text; the file itself stays (harmless).
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return f"{info.get('what', 'run')} pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}"


# ----------------------------------------------------------------------------- config drift

# Fields that only observe a run or say where its inputs live: never drift.
OBSERVE_FIELDS = frozenset({
    "train.log_every", "train.checkpoint_every", "train.progress", "train.keep_checkpoints", "train.keep_evenly",
    "train.eval_batch_size", "train.allow_config_change",
    "parallel", "num_devices",  # Every step's batch is drawn globally: the topology does not change it.
    "data.cache", "data.data_dir", "data.manual_dir",
    "data.placement", "data.device_share", "data.prefetch",  # Both input paths give the same batches.
})
OBSERVE_PREFIXES = ("sample.",)  # Sampling settings (a diffusion config's defaults for fadjax.sample).
# Fields that may only grow (a longer run continues the same one).
EXTEND_FIELDS = frozenset({"train.num_steps", "train.num_epochs"})
PATH_FIELDS = frozenset({"align.expert_workdir", "init_from"})


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _plain(config) -> dict:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(d, default=str))  # As config.json stores it (tuples -> lists, ...).


def _same(field: str, a, b) -> bool:
    if field in PATH_FIELDS and isinstance(a, str) and isinstance(b, str):
        return os.path.abspath(a) == os.path.abspath(b)
    return a == b


def config_drift(saved: dict, config, *, allow: bool = False) -> list[dict]:
    """Compares a folder's saved config (``config.json``) with a rerun's, field by field.

    Returns the accepted changes (``{"field", "old", "new", "kind"}``, kind ``extend``, ``observe``
    or ``allowed``) for the run record. Raises :class:`ConfigDrift` naming every field that would
    change what was trained (shapes, data, model, optimizer, seed, ...; ``train.num_steps`` or
    ``train.num_epochs`` downward or switched) unless ``allow``.
    """
    old, new = flatten(_plain(saved)), flatten(_plain(config))
    accepted, drift = [], []
    for field in sorted(set(old) | set(new)):
        a, b = old.get(field), new.get(field)
        if _same(field, a, b):
            continue
        change = {"field": field, "old": a, "new": b}
        if field in OBSERVE_FIELDS or field.startswith(OBSERVE_PREFIXES):
            accepted.append({**change, "kind": "observe"})
        elif field in EXTEND_FIELDS and isinstance(a, int) and isinstance(b, int) and b > a:
            accepted.append({**change, "kind": "extend"})
        elif allow:
            accepted.append({**change, "kind": "allowed"})
        else:
            drift.append(change)
    if drift:
        fields = "; ".join(f"{c['field']} {c['old']!r} -> {c['new']!r}" for c in drift)
        raise ConfigDrift(
            f"the run in {{workdir}} was trained with other settings: {fields}. Use a new --workdir, or pass "
            f"--config.train.allow_config_change=True to continue it with the change (recorded in run.json)")
    return accepted


def check_config_drift(workdir: str | os.PathLike, config, *, allow: bool = False) -> list[dict]:
    """:func:`config_drift` against ``workdir/config.json`` (none there: nothing to compare).

    Returns the accepted changes with the changes recorded before (``run.json``'s ``config_changes``).
    """
    workdir = pathlib.Path(workdir)
    path = workdir / CONFIG_FILE
    if not path.exists():
        return []
    try:
        saved = json.loads(path.read_text())
    except ValueError as e:
        raise WorkdirError(f"{path} cannot be read ({e}); use a new --workdir") from None
    try:
        changes = config_drift(saved, config, allow=allow)
    except ConfigDrift as e:
        raise ConfigDrift(str(e).replace("{workdir}", str(workdir))) from None
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    for c in changes:
        c["time"] = when
        logging.warning("config change accepted on resume (%s): %s %r -> %r", c["kind"], c["field"], c["old"], c["new"])
    return previous_changes(workdir) + changes


def previous_changes(workdir: pathlib.Path) -> list[dict]:
    try:
        return list(json.loads((workdir / RUN_FILE).read_text()).get("config_changes", []))
    except (OSError, ValueError):
        return []


# ----------------------------------------------------------------------------- preemption

_stop = threading.Event()
_stop_signal: list[int] = []


def request_stop(signum: int = signal.SIGTERM) -> None:
    """Asks every training loop of this process to save at its current step and stop."""
    _stop_signal[:] = [int(signum)]
    _stop.set()


def _on_signal(signum, frame) -> None:
    logging.warning("received signal %d: saving a checkpoint at the current step, then stopping", signum)
    request_stop(signum)


_depth = [0]


class install_preemption:
    """``with install_preemption():`` SIGTERM sets the stop flag (main thread only; elsewhere a no-op).

    The previous handler comes back on exit. The outermost entry clears the flag (a nested entry keeps a signal that came
    before it).
    """

    def __enter__(self):
        self._installed = threading.current_thread() is threading.main_thread()
        if self._installed:
            if _depth[0] == 0:
                _stop.clear()
            _depth[0] += 1
            self._previous = signal.signal(signal.SIGTERM, _on_signal)
        return self

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            _depth[0] -= 1


def stop_pending() -> bool:
    """Whether this process was asked to stop (no collective)."""
    return _stop.is_set()


def stop_requested() -> bool:
    """Whether a stop was asked (on any process: every process calls this at the same step)."""
    return _all_agree(_stop.is_set())


def preempted_error(step: int, directory) -> Preempted:
    sig = signal.Signals(_stop_signal[0]).name if _stop_signal else "SIGTERM"
    return Preempted(f"stopped by {sig} at step {step}: checkpoint saved in {directory}; "
                     f"rerun the same command to resume from it")


# ----------------------------------------------------------------------------- disk

def disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or its cause or context) is a full disk (ENOSPC / EDQUOT)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# ----------------------------------------------------------------------------- atomic records

@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Opens a temporary file that replaces ``path`` only if the block completes.

    The folder is created if needed; an interrupted write leaves ``path`` untouched and removes
    the temporary file. The file gets the usual permissions (umask), not a private mode.

    Args:
      path: the file to write.
      mode: 'wb' or 'w'.

    Yields:
      The open temporary file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode.replace("w", "x")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _json_default(o):
    item = getattr(o, "item", None)  # numpy scalars and 0-d arrays.
    return item() if callable(item) and getattr(o, "ndim", 0) == 0 else str(o)


def write_json(path: str | os.PathLike, obj, *, indent: int = 1) -> None:
    """Writes ``obj`` as JSON atomically (numpy scalars as numbers, other objects as their ``str``)."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=indent, default=_json_default)


# ----------------------------------------------------------------------------- run records

CONFIG_FILE = "config.json"  # The resolved config of the run.
RUN_FILE = "run.json"  # Stage, classes, data, expert, versions, accepted config changes.


def read_json(path: str | os.PathLike) -> dict:
    """A record of a run; a missing one raises FileNotFoundError asking whether the folder is a run."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {path.parent} a fadjax run's workdir?")
    return json.loads(path.read_text())


def read_config(workdir: str | os.PathLike):
    """The resolved config a run was trained with (``config.json``)."""
    import ml_collections
    return ml_collections.ConfigDict(read_json(pathlib.Path(workdir) / CONFIG_FILE))


def write_records(workdir: str | os.PathLike, config, record: dict) -> None:
    """Writes ``config.json`` and ``run.json`` (process 0 only; the others share the folder)."""
    if _process_index() != 0:
        return
    write_json(pathlib.Path(workdir) / CONFIG_FILE, config.to_dict(), indent=2)
    write_json(pathlib.Path(workdir) / RUN_FILE, record, indent=2)


VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections", "dm-pix", "numpy", "fadjax")


def versions(*, commit: bool = False) -> dict[str, str]:
    """Python's and the installed packages' versions (``VERSIONED``); with ``commit`` also fadjax's git commit."""
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    if commit:
        root = pathlib.Path(__file__).resolve().parents[1]
        try:
            head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=10)
            if head.returncode == 0:
                dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                       capture_output=True, text=True, timeout=10).stdout.strip()
                out["fadjax_commit"] = head.stdout.strip() + (" (uncommitted changes)" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            pass
    return out
