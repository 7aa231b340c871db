"""Call a handler in-process the way a TorchServe worker does: TorchServe's own Context, RequestProcessor and
metrics cache, on an unpacked archive or a model directory."""

from __future__ import annotations

import json
import uuid
import zipfile
from pathlib import Path
from typing import Any

import yaml
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

ROOT = Path(__file__).resolve().parent.parent
METRICS_CONFIG = ROOT / "handlers" / "metrics.yaml"


def unpack_mar(mar: Path, dest: Path) -> Path:
    """The model_dir a worker sees: the archive's files, extracted."""
    with zipfile.ZipFile(mar) as z:
        z.extractall(dest)
    return dest


def make_context(model_dir: Path, batch_size: int = 8, gpu: int | None = None, name: str | None = None,
                 config: dict[str, Any] | None = None) -> Context:
    """A worker's Context for `model_dir`. The archive's manifest and model-config.yaml are used when the
    directory has them (an unpacked .mar); `name` and `config` override them (a model directory)."""
    manifest_file = model_dir / "MAR-INF" / "MANIFEST.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    model_name = name or manifest.get("model", {}).get("modelName") or model_dir.name
    manifest.setdefault("model", {"modelName": model_name, "modelVersion": "in-process"})
    if config is None:
        config_file = model_dir / "model-config.yaml"
        config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    metrics = MetricsCacheYamlImpl(config_file_path=str(METRICS_CONFIG))
    metrics.initialize_cache()
    metrics.model_name = model_name
    metrics.set_request_ids(str(uuid.uuid4()))
    return Context(model_name, str(model_dir), manifest, batch_size, gpu, "0.12.0", metrics=metrics,
                   model_yaml_config=config)


def call(handler: Any, context: Context, rows: list[dict[str, Any]],
         headers: list[dict[str, str]] | None = None) -> list[tuple[int, Any]]:
    """One batch through handler.handle; (status, body) per request, as the frontend would send them."""
    context.request_processor = [RequestProcessor(h) for h in (headers or [{} for _ in rows])]
    context.metrics.set_request_ids({i: f"req-{i}" for i in range(len(rows))})
    out = handler.handle(rows, context)
    if len(out) != len(rows):
        raise AssertionError(f"the handler returned {len(out)} responses for {len(rows)} requests; TorchServe "
                             "needs exactly one per request")
    return [(context.get_response_status(i)[0] or 200, body) for i, body in enumerate(out)]
