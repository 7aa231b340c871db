"""What the server answers with now, how accurate it is and how much faster than fp32, each with its command.

    python -m deploy.summary artifacts/resnet18 IMAGE [--url http://127.0.0.1:8080] [--model digits]

The version and variant come from a live prediction (what is really served), the accuracy from that variant's
model card (held-out test split), the speed-up from the optimization report of MODEL_DIR (in-process timing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deploy.client import InferenceClient, PredictionError
from handlers.contract import KEY_FILE, ModelCard
from packager.pick import REPORT_DIR, variant_dir


def summary(model_dir: Path, image: Path, url: str, model: str, key_file: Path) -> list[str]:
    with InferenceClient.from_key_file(url, key_file, model=model) as client:
        served = client.predict(image.read_bytes())
    source = model_dir if served.variant == "fp32" else variant_dir(model_dir, served.variant)
    if not (source / "metadata.json").is_file():
        raise FileNotFoundError(f"{model} {served.version} serves variant {served.variant!r}, which {model_dir} "
                                "does not hold; pass the model directory it was built from")
    card = ModelCard.read(source)
    lines = [f"serving {model} {served.version}: {card.architecture} {served.variant} ({card.runtime}, "
             f"{card.precision}) - {url}/predictions/{model}",
             f"  held-out top-1 {100 * card.test.top1:.2f}% on {card.test.n} test images"
             f"    [python -m training.evaluate {source}]"]
    report_file = model_dir / REPORT_DIR / "report.json"
    if report_file.is_file():
        report = json.loads(report_file.read_text())
        row = next((r for r in report["rows"] if r["variant"] == served.variant), None)
        if row is not None:
            machine = report["environment"]["machine"]
            where = machine["gpu"] or f"{machine['cpu']}, {report['environment']['threads']} threads"
            lines.append(f"  {row['speedup_bs8']:.1f}x fp32 eager's throughput at batch {report['batch']} "
                         f"({row['throughput_bs8']:.0f} img/s), {row['latency_speedup_bs1']:.1f}x at batch 1 "
                         f"({row['latency_ms_bs1']:.2f} ms), in-process on {where}"
                         f"    [python -m training.optimize {model_dir} --pick]")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path, help="the trained model directory the served versions came from")
    ap.add_argument("image", type=Path, help="an image to send")
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default="digits")
    ap.add_argument("--token-file", type=Path, default=Path(KEY_FILE))
    args = ap.parse_args()
    try:
        print("\n".join(summary(args.model_dir, args.image, args.url, args.model, args.token_file)))
    except (FileNotFoundError, ValueError, PredictionError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
