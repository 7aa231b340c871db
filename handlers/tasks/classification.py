"""Classification: an image (or a tensor of the model's input shape) in, top-k labels with probabilities out.

A card whose input is a square RGB image [3, S, S] takes image bytes in every format handlers/imaging.py reads;
any other input shape takes tensors only.
"""

from __future__ import annotations

from typing import Any

import torch

from handlers.errors import InputError
from handlers.imaging import (
    SUPPORTED,
    Normalizer,
    decode_image,
    decode_jpegs_on,
    probe_image,
    resize_batch,
)
from handlers.tasks import Output, Task, flag


class Classification(Task):
    defaults = {"topk": 5, "gpu_decode": False}
    options = {"return_logits": flag}

    def setup(self) -> None:
        self.images = self.card.input.is_image
        if self.images:
            self.accepts = f"image bytes ({SUPPORTED}), base64 in JSON, or a tensor of the model's input shape"
            self.oip_input = ("image", "BYTES")  # FP32 tensors of the input shape are accepted too
            self.size = self.card.input.image_size
            self.normalize = Normalizer(self.card.input.mean, self.card.input.std, self.device)
        # nvjpeg batch decoding pays off for large models on GPU; CPU workers always use libjpeg-turbo.
        self.gpu_decode = self.images and bool(self.settings["gpu_decode"]) and self.device.type == "cuda"
        self.k = min(int(self.settings["topk"]), len(self.card.labels))

    def decode(self, payload: Any) -> torch.Tensor:
        if self.images and isinstance(payload, (bytes, bytearray)):
            if self.gpu_decode and probe_image(payload, int(self.settings["max_pixels"]))[0] == "JPEG":
                return torch.frombuffer(bytearray(payload), dtype=torch.uint8)  # 1-D: decoded in decode_batch
            return decode_image(payload, int(self.settings["max_pixels"]))
        return self.tensor_from_json(payload)

    def decode_batch(self, items: list[torch.Tensor]) -> list[torch.Tensor | InputError]:
        """JPEG bytes left by decode (gpu_decode) are decoded together on the device, in one call."""
        out: list[torch.Tensor | InputError] = list(items)
        jpegs = [i for i, t in enumerate(items) if t.ndim == 1 and t.dtype == torch.uint8] if self.gpu_decode else []
        if not jpegs:
            return out
        try:
            images: list[torch.Tensor | InputError] = list(decode_jpegs_on(self.device, [items[i] for i in jpegs]))
        except RuntimeError:  # one damaged JPEG fails the whole call: decode one by one to find it
            images = [self.decode_jpeg(items[i]) for i in jpegs]
        for i, image in zip(jpegs, images, strict=True):
            out[i] = image
        return out

    def decode_jpeg(self, blob: torch.Tensor) -> torch.Tensor | InputError:
        try:
            return decode_jpegs_on(self.device, [blob])[0]
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or [""])[0]
            return InputError("corrupt_image", f"the JPEG image could not be decoded (truncated or corrupt): {first}")

    def batch(self, items: list[torch.Tensor]) -> torch.Tensor:
        """Images are resized and normalized as one batch (on the GPU when decoded there); tensors pass as they are."""
        if not self.images:
            return super().batch(items)
        images = [i for i, t in enumerate(items) if t.dtype == torch.uint8]
        device = self.device if any(t.device.type != "cpu" for t in items) else "cpu"
        if len(images) == len(items):
            return self.normalize(resize_batch(items, self.size, device))
        batch = torch.stack([t.cpu() if t.dtype != torch.uint8 else torch.empty(self.input_shape()) for t in items])
        batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        if images:
            batch[images] = self.normalize(resize_batch([items[i] for i in images], self.size, device))
        return batch

    def respond(self, output: torch.Tensor, item: torch.Tensor, options: dict[str, Any]) -> dict[str, Any]:
        """Top-k labels with probabilities, and the raw logits when asked."""
        labels = self.card.labels
        top = torch.topk(torch.softmax(output, dim=0), self.k)
        pairs = zip(top.indices.tolist(), top.values.tolist(), strict=True)
        answer: dict[str, Any] = {"label": labels[int(top.indices[0])],
                                  "probabilities": {labels[i]: round(p, 6) for i, p in pairs}}
        if options.get("return_logits") or "logits" in (options.get("outputs") or ()):
            answer["logits"] = [round(float(x), 6) for x in output]
        return answer

    def outputs(self) -> tuple[Output, ...]:
        return (Output("labels", "BYTES", (self.k,), ""), Output("probabilities", "FP32", (self.k,)),
                Output("logits", "FP32", (len(self.card.labels),)))

    def tensors(self, answer: dict[str, Any]) -> dict[str, Any]:
        named = {"labels": list(answer["probabilities"]), "probabilities": list(answer["probabilities"].values())}
        return {**named, **({"logits": answer["logits"]} if "logits" in answer else {})}


TASK = Classification
