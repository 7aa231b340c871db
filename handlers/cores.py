"""Workers lease the machine's cores per batch: a lone batch runs on every free core, busy workers split them.

A fixed split (cores / workers threads each) leaves all but one core idle when one request is in flight;
torch's default (every core in every worker) oversubscribes as soon as two workers are busy. A lease gives
both: each core is a lock file shared by every worker on this machine (all models, all servers of this
user), a batch takes the free ones, and waits for one only when none is free. fcntl locks die with their
process, so a killed worker never keeps a core.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

# A released core is not free while the worker's idle OpenMP threads spin on it (libgomp busy-waits 300000 rounds
# after each parallel region), so the next worker's batch would run on contended cores (docs/experiments.md).
# libgomp reads this once, when torch loads, and workers inherit the frontend's environment: start the server with it.
OPENMP_ENV = {"GOMP_SPINCOUNT": "10000"}


def openmp_env_missing() -> list[str]:
    """The OPENMP_ENV settings this process was started without."""
    return [k for k in OPENMP_ENV if k not in os.environ]


def restart_with_openmp_env() -> None:
    """Re-run this command with the OPENMP_ENV settings it was started without, so that timings taken in-process
    spin as served workers do. libgomp reads them once, when torch loads; the restarted process loads it afresh."""
    missing = {k: OPENMP_ENV[k] for k in openmp_env_missing()}
    if missing:
        print(f"restarting with {' '.join(f'{k}={v}' for k, v in missing.items())}, as served workers run",
              file=sys.stderr, flush=True)
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **missing})


def default_dir() -> Path:
    """Shared by every worker of this user on this machine; /dev/shm when there is one (never on disk)."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"torchserve-cores-{os.getuid()}"


class CorePool:
    """The machine's cores as lock files; `lease` is the only verb."""

    def __init__(self, cores: int | None = None, directory: Path | None = None) -> None:
        self.cores = cores or len(os.sched_getaffinity(0))
        self.directory = directory or default_dir()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.fds = [os.open(self.directory / f"core-{i}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                    for i in range(self.cores)]
        self.start = os.getpid() % self.cores  # where this worker looks first, so workers spread out

    @contextlib.contextmanager
    def lease(self) -> Iterator[int]:
        """Hold every free core (at least one) for one batch, and yield how many."""
        held: list[int] = []
        order = self.fds[self.start:] + self.fds[:self.start]
        try:
            for fd in order:
                with contextlib.suppress(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held.append(fd)
            if not held:  # every core busy: wait for ours; a waiter holds nothing, so none can deadlock
                fcntl.flock(order[0], fcntl.LOCK_EX)
                held.append(order[0])
            yield len(held)
        finally:
            for fd in held:
                fcntl.flock(fd, fcntl.LOCK_UN)
