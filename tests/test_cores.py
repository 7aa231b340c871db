"""The core lease (handlers/cores.py) across real processes and real fcntl locks."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from handlers.cores import OPENMP_ENV, CorePool

CORES = len(os.sched_getaffinity(0))


def _holder(directory: str, cores: int, held: mp.Event, release: mp.Event) -> None:
    pool = CorePool(cores=cores, directory=Path(directory))
    with pool.lease() as n:  # nothing else holds these cores, so the lease takes them all
        assert n == cores
        held.set()
        release.wait(60)


@contextlib.contextmanager
def hold_cores(directory: Path, cores: int) -> Iterator[mp.Process]:
    """Another process (another worker, as far as the pool can tell) holds cores 0..cores-1 until exit."""
    ctx = mp.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_holder, args=(str(directory), cores, held, release), daemon=True)
    proc.start()
    try:
        assert held.wait(60), "the holder process never got its cores"
        yield proc
    finally:
        if proc.is_alive():  # never touch the Event after a SIGKILL: the dead holder may own its lock
            release.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def test_a_lone_lease_takes_every_core(tmp_path: Path) -> None:
    pool = CorePool(directory=tmp_path)
    with pool.lease() as n:
        assert n == CORES


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores to split them")
def test_a_lease_takes_only_the_cores_nobody_holds(tmp_path: Path) -> None:
    pool = CorePool(directory=tmp_path)
    with hold_cores(tmp_path, 1):
        with pool.lease() as n:
            assert n == CORES - 1
    with pool.lease() as n:
        assert n == CORES


def test_with_every_core_held_a_lease_waits_until_one_is_free(tmp_path: Path) -> None:
    pool = CorePool(directory=tmp_path)
    got: list[int] = []

    def lease() -> None:
        with pool.lease() as n:
            got.append(n)

    with hold_cores(tmp_path, CORES):
        waiter = threading.Thread(target=lease, daemon=True)
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not got  # it cannot have a core while the holder has them all
    waiter.join(30)
    assert got and got[0] >= 1


def test_a_killed_worker_gives_its_cores_back(tmp_path: Path) -> None:
    pool = CorePool(directory=tmp_path)
    with hold_cores(tmp_path, CORES) as holder:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        with pool.lease() as n:
            assert n == CORES


def run_help(command: str, env: dict[str, str]) -> tuple[list[str], str]:
    """`python -m COMMAND --help` as a `-c` script that first prints the OPENMP_ENV it sees: (env lines, stderr)."""
    show = ("import os, runpy, sys; sys.argv = [sys.argv[0], '--help']; "
            f"print('env', *(os.environ.get(k) for k in {sorted(OPENMP_ENV)!r})); "
            f"runpy.run_module({command!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", show], env=env, cwd=Path(__file__).resolve().parent.parent,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return [line for line in r.stdout.splitlines() if line.startswith("env ")], r.stderr


BARE = {k: v for k, v in os.environ.items() if k not in OPENMP_ENV}
TIMING_COMMANDS = ("benchmarks.run", "benchmarks.inprocess", "training.optimize")
USER_SET = {**BARE, **{k: "1" for k in OPENMP_ENV}}


@pytest.fixture(scope="module")
def help_runs() -> dict[tuple[str, bool], tuple[list[str], str]]:
    """run_help of each timing command without OPENMP_ENV, and of one with the user's own value, all at once
    (each imports torch twice, mostly waiting on the disk)."""
    runs = [(c, False) for c in TIMING_COMMANDS] + [("benchmarks.inprocess", True)]
    with cf.ThreadPoolExecutor(len(runs)) as pool:
        return dict(zip(runs, pool.map(lambda r: run_help(r[0], USER_SET if r[1] else BARE), runs), strict=True))


@pytest.mark.parametrize("command", TIMING_COMMANDS)
def test_commands_that_time_in_process_restart_with_the_servers_openmp_setting(command: str, help_runs) -> None:
    """libgomp reads OPENMP_ENV once, when torch loads, so a timing command started without it restarts with it."""
    lines, stderr = help_runs[command, False]
    restarted = " ".join(f"{k}={v}" for k, v in sorted(OPENMP_ENV.items()))
    assert f"restarting with {restarted}" in stderr, stderr[-2000:]
    assert lines == ["env None", f"env {' '.join(v for _, v in sorted(OPENMP_ENV.items()))}"]


def test_an_openmp_setting_the_user_made_is_kept(help_runs) -> None:
    lines, stderr = help_runs["benchmarks.inprocess", True]
    assert "restarting" not in stderr and lines == ["env 1"], (lines, stderr[-2000:])
