"""Multi-process start-up (``jax.distributed.initialize`` when the user asks for it) and the few
helpers every layer uses to agree across processes."""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging

ENV_COORDINATOR = "FADJAX_COORDINATOR"
ENV_NUM_PROCESSES = "FADJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "FADJAX_PROCESS_ID"


def initialize(*, coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> None:
    """Joins a multi-process JAX job when asked by arguments, environment or ``auto``.

    Args:
      coordinator: ``host:port`` of process 0 (or ``FADJAX_COORDINATOR``).
      num_processes: number of processes (or ``FADJAX_NUM_PROCESSES``).
      process_id: this process's index (or ``FADJAX_PROCESS_ID``).
      auto: call ``jax.distributed.initialize()`` with no arguments (Cloud TPU, SLURM discover it).
    """
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR)
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    if auto:
        jax.distributed.initialize()
    elif coordinator or num_processes or process_id is not None:
        missing = [n for n, v in (("--coordinator", coordinator), ("--num_processes", num_processes),
                                  ("--process_id", process_id)) if v is None]
        if missing:
            raise ValueError(f"multi-process training needs {', '.join(missing)} as well")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} must be in [0, {num_processes})")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    else:
        return
    logging.info("joined a %d-process job as process %d (%d local devices, %d in all)",
                 jax.process_count(), jax.process_index(), jax.local_device_count(), jax.device_count())


def is_main_process() -> bool:
    return jax.process_index() == 0


def agreed_step(step: int) -> int:
    """Process 0's value of ``step`` on every process (all resume from the same checkpoint)."""
    if jax.process_count() == 1:
        return int(step)
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.int32(step)))


def wait_for_all_processes(name: str, timeout_s: float = 1800.0) -> None:
    """Blocks until every process reaches ``name`` (the coordination service's barrier; no collective).

    Called once a train step is compiled: the step's first collective sets up CPU (Gloo) communication
    with a 30 s deadline, which a process still compiling on a loaded machine can miss.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # The client of jax.distributed.initialize (no public handle).
    client = getattr(distributed.global_state, "client", None)
    if client is not None:
        client.wait_at_barrier(f"fadjax_{name}", timeout_in_ms=int(timeout_s * 1000))
