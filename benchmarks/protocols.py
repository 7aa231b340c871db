"""Throughput and latency of one served variant over each protocol, side by side in one run: plain REST
(/predictions), OIP REST on TorchServe's own route (tritonclient.http, binary data), OIP REST and gRPC through
the OIP gateway (tritonclient), at a fixed number of connections. Paths take turns, round after round, so
that drift on a shared machine hits them alike; the ratio to plain REST is the figure to read.

    python -m benchmarks.protocols [--model artifacts/resnet18] [--connections 16] [--seconds 10] [--rounds 3]

Every client is the third-party one a user would run, in this process (closed loop, one client per
connection), on the same machine as the server: their CPU cost is part of what is measured.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import requests
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp

from benchmarks import inputs
from benchmarks.archives import build_ours
from harness.gateway import Gateway
from harness.torchserve import ROOT, TorchServe
from training.speed import cpu_model
from training.stats import percentile

Send = Callable[[bytes], bool]


def plain_rest(ts: TorchServe, gw: Gateway, model: str) -> Send:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {ts.api.keys['inference']}"
    url = ts.url("inference", f"/predictions/{model}")
    return lambda body: session.post(url, data=body, timeout=60).status_code == 200


def triton(module: Any, address: str, ts: TorchServe, model: str) -> Send:
    token = ts.api.keys["inference"]
    local = threading.local()  # tritonclient.http runs on gevent: a client serves only the thread that made it

    def send(body: bytes) -> bool:
        client = getattr(local, "client", None) or module.InferenceServerClient(address)
        local.client = client
        inp = module.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(np.array([body], dtype=object))
        result = client.infer(model, [inp], headers={"authorization": f"Bearer {token}"})
        return result.as_numpy("labels") is not None
    return send


PATHS: dict[str, Callable[[TorchServe, Gateway, str], Send]] = {
    "REST raw (TorchServe)": plain_rest,
    "OIP REST, tritonclient.http binary (TorchServe)":
        lambda ts, gw, m: triton(thttp, ts.url("inference").removeprefix("http://"), ts, m),
    "OIP REST, tritonclient.http binary (gateway)": lambda ts, gw, m: triton(thttp, gw.rest, ts, m),
    "OIP gRPC, tritonclient.grpc (gateway)": lambda ts, gw, m: triton(tgrpc, gw.grpc, ts, m),
}


def closed_loop(senders: list[Send], bodies: list[bytes], seconds: float) -> tuple[int, list[float], list[str]]:
    """Each sender in its own thread, as fast as answers come, for `seconds`: (answers, latencies, failures)."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def loop(send: Send, offset: int) -> None:
        i = offset
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                error = "" if send(bodies[i % len(bodies)]) else "no labels in the answer"
            except Exception as e:
                error = f"{type(e).__name__}: {str(e)[:200]}"
            with lock:
                if error:
                    failures.append(error)
                else:
                    latencies.append(time.perf_counter() - t0)
            i += 1

    threads = [threading.Thread(target=loop, args=(s, k)) for k, s in enumerate(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies), latencies, failures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "artifacts" / "resnet18", help="a trained model dir")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0, help="per path per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "protocols.json")
    args = ap.parse_args()
    if not (args.model / "metadata.json").exists():
        raise SystemExit(f"error: no trained model in {args.model}; run the quickstart (deploy/quickstart.sh) "
                         "or pass --model DIR")
    with tempfile.TemporaryDirectory(prefix="bench_protocols_") as tmp:
        work = Path(tmp)
        bodies = inputs.digits(args.model, work / "inputs", limit=64).bodies()
        (work / "store").mkdir()
        build_ours(args.model, work / "store", "digits", ROOT / "handlers" / "model-config.yaml")
        with TorchServe(work / "ts", work / "store") as ts:
            ts.start(wait_for=["digits"])
            with Gateway(ts) as gw:
                senders = {name: [make(ts, gw, "digits") for _ in range(args.connections)]
                           for name, make in PATHS.items()}
                for group in senders.values():  # warm every client and worker path
                    closed_loop(group, bodies, 1.0)
                rounds: dict[str, list[dict[str, float]]] = {name: [] for name in PATHS}
                for r in range(args.rounds):
                    for name, group in senders.items():
                        n, lat, failed = closed_loop(group, bodies, args.seconds)
                        rounds[name].append({"rps": n / args.seconds, "p50_ms": 1000 * percentile(lat, 50),
                                             "p99_ms": 1000 * percentile(lat, 99), "failed": len(failed)})
                        if failed:
                            print(f"  {len(failed)} failed, e.g. {failed[0]}", flush=True)
                        print(f"round {r + 1}/{args.rounds} {name}: {n / args.seconds:.1f} req/s", flush=True)
    base = median(x["rps"] for x in rounds["REST raw (TorchServe)"])
    rows = {name: {"rps": median(x["rps"] for x in rs), "p50_ms": median(x["p50_ms"] for x in rs),
                   "p99_ms": median(x["p99_ms"] for x in rs), "failed": sum(x["failed"] for x in rs),
                   "vs_rest": median(x["rps"] for x in rs) / base, "rounds": rs} for name, rs in rounds.items()}
    report = {"cpu": cpu_model(), "connections": args.connections, "seconds": args.seconds, "rounds": args.rounds,
              "model": str(args.model), "paths": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{args.connections} connections, median of {args.rounds} rounds x {args.seconds:.0f} s; {cpu_model()}")
    print("| path | req/s | p50 ms | p99 ms | ÷ REST raw | failed |\n|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['rps']:.1f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['vs_rest']:.2f}× "
              f"| {row['failed']} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
