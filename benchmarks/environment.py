"""The machine and the software a benchmark ran on, recorded beside its figures."""

from __future__ import annotations

import importlib.metadata as im
import os
import platform
from typing import Any

import psutil
import torch

from benchmarks.tools import CAPTUM_DIR, version
from handlers.machine import cpu_flags, cpu_model


def machine() -> dict[str, Any]:
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cpus": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}


def versions() -> dict[str, str]:
    def dist(name: str) -> str:
        try:
            return im.version(name)
        except im.PackageNotFoundError:
            return "missing"

    captum = next(CAPTUM_DIR.glob("captum-*.dist-info"), None)
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": dist("torchvision"),
            "torchserve": dist("torchserve"), "torch-model-archiver": dist("torch-model-archiver"),
            "captum": captum.name.removeprefix("captum-").removesuffix(".dist-info") if captum else "missing",
            "wrk": version(["wrk", "--version"]).split(" [")[0].replace("debian/", ""),
            "java": version(["java", "-version"])}



