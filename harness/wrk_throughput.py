"""Throughput with wrk (compiled, event-driven, keep-alive) driven by harness/wrk.lua. (Correctness under load,
request by request, is harness/correctness_load.py.)

    python -m harness.wrk_throughput URL TOKEN LIST_FILE [-c 4] [-d 10] [--think-ms 0]

wrk rather than ab: ab sends one fixed body, while wrk's Lua hook rotates through every held-out
digit; wrk keeps connections alive by default and reports latency percentiles in microseconds.
One wrk thread is enough for a few thousand requests/s and leaves the cores to the server.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.tools import debian_tool

SCRIPT = Path(__file__).resolve().parent / "wrk.lua"


@dataclass
class LoadResult:
    concurrency: int
    duration_s: float
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    errors: int  # non-2xx responses + socket errors + timeouts
    error_detail: dict[str, int]
    think_ms: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def ensure_wrk() -> str:
    return debian_tool("wrk")


def run(url: str, token: str, list_file: Path, concurrency: int, duration_s: float,
        content_type: str = "image/jpeg", think_ms: float = 0.0, timeout_s: int = 60) -> LoadResult:
    """Closed-loop load: `concurrency` keep-alive connections for `duration_s` seconds."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"benchmark traffic goes to 127.0.0.1 only, not {url}")
    wrk = ensure_wrk()
    cmd = [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s", f"--timeout={timeout_s}s",
           "--latency", "-s", str(SCRIPT), url, "--", token, content_type, str(think_ms), str(list_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + timeout_s + 30)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("WRKJSON ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()[-500:] or proc.stdout[-500:]}")
    data = json.loads(lines[-1][len("WRKJSON "):])
    lat = data["latency_us"]
    secs = data["duration_us"] / 1e6
    return LoadResult(
        concurrency=concurrency,
        duration_s=round(secs, 3),
        requests=data["requests"],
        rps=round(data["requests"] / secs, 2) if secs else 0.0,
        p50_ms=lat["p50"] / 1000, p90_ms=lat["p90"] / 1000, p99_ms=lat["p99"] / 1000,
        mean_ms=round(lat["mean"] / 1000, 3), max_ms=lat["max"] / 1000,
        errors=sum(data["errors"].values()),
        error_detail=data["errors"],
        think_ms=think_ms,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("token")
    ap.add_argument("list_file", type=Path)
    ap.add_argument("-c", "--concurrency", type=int, default=4)
    ap.add_argument("-d", "--duration", type=float, default=10)
    ap.add_argument("--think-ms", type=float, default=0.0)
    args = ap.parse_args()
    print(json.dumps(run(args.url, args.token, args.list_file, args.concurrency, args.duration,
                         think_ms=args.think_ms).to_dict(), indent=2))


if __name__ == "__main__":
    main()
