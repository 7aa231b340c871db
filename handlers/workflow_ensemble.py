"""The function nodes of an ensemble served as a TorchServe workflow (packager/workflow.py builds the .war).

    pre_processing -> [member models, in parallel] -> aggregate

pre_processing asks every member for its logits; aggregate fuses them with the weights of the ensemble's model
card (packed in the .war) and answers as a single model would: label, top-k probabilities, model. A request a
member refused (a corrupt image) gets that member's JSON error, alone. Its status is 200: TorchServe's workflow
executor turns any node's non-200 answer into a 500 for the client, so the error is in the body only.
"""

from __future__ import annotations

import base64
import json
import math
from functools import cache
from pathlib import Path
from typing import Any

from handlers.contract import ModelCard
from handlers.protocols import as_json, body_of

TOPK = 5


@cache
def card(model_dir: str) -> ModelCard:
    return ModelCard.read(Path(model_dir))


def member_request(body: Any) -> dict[str, Any]:
    """The client's body as the members' raw protocol, with their logits asked for."""
    body = as_json(body)
    if isinstance(body, dict):
        return {**body, "return_logits": True}
    if isinstance(body, (bytes, bytearray)):
        return {"data": base64.b64encode(bytes(body)).decode("ascii"), "return_logits": True}
    return {"data": body, "return_logits": True}


def pre_processing(data: list[dict[str, Any]] | None, context: Any) -> list[dict[str, Any]] | None:
    """One member request per client request (None at start-up: TorchServe initializes a function node so)."""
    return [member_request(body_of(row)) for row in data] if data else None


def softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def fuse(answers: dict[str, Any], ensemble: ModelCard) -> dict[str, Any]:
    """Members' answers (node name -> JSON) -> the weighted mean of their probabilities, as one model's answer;
    or the first member's error, when a member refused the input."""
    assert ensemble.fusion is not None
    parsed = {m.dir: as_json(answers[m.dir]) for m in ensemble.fusion.members}
    for name, answer in parsed.items():
        if not isinstance(answer, dict) or "logits" not in answer:
            error = answer.get("error") if isinstance(answer, dict) else None
            return {"error": error or {"code": "member_failed", "message": str(answer)[:300]}, "member": name}
    probs = [0.0] * len(ensemble.labels)
    for member in ensemble.fusion.members:
        answer = parsed[member.dir]
        for i, p in enumerate(softmax(answer["logits"])):
            probs[i] += member.weight * p
    order = sorted(range(len(probs)), key=probs.__getitem__, reverse=True)[:TOPK]
    return {"label": ensemble.labels[order[0]],
            "probabilities": {ensemble.labels[i]: round(probs[i], 6) for i in order},
            "model": {"name": ensemble.name, "version": ensemble.version, "variant": ensemble.variant},
            "members": {name: answer["label"] for name, answer in parsed.items()}}


def aggregate(data: list[dict[str, Any]] | None, context: Any) -> list[str] | None:
    """The members' answers of each request, fused (None at start-up, when it reads the ensemble's card)."""
    ensemble = card(context.system_properties["model_dir"])
    return [json.dumps(fuse(row, ensemble)) for row in data] if data else None
