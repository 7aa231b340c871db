"""The golden set: a held-out, stratified sample of the test split packed into every .mar for canary checks.

    python -m packager.golden model_store/digits.mar      # what an archive carries

Images are PNG (lossless), so the served handler decodes exactly the uint8 tensors the offline
evaluation used, and the recorded build-time accuracy is the figure the served model must reproduce.
training.golden builds it (from the test split the model was trained with), packager.stage packs it,
deploy.canary reads it from the archive. Reading it stays light: no torch.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

from handlers.contract import GOLDEN_FILE


def from_archive(mar: Path) -> dict[str, Any]:
    """The golden set packed in a .mar (a zip), without extracting it."""
    try:
        with zipfile.ZipFile(mar) as z:
            return json.loads(z.read(GOLDEN_FILE))
    except KeyError as e:
        raise ValueError(f"{mar} carries no {GOLDEN_FILE}; rebuild it with build_mar.sh") from e
    except zipfile.BadZipFile as e:
        raise ValueError(f"{mar} is not a readable .mar (zip) archive: {e}") from e


def images(golden: dict[str, Any]) -> list[tuple[bytes, str]]:
    """[(png bytes, expected label)]."""
    return [(base64.b64decode(it["png"]), it["label"]) for it in golden["items"]]


def build_top1(golden: dict[str, Any], limit: int | None = None) -> float:
    """The build-time accuracy on the first `limit` images (all by default)."""
    items = golden["items"][:limit]
    return sum(it["build_label"] == it["label"] for it in items) / len(items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("archive", type=Path, help="a .mar built by build_mar.sh")
    args = ap.parse_args()
    try:
        g = from_archive(args.archive)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    counts: dict[str, int] = {}
    for it in g["items"]:
        counts[it["label"]] = counts.get(it["label"], 0) + 1
    print(f"{g['n']} images ({g['source']}), build-time top-1 {100 * g['build_top1']:.2f}% ({g['variant']}), "
          f"per label {counts}")


if __name__ == "__main__":
    main()
