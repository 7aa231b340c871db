"""Regression: a tensor of the model's input shape in, the raw output values out (card.labels names them)."""

from __future__ import annotations

from typing import Any

import torch

from handlers.tasks import Output, Task


class Regression(Task):
    def respond(self, output: torch.Tensor, item: torch.Tensor, options: dict[str, Any]) -> dict[str, Any]:
        """The output values, flattened."""
        return {"values": [round(float(v), 6) for v in output.flatten()]}

    def outputs(self) -> tuple[Output, ...]:
        return (Output("values", "FP32", (len(self.card.labels),)),)


TASK = Regression
