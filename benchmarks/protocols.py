"""Throughput and latency of one served variant over each protocol, side by side in one run: plain REST
(/predictions), OIP REST on TorchServe's own route (tritonclient.http, binary data), OIP REST and gRPC through
the OIP gateway (tritonclient), at a fixed number of connections. Paths take turns, round after round, so
that drift on a shared machine hits them alike; the ratio to plain REST is the figure to read.

    python -m benchmarks.protocols [--model artifacts/resnet18] [--connections 16] [--seconds 10] [--rounds 3]

Every client is the third-party one a user would run, in this process (closed loop, one client per
connection, harness.correctness_load.drive), on the same machine as the server: their CPU cost is part of what
is measured. An answer counts only when its label is the one plain REST gives for that image.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp

from benchmarks import inputs
from benchmarks.archives import build_ours
from handlers.machine import cpu_model
from harness.correctness_load import Outcome, Poster, Run, drive
from harness.gateway import Gateway
from harness.torchserve import ROOT, TorchServe
from packager.stats import interleaved, median

Send = Callable[[bytes], str]  # one image -> its top-1 label


def plain_rest(ts: TorchServe, gw: Gateway, model: str) -> Send:
    poster = Poster(ts.url("inference"), ts.api.keys["inference"])

    def send(body: bytes) -> str:
        status, answer, _, _ = poster.post(f"/predictions/{model}", body)
        return str(answer.get("label")) if status == 200 else f"HTTP {status}: {answer}"
    return send


def triton(module: Any, address: str, ts: TorchServe, model: str) -> Send:
    token = ts.api.keys["inference"]
    local = threading.local()  # tritonclient.http runs on gevent: a client serves only the thread that made it

    def send(body: bytes) -> str:
        client = getattr(local, "client", None) or module.InferenceServerClient(address)
        local.client = client
        inp = module.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(np.array([body], dtype=object))
        label = client.infer(model, [inp], headers={"authorization": f"Bearer {token}"}).as_numpy("labels")[0][0]
        return label.decode() if isinstance(label, bytes) else str(label)
    return send


PATHS: dict[str, Callable[[TorchServe, Gateway, str], Send]] = {
    "REST raw (TorchServe)": plain_rest,
    "OIP REST, tritonclient.http binary (TorchServe)":
        lambda ts, gw, m: triton(thttp, ts.url("inference").removeprefix("http://"), ts, m),
    "OIP REST, tritonclient.http binary (gateway)": lambda ts, gw, m: triton(thttp, gw.rest, ts, m),
    "OIP gRPC, tritonclient.grpc (gateway)": lambda ts, gw, m: triton(tgrpc, gw.grpc, ts, m),
}


def measure(send: Send, bodies: list[bytes], labels: list[str], seconds: float, connections: int) -> Run:
    """A closed loop (harness.correctness_load.drive); an answer counts only with plain REST's label."""
    def one(i: int) -> Outcome:
        started = time.monotonic()
        try:
            got = send(bodies[i % len(bodies)])
        except Exception as e:
            got = f"{type(e).__name__}: {str(e)[:200]}"
        want = labels[i % len(bodies)]
        return Outcome("good", 200, got == want, time.monotonic() - started, started, f"got {got}, want {want}")
    return drive(one, seconds, connections)


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
                senders = {name: make(ts, gw, "digits") for name, make in PATHS.items()}
                labels = [senders["REST raw (TorchServe)"](b) for b in bodies]
                for send in senders.values():  # warm every client and worker path
                    measure(send, bodies, labels, 1.0, args.connections)

                def point(send: Callable[[bytes], str]) -> dict[str, float]:
                    run = measure(send, bodies, labels, args.seconds, args.connections)
                    if run.errors():
                        print(f"  {len(run.errors())} failed, e.g. {run.errors()[0].detail}", flush=True)
                    good = len(run.outcomes) - len(run.errors())
                    return {"rps": good / run.elapsed_s, "p50_ms": run.latency_ms(50), "p99_ms": run.latency_ms(99),
                            "failed": len(run.errors())}

                rounds = interleaved({name: functools.partial(point, send) for name, send in senders.items()},
                                     args.rounds, after=lambda r, name, row: print(
                                         f"round {r + 1}/{args.rounds} {name}: {row['rps']:.1f} req/s", flush=True))
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
