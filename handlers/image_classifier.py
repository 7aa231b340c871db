"""Image classification: image bytes (or a model-shaped tensor) in, top-k labels out."""

from __future__ import annotations

from typing import Any

import torch

from handlers.base import ModelHandler
from handlers.imaging import SUPPORTED, Normalizer, decode_image, decode_jpegs_on, probe_image, resize_batch


class ImageClassifier(ModelHandler):
    accepts = f"image bytes ({SUPPORTED}), base64 in JSON, or a tensor of the model's input shape"

    def setup(self) -> None:
        self.size = int(self.meta["input_size"])
        self.normalize = Normalizer(self.meta["mean"], self.meta["std"], self.device)
        # nvjpeg batch decoding pays off for large models on GPU; CPU workers always use libjpeg-turbo.
        self.gpu_decode = bool(self.options.get("gpu_decode")) and self.device.type == "cuda"

    def input_shape(self) -> tuple[int, ...]:
        return (3, self.size, self.size)

    def decode(self, payload: Any) -> torch.Tensor:
        if isinstance(payload, (bytes, bytearray)):
            if self.gpu_decode and probe_image(payload, int(self.options["max_pixels"]))[0] == "JPEG":
                return torch.frombuffer(bytearray(payload), dtype=torch.uint8)  # 1-D: decoded in collate
            return decode_image(payload, int(self.options["max_pixels"]))
        return self.tensor_from_json(payload)

    def collate(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Images are decoded (GPU JPEGs), resized and normalized as one batch; tensors pass as they are."""
        jpegs = [i for i, t in enumerate(tensors) if t.ndim == 1]
        if jpegs:
            tensors = list(tensors)
            for i, image in zip(jpegs, decode_jpegs_on(self.device, [tensors[i] for i in jpegs]), strict=True):
                tensors[i] = image
        images = [i for i, t in enumerate(tensors) if t.dtype == torch.uint8]
        device = self.device if jpegs else "cpu"
        if len(images) == len(tensors):
            return self.normalize(resize_batch(tensors, self.size, device))
        batch = torch.stack([t.cpu() if t.dtype != torch.uint8 else torch.empty(self.input_shape()) for t in tensors])
        batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        if images:
            batch[images] = self.normalize(resize_batch([tensors[i] for i in images], self.size, device))
        return batch
