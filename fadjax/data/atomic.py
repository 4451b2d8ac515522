"""Atomic file writes: a temporary file beside the target, renamed over it when complete."""
from __future__ import annotations

import contextlib
import os
import uuid


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """Opens a temporary file that replaces `path` only if the block completes.

    The folder is created if needed; an interrupted write leaves `path` untouched and removes
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
