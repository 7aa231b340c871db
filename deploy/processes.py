"""The processes the serving stack starts and watches: stopping one or a whole process group, finding a process
tree or group, TorchServe's process roles and their CPU time, free loopback ports, and waiting with a deadline.
The pod, the test harness and the benchmarks all start TorchServe, so they share these."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import psutil

T = TypeVar("T")


def poll_until(predicate: Callable[[], T | None], timeout: float, interval: float, what: str | Callable[[], str],
               proc: subprocess.Popen[bytes] | None = None) -> T:
    """`predicate()`'s first truthy answer, asked every `interval` s; fails with `what` (a message, or what makes
    one) after `timeout` s (TimeoutError), or at once if `proc` has exited (RuntimeError)."""
    deadline = time.monotonic() + timeout
    while not (answer := predicate()):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(what() if callable(what) else what)
        if time.monotonic() > deadline:
            raise TimeoutError(what() if callable(what) else what)
        time.sleep(interval)
    return answer


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct free ports on `host`: all are held open until all are chosen, so no two can be the same."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]


def free_port(host: str = "127.0.0.1") -> int:
    """One free port on `host`."""
    return free_ports(1, host)[0]


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM one process, SIGKILL it if it is still there after `timeout` seconds."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM the process group `proc` leads, then wait for all of it (TorchServe's launcher exits before Java
    and the workers), SIGKILL whatever is left after `timeout`."""
    group = proc.pid
    if proc.poll() is None:
        try:
            os.killpg(group, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    deadline = time.monotonic() + timeout
    while alive(process_group(group)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(process_group(group)):
        os.killpg(group, signal.SIGKILL)
    proc.wait()


def kill(processes: Sequence[psutil.Process], timeout: float = 10) -> None:
    """SIGKILL every one of `processes`, then wait up to `timeout` seconds for them to be gone."""
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=timeout)


def process_group(group: int) -> list[psutil.Process]:
    """The processes in process group `group`, zombies included."""
    members = []
    for p in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            if os.getpgid(p.pid) == group:
                members.append(p)
    return members


def process_tree(pid: int) -> list[psutil.Process]:
    """`pid` and all its descendants; empty once it is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def is_alive(p: psutil.Process) -> bool:
    """Running, and not a zombie waiting to be reaped."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def alive(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Those of `processes` that are alive (see is_alive)."""
    return [p for p in processes if is_alive(p)]


def torchserve_role(p: psutil.Process) -> str | None:
    """"frontend" for TorchServe's Java frontend, "workers" for one of its Python workers, else (or gone) None."""
    try:
        if "java" in p.name():
            return "frontend"
        return "workers" if "model_service_worker" in " ".join(p.cmdline()) else None
    except psutil.Error:
        return None


def torchserve_roles(processes: Iterable[psutil.Process]) -> dict[str, list[psutil.Process]]:
    """TorchServe's processes among `processes` by role: "frontend" (Java) and "workers" (Python)."""
    roles: dict[str, list[psutil.Process]] = {"frontend": [], "workers": []}
    for p in processes:
        role = torchserve_role(p)
        if role is not None:
            roles[role].append(p)
    return roles


def cpu_seconds(processes: Iterable[psutil.Process]) -> dict[int, float]:
    """User + system CPU seconds so far of each of `processes` still there, by pid."""
    out = {}
    for p in processes:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out
