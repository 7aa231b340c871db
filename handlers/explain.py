"""Saliency for the top label with Captum's Integrated Gradients, on the fp32 parent packed by build_mar.sh --explain.

Captum is optional: it is imported only when an explanation is asked for, and its absence is a 501 that says how
to install it, never a failed import of the handler.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import torch

from handlers.contract import Explainer
from handlers.errors import InputError
from handlers.loading import load_state_dict, model_from_state_dict

GRID = 56  # the saliency map's largest side, in cells: 3,136 numbers instead of the input's 50,176
STEPS = 32  # Integrated Gradients' path steps


def require_captum() -> Any:
    try:
        from captum.attr import IntegratedGradients
    except ImportError as e:
        raise InputError("explanations_unavailable", f"explanations need Captum in the worker's environment "
                         f"({e}); install it there (pip install captum==0.9.0) and restart TorchServe", 501) from e
    return IntegratedGradients


class Saliency:
    """The float model and Integrated Gradients over it, built on the first explanation."""

    def __init__(self, model_dir: Path, explainer: Explainer, num_classes: int, device: torch.device) -> None:
        integrated_gradients = require_captum()
        state = load_state_dict(model_dir / explainer.checkpoint)
        self.model = model_from_state_dict(explainer.architecture, num_classes, state).to(device).eval()
        self.method = integrated_gradients(self.model)
        self.explainer = explainer

    def __call__(self, batch: torch.Tensor, baseline: torch.Tensor) -> dict[str, Any]:
        """One normalized image [1, C, H, W] -> its top label's saliency, pooled to at most GRID x GRID."""
        with torch.no_grad():
            probs = torch.softmax(self.model(batch).float(), 1)[0]
        target = int(probs.argmax())
        attributions, delta = self.method.attribute(batch, baselines=baseline, target=target, n_steps=STEPS,
                                                    internal_batch_size=STEPS, return_convergence_delta=True)
        saliency = attributions[0].detach().float().abs().sum(0, keepdim=True)[None]  # [1, 1, H, W]
        side = min(GRID, saliency.shape[-1])
        grid = torch.nn.functional.adaptive_avg_pool2d(saliency, (side, side))[0, 0]
        grid = grid / grid.sum().clamp_min(1e-12)  # a share of the total: comparable between images
        return {"target": target, "probability": round(float(probs[target]), 6), "grid": grid,
                "method": "integrated_gradients", "n_steps": STEPS,
                "convergence_delta": round(float(delta.abs().max()), 6),
                "explained_with": {"variant": self.explainer.variant, "architecture": self.explainer.architecture}}


def overlay_png(image: torch.Tensor, grid: torch.Tensor) -> str:
    """The input (uint8 [C, H, W]) in grey with the saliency in red, as base64 PNG."""
    from PIL import Image

    grey = image.float().mean(0) if image.ndim == 3 else image.float()
    heat = torch.nn.functional.interpolate(grid[None, None], size=grey.shape, mode="bilinear")[0, 0]
    heat = heat / heat.max().clamp_min(1e-12)
    rgb = torch.stack([torch.maximum(grey, 255 * heat), grey * (1 - heat), grey * (1 - heat)], -1)
    buffer = io.BytesIO()
    Image.fromarray(rgb.clamp(0, 255).to(torch.uint8).numpy()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
