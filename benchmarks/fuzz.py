"""Coverage-guided fuzzing (atheris, libFuzzer's engine) of every parser and decoder a client's bytes reach: the
handler's protocols (raw image bytes of every format, base64 and data URIs, JSON tensors, KServe v1, OIP JSON and
binary) as TorchServe's worker hands them over, and the gateway's check of form and multipart bodies.

A finding is an exception out of the handler, an input that takes over 1 s of CPU (CPU, not wall-clock, time: a
busy machine is not a finding; libFuzzer's -timeout catches a wall-clock hang at 5 s), a 5xx for a client's body,
or a well-formed neighbour in the same batch that does not get its 200. Findings are saved under
--findings; copy each into tests/fuzz_findings/ and tests/test_fuzz.py replays it.

    python -m benchmarks.fuzz model_store/digits-1.0.mar --runs 1000000     # the campaign docs/reliability.md cites
    python -m benchmarks.fuzz model_store/digits-1.0.mar --seconds 60        # bounded: what the tests run
    python -m benchmarks.fuzz model_store/digits-1.0.mar --replay tests/fuzz_findings
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import load_digits

from harness.encodings import encodings

ROOT = Path(__file__).resolve().parent.parent
# handlers/ is imported only in functions, never at the top: the worker imports it under atheris's instrumentation
# (fuzz_worker), so that its coverage guides the fuzzer.
NEIGHBOUR_EVERY = 64  # one input in this many shares its batch with a good image, which must still get its 200
STATS = re.compile(r"#(\d+)\s+(?:DONE|pulse|NEW|REDUCE|INITED)\s+cov: (\d+) ft: (\d+) corp: (\d+)/\S+.*?exec/s: (\d+)")


IN_PROGRESS = "in-progress"  # the input being judged; kept as hang-<sha1> if the process dies on it


class Finding(Exception):
    """The server's answer to a client's body was wrong (a 5xx, a lost neighbour, a response count)."""


def b64(payload: bytes) -> str:
    return base64.b64encode(payload).decode()


def as_worker_body(body: bytes, content_type: str) -> Any:
    """What TorchServe's worker hands the handler: JSON bodies already parsed where they parse, else the bytes."""
    if content_type == "application/json":
        try:
            return json.loads(body.decode("utf-8"))
        except Exception:  # noqa: BLE001 - the worker forwards the raw bytes on any failure
            return bytearray(body)
    return bytearray(body)


Request = tuple[bytes, str, dict[str, str]]  # body, content type, extra headers


def oip_binary(payload: bytes) -> Request:
    """A BYTES input in the binary-data extension: a JSON header, then the length-prefixed element."""
    from handlers.protocols import BINARY_HEADER

    element = struct.pack("<I", len(payload)) + payload
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(element)}}]}).encode()
    return header + element, "application/octet-stream", {BINARY_HEADER: str(len(header))}


def oip_binary_raw(payload: bytes) -> Request:
    """The extension with a fuzzed header: its length from the first two bytes."""
    from handlers.protocols import BINARY_HEADER

    n = int.from_bytes(payload[:2].ljust(2, b"\0"), "little") % (len(payload) + 1)
    return payload[2:], "application/octet-stream", {BINARY_HEADER: str(n)}


def as_json(value: Any) -> Request:
    return json.dumps(value).encode(), "application/json", {}


# Each shape turns the fuzzer's bytes (after the first, which picks the shape) into one request.
SHAPES: list[Callable[[bytes], Request]] = [
    lambda p: (p, "application/octet-stream", {}),
    lambda p: (p, "application/json", {}),
    lambda p: as_json({"data": b64(p)}),
    lambda p: (b"data:image/png;base64," + b64(p).encode(), "text/plain", {}),
    lambda p: as_json({"instances": [{"b64": b64(p)}]}),
    lambda p: as_json({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(p)]}]}),
    oip_binary,
    oip_binary_raw,
]
GATEWAY_SHAPE = len(SHAPES)  # the gateway's front door: form and multipart bodies
FORM_TYPES = ("multipart/form-data; boundary=xx", "application/x-www-form-urlencoded", "multipart/form-data")


