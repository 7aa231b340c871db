"""Image classification: image bytes (or a model-shaped tensor) in, top-k labels out."""

from __future__ import annotations

from typing import Any

import torch

from handlers.base import ModelHandler
from handlers.errors import InputError
from handlers.imaging import SUPPORTED, Normalizer, decode_image, decode_jpegs_on, probe_image, resize_batch


class ImageClassifier(ModelHandler):
    accepts = f"image bytes ({SUPPORTED}), base64 in JSON, or a tensor of the model's input shape"
    oip_input = ("image", "BYTES")  # FP32 tensors of the input shape are accepted too

    def setup(self) -> None:
        self.size = self.card.input.image_size
        self.normalize = Normalizer(self.card.input.mean, self.card.input.std, self.device)
        # nvjpeg batch decoding pays off for large models on GPU; CPU workers always use libjpeg-turbo.
        self.gpu_decode = bool(self.options.get("gpu_decode")) and self.device.type == "cuda"

    def input_shape(self) -> tuple[int, ...]:
        return (3, self.size, self.size)

    def decode(self, payload: Any) -> torch.Tensor:
        if isinstance(payload, (bytes, bytearray)):
            if self.gpu_decode and probe_image(payload, int(self.options["max_pixels"]))[0] == "JPEG":
                return torch.frombuffer(bytearray(payload), dtype=torch.uint8)  # 1-D: decoded in decode_batch
            return decode_image(payload, int(self.options["max_pixels"]))
        return self.tensor_from_json(payload)

    def decode_batch(self, tensors: list[torch.Tensor]) -> list[torch.Tensor | InputError]:
        """JPEG bytes left by decode (gpu_decode) are decoded together on the device, in one call."""
        out: list[torch.Tensor | InputError] = list(tensors)
        jpegs = [i for i, t in enumerate(tensors) if t.ndim == 1]
        if not jpegs:
            return out
        try:
            images: list[torch.Tensor | InputError] = list(decode_jpegs_on(self.device, [tensors[i] for i in jpegs]))
        except RuntimeError:  # one damaged JPEG fails the whole call: decode one by one to find it
            images = [self.decode_jpeg(tensors[i]) for i in jpegs]
        for i, image in zip(jpegs, images, strict=True):
            out[i] = image
        return out

    def decode_jpeg(self, blob: torch.Tensor) -> torch.Tensor | InputError:
        try:
            return decode_jpegs_on(self.device, [blob])[0]
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or [""])[0]
            return InputError("corrupt_image", f"the JPEG image could not be decoded (truncated or corrupt): {first}")

    def collate(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Images are resized and normalized as one batch (on the GPU when decoded there); tensors pass as they are."""
        images = [i for i, t in enumerate(tensors) if t.dtype == torch.uint8]
        device = self.device if any(t.device.type != "cpu" for t in tensors) else "cpu"
        if len(images) == len(tensors):
            return self.normalize(resize_batch(tensors, self.size, device))
        batch = torch.stack([t.cpu() if t.dtype != torch.uint8 else torch.empty(self.input_shape()) for t in tensors])
        batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        if images:
            batch[images] = self.normalize(resize_batch([tensors[i] for i in images], self.size, device))
        return batch
