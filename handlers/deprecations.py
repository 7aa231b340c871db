"""Targeted filters for deprecation warnings we have decided to live with.

torch 2.14 deprecates every `torch.jit.*` entry point and torchvision 0.29 its image codecs.
TorchScript is still the format TorchServe 0.12 loads without Python model code, and
torchvision.io is the fastest decoder installed, so we silence exactly those messages
(each printed once per call, dozens per export) and nothing else.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

_JIT = r"`torch\.jit\.\w+` is deprecated"
_TV_IO = r"The image decoding and encoding capabilities of TorchVision are deprecated"


@contextlib.contextmanager
def known_deprecations() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT, category=FutureWarning)
        warnings.filterwarnings("ignore", message=_TV_IO, category=DeprecationWarning)
        yield
