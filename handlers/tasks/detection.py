"""Object detection: an image in, labelled boxes out, in the coordinates of the image as a viewer shows it.

The model is a torchvision detector (or its TorchScript), which takes a list of float images of any sizes and
resizes and normalizes them itself; so a batch may mix sizes, and boxes come back in each image's own pixels
(after EXIF orientation, which decoding applies). card.labels[0] is the background class, as in torchvision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from handlers.errors import InputError
from handlers.imaging import SUPPORTED, decode_image
from handlers.tasks import Output, Task, as_str


def unit_interval(value: Any) -> float:
    number = float(as_str(value))
    if not 0 <= number <= 1:
        raise ValueError("send a number from 0 to 1")
    return number


def positive_int(value: Any) -> int:
    number = int(as_str(value))
    if number < 1:
        raise ValueError("send a whole number of at least 1")
    return number


def label_list(value: Any) -> list[str]:
    """A JSON list of labels, or comma-separated labels (a query parameter)."""
    names = value if isinstance(value, list) else as_str(value).split(",")
    return [str(n).strip() for n in names if str(n).strip()]


def detect(model: Callable[[Any], Any], images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The detector on images of any sizes: one call per size. torchvision pads a call's images to the largest, and
    that padding moves boxes near the border, so an image's boxes would depend on what shared its batch."""
    sizes: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        sizes.setdefault(tuple(image.shape), []).append(i)
    found: list[dict[str, torch.Tensor]] = [{}] * len(images)
    for same in sizes.values():
        out = model([images[i] for i in same])
        for i, d in zip(same, out[1] if isinstance(out, tuple) else out, strict=True):  # scripted: (losses, boxes)
            found[i] = d
    return found


class Detection(Task):
    accepts = (f"image bytes ({SUPPORTED}), base64 in JSON, or a float tensor [3, H, W] with values in [0, 1]; "
               "images of any size")
    oip_input = ("image", "BYTES")
    defaults = {"score_threshold": 0.5, "max_detections": 100}
    options = {"score_threshold": unit_interval, "max_detections": positive_int, "classes": label_list}

    def input_shape(self) -> tuple[int, ...]:
        return (3, -1, -1)

    def read_options(self, given: dict[str, Any]) -> dict[str, Any]:
        """As every task's, and each class named in `classes` must be one of the model's labels."""
        parsed = super().read_options(given)
        unknown = sorted(set(parsed.get("classes") or ()) - set(self.card.labels[1:]))
        if unknown:
            raise InputError("bad_option", f"classes {unknown[:5]} are not labels of this model; it detects "
                             f"{self.card.labels[1:][:20]}", 422)
        return parsed

    def decode(self, payload: Any) -> torch.Tensor:
        if isinstance(payload, (bytes, bytearray)):
            return decode_image(payload, int(self.settings["max_pixels"]))
        return self.tensor_from_json(payload)

    def batch(self, items: list[torch.Tensor]) -> list[torch.Tensor]:
        """Images stay a list: the detector resizes each itself, so sizes may differ."""
        return [(t.float() / 255 if t.dtype == torch.uint8 else t).to(self.device) for t in items]

    def predict(self, model: Callable[[Any], Any], batch: Any) -> Any:
        return detect(model, batch)

    def unbatch(self, output: Any) -> list[Any]:
        return [{k: v.detach().float().cpu() if k != "labels" else v.cpu() for k, v in d.items()} for d in output]

    def respond(self, output: dict[str, torch.Tensor], item: torch.Tensor, options: dict[str, Any]) -> dict[str, Any]:
        """Boxes over the score threshold, best first, at most max_detections, of the asked classes only."""
        threshold = options.get("score_threshold", self.settings["score_threshold"])
        limit = options.get("max_detections", self.settings["max_detections"])
        wanted = set(options.get("classes") or ())
        labels = self.card.labels
        detections = []
        order = torch.argsort(output["scores"], descending=True).tolist()
        for i in order:
            score, label = float(output["scores"][i]), labels[int(output["labels"][i])]
            if score < threshold or (wanted and label not in wanted):
                continue
            box = [round(float(v), 2) for v in output["boxes"][i]]
            detections.append({"label": label, "score": round(score, 6), "box": box})
            if len(detections) == limit:
                break
        return {"detections": detections, "image_size": [int(item.shape[-1]), int(item.shape[-2])]}

    def outputs(self) -> tuple[Output, ...]:
        return (Output("boxes", "FP32", (-1, 4)), Output("scores", "FP32", (-1,)),
                Output("labels", "BYTES", (-1,), ""), Output("count", "INT32", ()))

    def tensors(self, answer: dict[str, Any]) -> dict[str, Any]:
        found = answer["detections"]
        return {"boxes": [d["box"] for d in found], "scores": [d["score"] for d in found],
                "labels": [d["label"] for d in found], "count": len(found)}

    def example(self) -> torch.Tensor:
        side = self.card.input.shape[-1]
        return torch.zeros((3, side, side), dtype=torch.uint8)


TASK = Detection
