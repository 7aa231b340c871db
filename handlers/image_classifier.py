"""Image classification: image bytes (or a model-shaped tensor) in, top-k labels out."""

from __future__ import annotations

from typing import Any

import torch

from handlers.base import ModelHandler
from handlers.imaging import SUPPORTED, Normalizer, decode_image, resize_batch


class ImageClassifier(ModelHandler):
    accepts = f"image bytes ({SUPPORTED}), base64 in JSON, or a tensor of the model's input shape"

    def setup(self) -> None:
        self.size = int(self.meta["input_size"])
        self.normalize = Normalizer(self.meta["mean"], self.meta["std"], self.device)
        self.labels: list[str] = self.meta["labels"]

    def input_shape(self) -> tuple[int, ...]:
        return (3, self.size, self.size)

    def decode(self, payload: Any) -> torch.Tensor:
        if isinstance(payload, (bytes, bytearray)):
            return decode_image(payload, int(self.options["max_pixels"]))
        return self.tensor_from_json(payload)

    def collate(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """uint8 images are resized and normalized as one batch; tensors pass as they are."""
        images = [i for i, t in enumerate(tensors) if t.dtype == torch.uint8]
        if len(images) == len(tensors):
            return self.normalize(resize_batch(tensors, self.size))
        batch = torch.stack([t if t.dtype != torch.uint8 else torch.empty(self.input_shape()) for t in tensors])
        batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        if images:
            batch[images] = self.normalize(resize_batch([tensors[i] for i in images], self.size))
        return batch

    def respond(self, output: torch.Tensor, options: dict[str, Any]) -> dict[str, Any]:
        probs = torch.softmax(output, dim=0)
        k = min(int(self.options["topk"]), len(self.labels))
        top = torch.topk(probs, k)
        pairs = zip(top.indices.tolist(), top.values.tolist(), strict=True)
        result: dict[str, Any] = {
            "label": self.labels[int(top.indices[0])],
            "probabilities": {self.labels[i]: round(p, 6) for i, p in pairs},
            "model": {"name": self.model_name, "version": self.version, "variant": self.meta["variant"]},
        }
        if options.get("logits"):
            result["logits"] = [round(float(x), 6) for x in output]
        return result
