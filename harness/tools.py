"""Command-line tools the harness drives (wrk, haproxy), taken from Debian and installed on demand."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def debian_tool(binary: str, package: str | None = None) -> str:
    """Path of `binary`; apt-get installs `package` (default: the binary's name) when it is missing (as root)."""
    package = package or binary
    path = shutil.which(binary)
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit(f"error: {binary} is not installed; install it with: sudo apt-get update && "
                 f"sudo apt-get install -y {package}")
    print(f"installing {package} with apt-get ...", file=sys.stderr)
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            sys.exit(f"error: {' '.join(cmd)} failed ({result.stderr.strip()[-300:]}); install {package} by hand")
    path = shutil.which(binary)
    if not path:
        sys.exit(f"error: apt-get installed {package} but {binary} is not on PATH")
    return path
