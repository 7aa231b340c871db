"""The open-loop generator (harness/open_loop.py, locust) keeps its arrival schedule whatever the answers do.

The server here is a plain threaded HTTP server that records when each request arrives and answers 4x slower
than the arrival interval: a closed loop would slow down to its pace, an open loop must not.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from harness import open_loop

pytestmark = pytest.mark.slow  # installs locust into harness/.locust on first use

RATE = 80.0  # req/s: one arrival every 12.5 ms
ANSWER_S = 0.05


@pytest.fixture
def recording_server() -> Iterator[tuple[str, list[float]]]:
    arrivals: list[float] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            arrivals.append(time.monotonic())
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(ANSWER_S)
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/predictions/m", arrivals
    finally:
        server.shutdown()
        server.server_close()


def gaps_cv(arrivals: list[float]) -> float:
    """Coefficient of variation of the gaps between arrivals in the steady middle of the run."""
    steady = sorted(arrivals)[len(arrivals) // 5: -len(arrivals) // 5]
    gaps = [b - a for a, b in itertools.pairwise(steady)]
    return statistics.pstdev(gaps) / statistics.mean(gaps)


@pytest.mark.parametrize(("arrivals", "cv_range"), [("constant", (0.0, 0.5)), ("poisson", (0.7, 1.4))])
def test_arrivals_keep_their_schedule_while_answers_are_slow(
        recording_server: tuple[str, list[float]], tmp_path: Path, arrivals: str, cv_range: tuple[float, float]
) -> None:
    url, seen = recording_server
    image = tmp_path / "x.jpg"
    image.write_bytes(b"\xff\xd8 not decoded by this server")
    listing = tmp_path / "list.txt"
    listing.write_text(str(image))
    result = open_loop.run(url, "token", listing, RATE, 4, arrivals=arrivals)
    assert result.errors == 0 and result.arrivals == arrivals
    assert 0.85 * RATE <= result.achieved_rps <= 1.15 * RATE, result
    assert result.p50_ms >= ANSWER_S * 1000, "latency counts from the arrival, so it includes the answer time"
    low, high = cv_range
    assert low <= gaps_cv(seen) <= high, f"{arrivals} arrivals: gap CV {gaps_cv(seen):.2f}"


def test_an_unknown_schedule_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="arrivals must be one of constant, poisson"):
        open_loop.run("http://127.0.0.1:1/p", "t", tmp_path / "none", 10, 1, arrivals="bursty")