def seeds(input_size: int) -> list[bytes]:
    """Real inputs to start from: one held-out digit in every encoding, in every shape, plus JSON bodies."""
    digit = np.repeat(load_digits().images[0].astype(np.uint8)[:, :, None] * 16, 3, axis=2)
    corpus = [e.data for e in encodings(digit).values()]
    png = corpus[0]
    out = [bytes([0]) + data for data in corpus]
    out += [bytes([shape]) + png for shape in range(2, len(SHAPES))]
    tensor = np.zeros((3, input_size, input_size)).tolist()
    flat = np.zeros(3 * input_size * input_size).tolist()
    for body in ({"data": tensor}, {"data": b64(png), "return_logits": True}, {"instances": [{"b64": b64(png)}]},
                 {"inputs": [{"name": "input", "shape": [1, 3, input_size, input_size], "datatype": "FP32",
                              "data": flat}], "outputs": [{"name": "labels"}]},
                 {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(png)]}]}):
        out.append(bytes([1]) + json.dumps(body).encode())
    multipart = (b"--xx\r\nContent-Disposition: form-data; name=\"data\"; filename=\"d.png\"\r\n"
                 b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--xx--\r\n")
    out += [bytes([GATEWAY_SHAPE, 0]) + multipart, bytes([GATEWAY_SHAPE, 1]) + b"data=abc%20d"]
    return out


class Target:
    """One fuzz input -> one request through the real handler in-process (or the gateway's check), judged."""

    def __init__(self, archive: Path, findings: Path | None = None, limit_s: float = 1.0,
                 in_progress: str = IN_PROGRESS) -> None:
        from deploy.oip_gateway import GatewayError, form_mistake
        from handlers.handler import ModelHandler
        from harness.context import call, make_context, unpack_mar

        self.call, self.form_mistake, self.gateway_error = call, form_mistake, GatewayError
        self.handler = ModelHandler()
        self.context = make_context(unpack_mar(archive, Path(tempfile.mkdtemp(prefix="fuzz-"))))
        self.handler.initialize(self.context)
        self.input_size = self.handler.card.input.image_size
        self.good = seeds(self.input_size)[0][1:]  # the digit as a PNG
        # Warm: the first call's one-off costs (thread pools, allocator) are not the first input's.
        status, answer = call(self.handler, self.context, [{"body": bytearray(self.good)}],
                              [{"Content-Type": "image/png"}])[0]
        if status != 200:
            raise RuntimeError(f"the archive's handler refused a good digit: {status} {answer}")
        self.findings = findings
        self.in_progress = in_progress
        self.kinds: set[str] = set()  # the failures seen, by exception type and message with numbers masked
        if findings is not None:
            findings.mkdir(parents=True, exist_ok=True)
        self.limit_s = limit_s
        self.inputs = 0

    def __call__(self, data: bytes) -> None:
        """Judge one input. With `findings`, a failing input is saved there (the first of each kind of failure,
        named by its sha1) and the campaign goes on; without, the failure is raised."""
        self.inputs += 1
        if self.findings is not None:  # where the campaign finds the input if a hang gets the process killed
            (self.findings / self.in_progress).write_bytes(data)
        started = time.process_time()
        try:
            self.judge(data)
            if time.process_time() - started > self.limit_s:
                raise Finding(f"took {time.process_time() - started:.2f} CPU s, over the {self.limit_s:g} s limit")
        except Exception as e:
            if self.findings is None:
                raise
            kind = f"{type(e).__name__}: {re.sub(r'[0-9.]+', 'N', str(e))[:160]}"
            if isinstance(e, Finding) and str(e).startswith("took"):  # slow inputs: one of each shape and magic
                kind += f" {data[:5]!r}"
            if kind not in self.kinds:
                self.kinds.add(kind)
                (self.findings / f"finding-{hashlib.sha1(data).hexdigest()}").write_bytes(data)
                print(f"fuzz finding {len(self.kinds)}: {kind}", flush=True)

    def judge(self, data: bytes) -> None:
        if not data:
            return
        shape, payload = data[0] % (len(SHAPES) + 1), data[1:]
        if shape == GATEWAY_SHAPE:
            self.gateway(payload)
            return
        body, content_type, extra = SHAPES[shape](payload)
        rows = [{"body": as_worker_body(body, content_type)}]
        headers = [{"Content-Type": content_type, **extra}]
        if self.inputs % NEIGHBOUR_EVERY == 0:
            rows.append({"body": bytearray(self.good)})
            headers.append({"Content-Type": "image/png"})
        results = self.call(self.handler, self.context, rows, headers)
        status, answer = results[0]
        if status >= 500:
            raise Finding(f"{status} for a client's body (shape {shape}): {str(answer)[:300]}")
        if len(results) > 1 and results[1][0] != 200:
            raise Finding(f"the good neighbour got {results[1][0]}: {str(results[1][1])[:300]}")

    def gateway(self, payload: bytes) -> None:
        content_type = FORM_TYPES[payload[0] % len(FORM_TYPES)] if payload else FORM_TYPES[0]
        mistake = self.form_mistake(content_type, payload[1:])
        if mistake is not None and not 400 <= mistake.status < 500:
            raise Finding(f"the gateway answered {mistake.status} for a client's {content_type} body")


def fuzz_worker(args: argparse.Namespace, libfuzzer: list[str]) -> None:
    """In the child: the handler under atheris."""
    import atheris

    with atheris.instrument_imports(include=["handlers", "deploy"]):
        target = Target(args.archive, args.findings, args.timeout, args.in_progress)

    corpus = Path(libfuzzer[-1])
    for i, seed in enumerate(seeds(target.input_size)):  # the JSON tensors need the model's input size
        (corpus / f"seed-{i:03d}").write_bytes(seed)
    atheris.Setup([sys.argv[0], *libfuzzer], target)
    atheris.Fuzz()


def replay(args: argparse.Namespace) -> int:
    target = Target(args.archive, limit_s=args.timeout)
    failures = []
    files = sorted(p for p in args.replay.iterdir() if p.is_file())
    for path in files:
        try:
            target(path.read_bytes())
        except Exception as e:  # noqa: BLE001 - every failing file is listed
            failures.append(f"{path.name}: {type(e).__name__}: {str(e)[:300]}")
    print(f"replayed {len(files)} inputs from {args.replay}: {len(failures)} failing")
    for line in failures:
        print("  " + line)
    return 1 if failures else 0


class Job:
    """One libFuzzer process with a corpus and a seed of its own; libFuzzer exits its process, so it is a child."""

    def __init__(self, args: argparse.Namespace, index: int) -> None:
        self.index = index
        self.in_progress = args.findings / f"{IN_PROGRESS}-{index}"
        self.in_progress.unlink(missing_ok=True)
        corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-corpus-{index}-"))
        # libFuzzer's own timeout catches a true hang; the target itself flags anything over --timeout.
        flags = [f"-timeout={max(5, round(5 * args.timeout))}", "-max_len=100000", "-rss_limit_mb=6144",
                 "-print_final_stats=1", f"-artifact_prefix={args.findings}/", f"-seed={index + 1}"]
        flags += [f"-runs={args.runs // args.jobs}"] if args.runs else []
        flags += [f"-max_total_time={args.seconds}"] if args.seconds else []
        flags.append(str(corpus))  # last: the worker writes the seeds there
        cmd = [sys.executable, "-m", "benchmarks.fuzz", str(args.archive), "--worker", "--findings",
               str(args.findings), "--timeout", str(args.timeout), "--in-progress", self.in_progress.name, "--",
               *flags]
        self.log = open(args.findings / f"job-{index}.log", "w")  # noqa: SIM115 - closed in finish()
        from handlers.cores import OPENMP_ENV

        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env={
            **OPENMP_ENV, **os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        self.path = Path(self.log.name)
        self.stats: tuple[int, ...] = (0, 0, 0, 0, 0)  # inputs, edges, features, corpus, exec/s

    def poll(self) -> bool:
        """Read the newest stats line (from the log's tail: decoders' warnings can fill it); True while it runs."""
        with open(self.path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 256_000))
            tail = f.read().decode(errors="replace")
        found = STATS.findall(tail)
        if found:
            self.stats = tuple(int(x) for x in found[-1])
        return self.proc.poll() is None

    def finish(self) -> int:
        self.proc.wait()
        self.poll()
        self.log.close()
        if self.proc.returncode not in (0, 1) and self.in_progress.exists():  # killed mid-input: a hang
            self.in_progress.rename(self.in_progress.with_name(
                f"hang-{hashlib.sha1(self.in_progress.read_bytes()).hexdigest()}"))
        self.in_progress.unlink(missing_ok=True)
        return self.proc.returncode


def campaign(args: argparse.Namespace) -> int:
    """`--jobs` independent fuzzers, their progress every 30 s, and one report."""
    from handlers.machine import cpu_label, fingerprint

    args.findings.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    jobs = [Job(args, i) for i in range(args.jobs)]
    next_report = 0.0
    while any([job.poll() for job in jobs]):
        if time.monotonic() - started >= next_report:
            inputs = sum(job.stats[0] for job in jobs)
            print(f"fuzz: {inputs:>9} inputs  cov {max(j.stats[1] for j in jobs)}  "
                  f"{sum(j.stats[4] for j in jobs)} exec/s  {time.monotonic() - started:.0f} s", flush=True)
            next_report += 30
        time.sleep(1)
    codes = [job.finish() for job in jobs]
    findings = sorted(p.name for p in args.findings.iterdir()
                      if p.name.startswith(("finding-", "hang-", "crash-", "timeout-", "oom-")))
    report = {
        "command": "python -m benchmarks.fuzz " + " ".join(sys.argv[1:]),
        "archive": str(args.archive), "cpu": cpu_label(fingerprint()), "seconds": round(time.monotonic() - started, 1),
        "jobs": args.jobs, "inputs": sum(j.stats[0] for j in jobs),
        "coverage_edges": max(j.stats[1] for j in jobs), "features": max(j.stats[2] for j in jobs),
        "corpus": sum(j.stats[3] for j in jobs), "exec_per_s": sum(j.stats[4] for j in jobs),
        "exit_codes": codes, "findings": findings, "timeout_s": args.timeout,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if any(codes) or findings:
        for job in jobs:
            with open(job.path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 4000))
                print(f"--- {job.path} ---\n" + f.read().decode(errors="replace"), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    own, libfuzzer = argv[:cut], argv[cut + 1:]  # after "--": libFuzzer's flags, for the worker
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("archive", type=Path, help="a .mar built by build_mar.sh (the handler and model under test)")
    ap.add_argument("--runs", type=int, default=0, help="stop after this many inputs")
    ap.add_argument("--seconds", type=int, default=0, help="stop after this many seconds")
    ap.add_argument("--timeout", type=float, default=1.0, help="CPU seconds one input may take before it is a finding")
    ap.add_argument("--findings", type=Path, default=Path("artifacts/fuzz_findings"))
    ap.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    ap.add_argument("--replay", type=Path, default=None, help="run every file in this folder once and judge it")
    ap.add_argument("--jobs", type=int, default=1, help="independent fuzzers run side by side (default 1)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--in-progress", default=IN_PROGRESS, help=argparse.SUPPRESS)
    args = ap.parse_args(own)
    if not args.archive.is_file():
        ap.error(f"archive {args.archive} not found: build one with build_mar.sh (the quick start writes "
                 "model_store/digits-1.0.mar)")
    if args.worker:
        fuzz_worker(args, libfuzzer)
        return 0
    if args.replay is not None:
        return replay(args)
    if not (args.runs or args.seconds):
        ap.error("give --runs N or --seconds S (or --replay DIR)")
    return campaign(args)


if __name__ == "__main__":
    sys.exit(main())
