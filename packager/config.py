"""The model-config.yaml an archive packs: handlers/model-config.yaml, with a variant's tuned-config.yaml (the
tuner's choice for it) over it, refused when TorchServe would read a value differently from what it says; and
the writer the tuner uses to change those keys in place. `./build_mar.sh MODEL_DIR --check` prints the
model-config.yaml a build would pack.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "handlers" / "model-config.yaml"
TUNED_FILE = "tuned-config.yaml"  # in a model or variant directory: benchmarks.tune --for-variant's choice for it
TUNED_KEYS = {"batchSize", "maxBatchDelay", "minWorkers", "maxWorkers", "handler"}
TUNED_HANDLER_KEYS = {"threads"}


def check_config(cfg: dict, path: Path) -> None:
    """Refuse model-config values TorchServe 0.12 reads differently from what they say."""
    if cfg.get("asyncCommunication"):
        # AsyncBatchAggregator forgets a job only on a final streaming chunk: every plain answer stays in the heap.
        raise ValueError(f"{path}: asyncCommunication is TorchServe's mode for streaming engines (vLLM): its frontend "
                         "keeps every answered non-streaming request in memory, and these handlers answer "
                         "synchronously. Remove it; batching is batchSize and maxBatchDelay (1 ms is the shortest)")
    if cfg.get("maxBatchDelay") == 0 and int(cfg.get("batchSize", 1)) > 1:
        # ModelManagerImpl takes the archive's maxBatchDelay only when > 0; 0 falls back to its 100 ms default
        # (measured: a lone request took 135 ms instead of ~30).
        raise ValueError(f"{path}: maxBatchDelay 0 with batchSize {cfg['batchSize']} would wait 100 ms per batch "
                         "(TorchServe 0.12 reads an archive's 0 as unset and uses its default); use 1 for batches "
                         "that take what is queued and barely wait")


def serving_config(model_dir: Path, config: Path | None = None) -> tuple[dict[str, Any], list[Path]]:
    """The model-config a build of MODEL_DIR packs, and the files it came from: CONFIG alone when given; otherwise
    handlers/model-config.yaml with MODEL_DIR's tuned-config.yaml (the tuner's choice for this variant) over it."""
    base = config or DEFAULT_CONFIG
    if not base.is_file():
        raise FileNotFoundError(f"model config {base} not found; start from handlers/model-config.yaml")
    cfg = yaml.safe_load(base.read_text()) or {}
    sources = [base]
    tuned = Path(model_dir) / TUNED_FILE
    if config is None and tuned.is_file():
        over = yaml.safe_load(tuned.read_text()) or {}
        handler = over.get("handler") or {}
        unknown = sorted(set(over) - TUNED_KEYS) + sorted(f"handler.{k}" for k in set(handler) - TUNED_HANDLER_KEYS)
        if not isinstance(handler, dict) or unknown:
            raise ValueError(f"{tuned} may set only {', '.join(sorted(TUNED_KEYS - {'handler'}))} and handler.threads "
                             f"(got {', '.join(unknown) or 'handler: ' + repr(handler)}); everything else belongs in "
                             f"{base}. Rewrite it with python -m benchmarks.tune {model_dir} --for-variant")
        cfg |= {k: v for k, v in over.items() if k != "handler"}
        cfg["handler"] = {**(cfg.get("handler") or {}), **handler}
        sources.append(tuned)
    check_config(cfg, sources[-1])
    return cfg, sources


def set_keys(text: str, values: dict[str, int | str]) -> str:
    """Replace `key: value` lines in YAML text (top level, or `section.key` one level down), keeping each
    trailing comment in its column; a missing top-level key is appended."""
    lines = text.splitlines(keepends=True)
    for dotted, value in values.items():
        section, _, key = dotted.rpartition(".")
        i = find_key(lines, section, key)
        if i is None:
            if section:
                raise ValueError(f"no {dotted} line in the config; add `  {key}:` under `{section}:`")
            if lines and not lines[-1].endswith("\n"):
                lines[-1] += "\n"
            lines.append(f"{key}: {value}\n")
            continue
        body = lines[i].rstrip("\r\n")
        m = key_line(section, key).match(body)
        assert m is not None
        prefix, old, tail = m.group(1), m.group(2), m.group(3) or ""
        comment = tail.strip()
        new = f"{prefix}{value}"
        if comment:
            column = len(prefix) + len(old) + len(tail) - len(comment)
            new += " " * max(1, column - len(new)) + comment
        lines[i] = new + lines[i][len(body):]
    return "".join(lines)


def key_line(section: str, key: str) -> re.Pattern[str]:
    indent = r"[ \t]+" if section else ""
    return re.compile(rf"^({indent}{re.escape(key)}:[ \t]*)([^#]*?)([ \t]*#.*)?$")


def find_key(lines: list[str], section: str, key: str) -> int | None:
    """Index of the line holding `key` at the top level, or one level inside `section`."""
    pattern = key_line(section, key)
    inside = not section
    for i, line in enumerate(lines):
        top = bool(line.strip()) and not line[0].isspace()
        if section and top:
            inside = line.startswith(f"{section}:")
            continue
        if inside and pattern.match(line.rstrip("\r\n")):
            return i
    return None


def tuned_text(values: dict[str, int | str], header: str) -> str:
    """A variant's tuned-config.yaml: only the tuned keys (`section.key` nested), under a comment header."""
    nested: dict[str, Any] = {}
    for dotted, value in values.items():
        section, _, key = dotted.rpartition(".")
        (nested.setdefault(section, {}) if section else nested)[key] = value
    return "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(nested, sort_keys=False)

