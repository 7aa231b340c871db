"""Continue an interrupted training run from the state written after every finished epoch.

The state holds the weights, optimizer, schedule, best epoch so far, history and the random streams, so a resumed
single-process run ends with the same weights as one that was never interrupted. It loads with weights_only=True
and is refused when the run's options or data differ from the ones that wrote it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "train_state.pt"


class EpochState:
    """Where one run keeps its per-epoch state, and the options (`key`) a resume must match."""

    def __init__(self, out: Path, key: dict[str, Any]):
        self.path = out / STATE_FILE
        self.key = key

    def load(self) -> dict[str, Any] | None:
        """The saved state, None when there is none; a ValueError when it belongs to a different run."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # a half-written or foreign file
            raise ValueError(f"{self.path} cannot be read ({e}); pass --overwrite to start over") from e
        differ = {k: (state["key"].get(k), v) for k, v in self.key.items() if state["key"].get(k) != v}
        if differ:
            listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(differ.items()))
            raise ValueError(f"{self.path} was written by a run with other options or data ({listed}); rerun with "
                             "the same options to continue it, or pass --overwrite to start over")
        return state

    def save(self, **state: Any) -> None:
        """Write atomically, so an interruption mid-write leaves the previous epoch's state."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        torch.save({"key": self.key, **state}, partial)
        os.replace(partial, self.path)

    def finish(self) -> None:
        """The run completed: its state is no longer needed."""
        self.path.unlink(missing_ok=True)


def describe(state: dict[str, Any]) -> str:
    return f"epoch {state['epoch']} of {state['key'].get('epochs', '?')}"
