"""What machine this is, as far as kernels care: the CPU model, the ISA flags that pick int8/bf16 kernels, the GPU.

Variants are timed and picked on one machine; the handler compares this fingerprint with the one the pick was
made on and warns when an archive is served somewhere else. Standard library only, plus torch when it is loaded.
"""

from __future__ import annotations

import contextlib
import platform
import sys
from pathlib import Path
from typing import Any

# Flags that change which kernels ONNX Runtime, OpenVINO, oneDNN and fbgemm pick.
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
                "avx_vnni")


def _cpuinfo() -> dict[str, str]:
    with contextlib.suppress(OSError):
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        return fields
    return {}


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The kernel-relevant ISA flags this CPU has, in KERNEL_FLAGS order."""
    present = set(_cpuinfo().get("flags", "").split())
    return [f for f in KERNEL_FLAGS if f in present]


def gpu_name() -> str | None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_name(0))


def fingerprint() -> dict[str, Any]:
    """{"cpu", "cpu_flags", "gpu"}: what a variant's timings and pick hold for."""
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "gpu": gpu_name()}


def differences(recorded: dict[str, Any], here: dict[str, Any] | None = None) -> list[str]:
    """How this machine differs from `recorded` (empty when the same model of machine)."""
    here = here or fingerprint()
    return [f"{key} {recorded.get(key)!r} there, {here.get(key)!r} here" for key in ("cpu", "cpu_flags", "gpu")
            if key in recorded and recorded.get(key) != here.get(key)]


def cpu_label(recorded: dict[str, Any]) -> str:
    """A recorded machine's CPU as reports name it: the model and its kernel-relevant flags (one model name covers
    several generations on cloud VMs, e.g. "AMD EPYC" with AVX2 only, or with AVX512-VNNI/BF16)."""
    flags = recorded.get("cpu_flags")
    return f"{recorded['cpu']} ({', '.join(flags) or 'no AVX2'})" if flags is not None else str(recorded["cpu"])
