"""Tensor in, classes or values out: for models on features rather than images.

The model card gives the input shape (one item, e.g. [64]) and the task: classification (top-k
labels, as the base handler answers) or regression (the raw output values).
"""

from __future__ import annotations

from typing import Any

import torch

from handlers.base import ModelHandler


class TensorClassifier(ModelHandler):
    accepts = 'JSON {"data": nested lists matching the model input shape}, or KServe v1/v2 tensors'

    def outputs(self) -> tuple[str, ...]:
        """Regression answers one tensor of values; classification, the base's labels and probabilities."""
        return ("values",) if self.card.task == "regression" else super().outputs()

    def respond(self, output: torch.Tensor, options: dict[str, Any]) -> dict[str, Any]:
        if self.card.task == "regression":
            return {"values": [round(float(v), 6) for v in output.flatten()], "model": self.model_card_ref()}
        return super().respond(output, options)
