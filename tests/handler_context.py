"""Run a handler in-process the way a TorchServe worker does: real Context, RequestProcessor and metrics cache."""

from __future__ import annotations

import json
import uuid
import zipfile
from pathlib import Path
from typing import Any

import yaml
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from tests.conftest import ROOT


def unpack_mar(mar: Path, dest: Path) -> Path:
    """The model_dir a worker sees: the archive's files, extracted."""
    with zipfile.ZipFile(mar) as z:
        z.extractall(dest)
    return dest


def make_context(model_dir: Path, batch_size: int = 8, gpu: int | None = None) -> Context:
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    yaml_cfg = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    metrics = MetricsCacheYamlImpl(config_file_path=str(ROOT / "handlers" / "metrics.yaml"))
    metrics.initialize_cache()
    metrics.model_name = manifest["model"]["modelName"]
    metrics.set_request_ids(str(uuid.uuid4()))
    return Context(manifest["model"]["modelName"], str(model_dir), manifest, batch_size, gpu, "0.12.0",
                   metrics=metrics, model_yaml_config=yaml_cfg)


def call(handler: Any, context: Context, rows: list[dict[str, Any]],
         headers: list[dict[str, str]] | None = None) -> list[tuple[int, Any]]:
    """One batch through handler.handle; returns (status, body) per request, as the frontend would send."""
    context.request_processor = [RequestProcessor(h) for h in (headers or [{} for _ in rows])]
    context.metrics.set_request_ids({i: f"req-{i}" for i in range(len(rows))})
    out = handler.handle(rows, context)
    assert len(out) == len(rows), "a handler must return exactly one response per request"
    statuses = []
    for i in range(len(rows)):
        code, _ = context.get_response_status(i)
        statuses.append(code or 200)
    return list(zip(statuses, out, strict=True))
