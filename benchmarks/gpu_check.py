"""The GPU proof in one prepared command: every CUDA test, the TensorRT and CUDA AOTInductor variants (parity and
the gate), stock TorchServe against ours served on the GPU, and an nccl DDP step, in one JSON report.

    bash benchmarks/gpu_check.sh --prepare   # here, with PyPI: .gpu/ holds what the GPU image lacks (<= 64 MiB)
    bash benchmarks/gpu_check.sh             # on the GPU machine, .gpu/ carried: $OUT/gpu_check.json + .log
    bash benchmarks/gpu_check.sh --dry-run   # CPU, tiny sizes: the same steps, in CI

Each step runs in its own process under its own time budget (the whole run fits 9 minutes on a GPU), and a step
that fails or runs out of time is reported while the next one runs. The GPU image has its own Python and torch:
the check makes a venv over them (--system-site-packages) and adds the carried wheels, a jlinked Java runtime for
TorchServe's frontend and Debian's wrk. The model is trained in the check's first minute on the GPU, unless
--model names one carried along (a resnet18 and TorchServe's wheel together exceed what a device call carries).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".gpu"
CARRY_LIMIT = 64 * 2**20  # what one device call takes along: the working tree plus carried paths
# TorchServe's frontend needs these (log4j: java.beans in java.desktop); AWT's native libraries it never loads.
JRE_MODULES = "java.base,java.desktop,java.logging,java.management,java.naming,java.sql,java.xml,jdk.crypto.ec," \
              "jdk.management,jdk.unsupported"
JRE_UNUSED = ",".join(f"glob:**/lib/{lib}.so" for lib in ("libawt_xawt", "libmlib_image", "libfontmanager",
                                                           "libjsound", "libsplashscreen", "liblcms", "libjavajpeg"))
DEBS = ("wrk", "libluajit-5.1-2", "libluajit-5.1-common")
WHEELS = ("torchserve", "torch-model-archiver", "pillow-heif")  # pinned in requirements.txt; the image lacks them
PLATFORMS = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
             for a in ("--platform", p)]
VARIANTS = {"tensorrt_fp16": "training.variants.tensorrt_engine", "aoti_cuda": "training.variants.aot_inductor"}


@dataclass(frozen=True)
class Sizes:
    """What differs between the GPU run and the CPU dry run."""
    train: tuple[str, ...]  # training.train options for the served model
    ddp: tuple[str, ...]
    levels: tuple[int, ...]  # wrk connections
    seconds: float  # per served point
    budgets: dict[str, int]  # seconds per step


GPU = Sizes(("--input-size", "224", "--epochs", "2"), ("--input-size", "64", "--epochs", "1"), (1, 16, 64), 6,
            {"environment": 15, "install": 40, "model": 75, "variants": 120, "serve": 150, "tests": 100, "ddp": 40})
DRY = Sizes(("--input-size", "32", "--epochs", "1"), ("--input-size", "32", "--epochs", "1"), (1, 4), 2,
            {"environment": 30, "install": 30, "model": 180, "variants": 120, "serve": 300, "tests": 300, "ddp": 180})


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        name, _, version = line.split(";")[0].strip().partition("==")
        if version:
            found[name.split("[")[0].lower()] = version.strip()
    found["captum"] = (ROOT / "benchmarks" / "requirements.txt").read_text().split("captum==")[1].split()[0]
    return found


# --- here, before a GPU comes ----------------------------------------------------------------
def prepare() -> None:
    """.gpu/: wheels for the image's Python 3.12, a Java runtime and wrk, then the size against the carry limit."""
    shutil.rmtree(CARRY, ignore_errors=True)
    (CARRY / "wheels").mkdir(parents=True)
    version = pins()
    wanted = [f"{n}=={version[n]}" for n in (*WHEELS, "captum")] + ["enum-compat==0.0.3"]
    run_here([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
              "3.12", "--implementation", "cp", *PLATFORMS, "-d", str(CARRY / "wheels"), *wanted])
    for wheel in (CARRY / "wheels").glob("torchserve-*.whl"):
        pack_jars(wheel)
    with tempfile.TemporaryDirectory() as tmp:
        jre = Path(tmp) / "jre"
        run_here(["jlink", "--add-modules", JRE_MODULES, "--compress=0", "--strip-debug", "--no-header-files",
                  "--no-man-pages", "--strip-native-debug-symbols=objcopy=/usr/bin/objcopy",
                  f"--exclude-files={JRE_UNUSED}", "--output", str(jre)])
        run_here(["tar", "-C", tmp, "-cJf", str(CARRY / "jre.tar.xz"), "jre"], env={**os.environ, "XZ_OPT": "-9"})
    (CARRY / "debs").mkdir()
    run_here(["apt-get", "download", *DEBS], cwd=CARRY / "debs")
    tracked = subprocess.run(["git", "ls-files", "-z"], capture_output=True, cwd=ROOT, check=True).stdout
    tree = sum((ROOT / p).stat().st_size for p in tracked.decode().split("\0") if p and (ROOT / p).is_file())
    carried = sum(p.stat().st_size for p in CARRY.rglob("*") if p.is_file())
    print(f"{CARRY}: {carried / 2**20:.1f} MiB, with the tree {(carried + tree) / 2**20:.1f} MiB "
          f"(a device call carries {CARRY_LIMIT // 2**20} MiB)")
    if carried + tree > CARRY_LIMIT:
        sys.exit("error: too large for one device call")
    print("on the GPU machine: device run with carry ['.gpu'] and the command: bash benchmarks/gpu_check.sh")


def pack_jars(wheel: Path) -> None:
    """WHEEL -> WHEEL.tar.xz with its jars unpacked: TorchServe's 42 MB wheel is mostly a jar of class files, which
    xz packs to less than half. unpack_wheel rebuilds the jar and the wheel (RECORD too) with the same files."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "-".join(wheel.name.split("-")[:2])
        zipfile.ZipFile(wheel).extractall(tree)
        for jar in list(tree.rglob("*.jar")):
            zipfile.ZipFile(jar).extractall(jar.with_name(jar.name + ".d"))
            jar.unlink()
        run_here(["tar", "-C", tmp, "-cJf", f"{wheel}.tar.xz", tree.name], env={**os.environ, "XZ_OPT": "-9"})
    wheel.unlink()


def unpack_wheel(packed: Path, dest: Path) -> Path:
    """A wheel that pack_jars packed, rebuilt in DEST with `wheel pack`; returns its path."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["tar", "-C", tmp, "-xJf", str(packed)], check=True)
        tree = next(Path(tmp).iterdir())
        for unpacked in list(tree.rglob("*.jar.d")):
            names = sorted(p for p in unpacked.rglob("*") if p.is_file())
            manifest = unpacked / "META-INF" / "MANIFEST.MF"
            with zipfile.ZipFile(unpacked.with_suffix(""), "w", zipfile.ZIP_DEFLATED) as jar:
                for path in ([manifest] if manifest in names else []) + [p for p in names if p != manifest]:
                    jar.write(path, path.relative_to(unpacked).as_posix())
            shutil.rmtree(unpacked)
        dest.mkdir(parents=True, exist_ok=True)
        before = set(dest.glob("*.whl"))
        subprocess.run([sys.executable, "-m", "wheel", "pack", str(tree), "-d", str(dest)], check=True,
                       capture_output=True)
    return (set(dest.glob("*.whl")) - before).pop()


def run_here(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env)
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[:4])} ... failed: {result.stderr.strip()[-500:]}")


# --- the steps, each in its own process ----------------------------------------------------
def step_environment(work: Path, sizes: Sizes, dry: bool) -> dict[str, Any]:
    import torch

    smi = shutil.which("nvidia-smi")
    listed = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip().splitlines() if smi else []
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "gpus": listed,
            "cpu": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                         if ln.startswith("model name")), platform.processor()), "cores": os.cpu_count()}


def step_install(work: Path, sizes: Sizes, dry: bool) -> dict[str, Any]:
    """The carried Java runtime, wrk and wheels: on the GPU machine into .gpu/ and a venv over the image's torch;
    in the dry run into a scratch folder, the wheels for Python 3.12 (the image's), and only the tools used."""
    if not (CARRY / "wheels").is_dir():
        if dry:
            return {"skipped": "no .gpu/ here (bash benchmarks/gpu_check.sh --prepare makes it)"}
        raise FileNotFoundError("no .gpu/wheels: run bash benchmarks/gpu_check.sh --prepare where PyPI is reachable, "
                                "and carry .gpu to this machine")
    at = home(work, dry)
    at.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-C", str(at), "-xJf", str(CARRY / "jre.tar.xz")], check=True)
    for deb in sorted((CARRY / "debs").glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(at / "root")], check=True)
    wheels = [unpack_wheel(p, at / "wheels") for p in sorted((CARRY / "wheels").glob("*.whl.tar.xz"))]
    wheels += sorted(p for p in (CARRY / "wheels").glob("*.whl") if not p.name.startswith("captum"))
    captum = sorted((CARRY / "wheels").glob("captum*.whl"))
    if dry:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(at / "site"),
               "--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:", *PLATFORMS]
        subprocess.run([*pip, *map(str, wheels + captum)], check=True)
    else:
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(at / "venv")], check=True)
        pip = [str(at / "venv" / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        subprocess.run([*pip, *map(str, wheels)], check=True)
        subprocess.run([*pip, "--target", str(ROOT / "benchmarks" / ".captum"), *map(str, captum)], check=True)
    env = tool_env(at)
    java = subprocess.run(["java", "-version"], capture_output=True, text=True, env=env, check=True)
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, env=env)
    return {"home": str(at), "wheels": [p.name for p in wheels + captum], "java": java.stderr.splitlines()[0],
            "wrk": (wrk.stdout + wrk.stderr).splitlines()[0], "wrk_path": shutil.which("wrk", path=env["PATH"])}


def step_model(work: Path, sizes: Sizes, dry: bool) -> dict[str, Any]:
    model = work / "model"
    start = time.monotonic()
    for cmd in (["-m", "training.train", "--out", str(model), *sizes.train, "--no-progress"],
                ["-m", "training.export", str(model)]):
        subprocess.run([sys.executable, *cmd], check=True, cwd=ROOT)
    return {"dir": str(model), "seconds": round(time.monotonic() - start, 1), **card_summary(model)}


def step_variants(work: Path, sizes: Sizes, dry: bool) -> dict[str, Any]:
    """Build each CUDA-only variant (its own parity check), then gate and archive it with build_mar.sh."""
    from benchmarks.archives import BuildError, build_ours

    model, rows = model_dir(work), {}
    for variant, module in VARIANTS.items():
        cmd = [sys.executable, "-m", module, str(model), "--no-progress",
               *(["--variant", variant] if "aot" in module else [])]
        start = time.monotonic()
        built = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        row: dict[str, Any] = {"seconds": round(time.monotonic() - start, 1)}
        if built.returncode != 0:
            row |= {"status": "refused", "reason": last_line(built.stderr)}
        else:
            out = model / "variants" / variant
            row |= {"status": "built", **card_summary(out)}
            try:
                build_ours(out, work / "store", f"ours_{variant}", None, "gpu")
                row["gate"] = "passed"
            except BuildError as e:
                row |= {"gate": "refused", "reason": str(e)}
        rows[variant] = row
    return rows


def step_serve(work: Path, sizes: Sizes, dry: bool) -> dict[str, Any]:
    """Stock image_classifier on the fp32 TorchScript, and ours fp32, AMP and the fastest gated GPU variant, each
    at the same connections under wrk, with GPU memory and utilisation; in-process figures for the ratio."""
    import psutil
    import torch

    from benchmarks import inputs, stock
    from benchmarks.archives import build_ours
    from benchmarks.inprocess import measure_variant
    from benchmarks.run import served_config
    from benchmarks.served import Bench

    cuda = torch.cuda.is_available()
    model, store = model_dir(work), work / "store"
    digits = inputs.digits(model, work / "inputs", 64)
    bodies = digits.bodies()
    built = read_step(work, "variants")
    candidates = [model / "variants" / v for v, row in built.items() if row.get("gate") == "passed"]
    ours: dict[str, tuple[Path, Path | None, dict[str, Any]]] = {"fp32": (model, None, {})}
    if cuda:
        ours["amp_bf16"] = (model, served_config(model, None, work, "bf16")[0], {"amp": "bf16"})
    inproc = {}
    for name, (d, _, options) in [*ours.items(), *((p.name, (p, None, {})) for p in candidates)]:
        rows = measure_variant(d, bodies, 1.0, options=options, gpu=cuda, batches=(1, 8))
        inproc[name] = max(r["images_per_s"] for r in rows if r["decode"])
    fastest = max(inproc, key=inproc.__getitem__)
    if fastest not in ours:
        ours[fastest] = (model / "variants" / fastest, None, {})
    stock_mar = stock.build(model, store)
    mars = {n: build_ours(d, store, f"ours_{n}", cfg, "gpu" if cuda else "cpu").name
            for n, (d, cfg, _) in ours.items()}
    points = []
    with stock.server(work / "ts-stock", store, "default") as bench:
        points += serve_points(bench, "stock", stock_mar.name, digits, sizes)
    with Bench(work / "ts-ours", store) as bench:
        java = psutil.Process(bench.frontend_pid()).exe()
        for name, mar in mars.items():
            points += serve_points(bench, name, mar, digits, sizes)
    top = max(sizes.levels)
    at = {p["server"]: p for p in points if p["connections"] == top}
    return {"java": java, "inprocess_images_per_s": inproc, "fastest": fastest, "points": points,
            "served_over_inprocess": round(at[fastest]["rps"] / inproc[fastest], 3),
            f"fastest_over_stock_at_{top}": round(at[fastest]["rps"] / at["stock"]["rps"], 2),
            "errors": sum(p["errors"] for p in points)}


def serve_points(bench: Any, name: str, mar: str, digits: Any, sizes: Sizes) -> list[dict[str, Any]]:
    bench.register(name, mar)
    try:
        bench.prime(name, digits.files[0].read_bytes(), digits.list_file, sizes.seconds)
        rows = []
        for c in sizes.levels:
            with GpuSampler() as gpu:
                result, _ = bench.measure(name, digits.list_file, c, sizes.seconds)
            rows.append({"server": name, "connections": c, "rps": result.rps, "p50_ms": result.p50_ms,
                         "p99_ms": result.p99_ms, "errors": result.errors, **gpu.summary()})
            print(f"{name} c{c}: {result.rps:.1f} req/s, p99 {result.p99_ms:.1f} ms", flush=True)
        return rows
    finally:
        bench.unregister(name)


class GpuSampler:
    """nvidia-smi every 200 ms while a point runs: peak memory and mean utilisation (None without a GPU)."""

    def __enter__(self) -> GpuSampler:
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        smi = shutil.which("nvidia-smi")
        while smi and not self.stop.wait(0.2):
            out = subprocess.run([smi, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.split("\n")[0]
            util, mem = (float(x) for x in out.split(","))
            self.samples.append((util, mem))

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def summary(self) -> dict[str, float | None]:
        if not self.samples:
            return {"gpu_util_pct": None, "gpu_mem_mib": None}
        return {"gpu_util_pct": round(sum(u for u, _ in self.samples) / len(self.samples), 1),
                "gpu_mem_mib": max(m for _, m in self.samples)}


def step_tests(work: Path, sizes: Sizes, dry: bool) -> dict[str, Any]:
    junit = work / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:randomly", "-p", "no:cacheprovider", "-q",
           "tests/test_gpu.py", "tests/test_handler.py", "tests/test_runtimes.py", f"--junitxml={junit}"]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "GPU_CHECK_DEVICE": "cpu" if dry else "cuda"})
    cases = ET.parse(junit).getroot().iter("testcase")
    outcome = {}
    for case in cases:
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcome[f"{case.get('classname')}::{case.get('name')}"] = kinds[0] if kinds else "passed"
    counts = {k: sum(v == k for v in outcome.values()) for k in ("passed", "failure", "error", "skipped")}
    return {"exit": result.returncode, **counts, "cases": outcome}


def step_ddp(work: Path, sizes: Sizes, dry: bool) -> dict[str, Any]:
    """Two GPUs or more: training.train under torchrun, two nccl processes. One: a DDP training step in a
    one-process nccl group (gloo in the dry run), since training.train joins no group for a single process."""
    import torch

    procs = min(2, torch.cuda.device_count())
    if procs < 2:
        return ddp_step_alone(torch.cuda.is_available())
    out = work / "ddp"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    subprocess.run([torchrun, "--standalone", f"--nproc_per_node={procs}", "-m", "training.train", "--out", str(out),
                    *sizes.ddp, "--no-progress"], check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    training = json.loads((out / "metadata.json").read_text())["training"]
    return {"processes": procs, "backend": training["backend"], "world_size": training["world_size"],
            "seconds": training.get("seconds"), "test_top1": card_summary(out).get("top1")}


def ddp_step_alone(cuda: bool) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torchvision.models import resnet18

    from deploy.processes import free_ports

    backend, device = ("nccl", torch.device("cuda", 0)) if cuda else ("gloo", torch.device("cpu"))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_ports(1)[0]}", rank=0, world_size=1)
    try:
        model = DistributedDataParallel(resnet18(num_classes=10).to(device), device_ids=[0] if cuda else None)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(32, 3, 64, 64, device=device), torch.randint(0, 10, (32,), device=device)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(round(float(loss), 4))
        total = torch.ones(1, device=device)
        dist.all_reduce(total)
        return {"processes": 1, "backend": dist.get_backend(), "world_size": dist.get_world_size(),
                "losses": losses, "all_reduce": float(total)}
    finally:
        dist.destroy_process_group()


STEPS: dict[str, Callable[[Path, Sizes, bool], dict[str, Any]]] = {
    "environment": step_environment, "install": step_install, "model": step_model, "variants": step_variants,
    "serve": step_serve, "tests": step_tests, "ddp": step_ddp}


# --- helpers ---------------------------------------------------------------------------------
def model_dir(work: Path) -> Path:
    path = Path(read_step(work, "model").get("dir", work / "model"))
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"no trained model in {path}: the model step did not finish")
    return path


def card_summary(model: Path) -> dict[str, Any]:
    card = json.loads((model / "metadata.json").read_text())
    summary = {"variant": card["variant"], "runtime": card["runtime"], "top1": (card.get("metrics") or {}).get(
        "test", {}).get("top1")}
    return summary | ({"parity": card["export"].get("parity")} if card.get("export") else {})


def read_step(work: Path, name: str) -> dict[str, Any]:
    path = work / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][-400:] if lines else ""


def home(work: Path, dry: bool) -> Path:
    """Where the carried tools are unpacked: .gpu/ on the GPU machine, a scratch folder in the dry run."""
    return work / "carried" if dry else CARRY


def tool_env(at: Path) -> dict[str, str]:
    """The steps' environment: the venv, the carried Java runtime and wrk once step_install has unpacked them."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    paths = [at / "venv" / "bin", at / "jre" / "bin", at / "root" / "usr" / "bin"]
    env["PATH"] = os.pathsep.join([*(str(p) for p in paths if p.is_dir()), env["PATH"]])
    if (at / "jre").is_dir():
        env["JAVA_HOME"] = str(at / "jre")
    libs = at / "root" / "usr" / "lib" / "x86_64-linux-gnu"
    if libs.is_dir():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libs), env.get("LD_LIBRARY_PATH")]))
    return env


def python(at: Path) -> str:
    venv = at / "venv" / "bin" / "python"
    return str(venv) if venv.is_file() else sys.executable


def acceptance(steps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    tests, serve, variants = (steps[k].get("result") or {} for k in ("tests", "serve", "variants"))
    top = [k for k in serve if k.startswith("fastest_over_stock_at_")]
    return {
        "cuda_tests_pass": bool(tests) and tests.get("exit") == 0 and tests.get("skipped", 1) == 0,
        "served_over_inprocess_ge_0.8": serve.get("served_over_inprocess", 0) >= 0.8,
        "fastest_ge_5x_stock_no_errors": bool(top) and serve[top[0]] >= 5 and serve.get("errors", 1) == 0,
        "tensorrt_and_aoti_gated": all(variants.get(v, {}).get("gate") == "passed" for v in VARIANTS),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", action="store_true", help="fill .gpu/ here (needs PyPI, jlink and apt-get)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (CI)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks/results/gpu"))
    ap.add_argument("--model", type=Path, default=None, help="a trained model directory carried along")
    ap.add_argument("--only", default=None, help="comma-separated steps (default: all)")
    ap.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)  # one step, in this process
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = DRY if args.dry_run else GPU
    if args.prepare:
        prepare()
        return 0
    if args.step:
        result = STEPS[args.step](args.work, sizes, args.dry_run)
        (args.work / f"{args.step}.json").write_text(json.dumps(result, indent=1, default=str))
        return 0
    return run_all(args, sizes)


def run_all(args: argparse.Namespace, sizes: Sizes) -> int:
    """Every step in turn, each in a child process under its budget; the report is rewritten after each."""
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    if args.model:
        (work / "model.json").write_text(json.dumps({"dir": str(args.model.resolve())}))
    names = args.only.split(",") if args.only else list(STEPS)
    report: dict[str, Any] = {"command": "bash benchmarks/gpu_check.sh " + " ".join(sys.argv[1:]),
                              "dry_run": args.dry_run, "steps": {}}
    log = (args.out / "gpu_check.log").open("w")
    started = time.monotonic()
    for name in names:
        if name == "model" and args.model:
            continue
        t0 = time.monotonic()
        print(f"==> {name} (budget {sizes.budgets[name]} s, {t0 - started:.0f} s in)", file=log, flush=True)
        print(f"[{t0 - started:5.0f} s] {name} ...", flush=True)
        at = home(work, args.dry_run)
        cmd = [python(at), "-m", "benchmarks.gpu_check", "--step", name, "--work", str(work),
               *(["--dry-run"] if args.dry_run else [])]
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=tool_env(at),
                                  timeout=sizes.budgets[name])
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode}; gpu_check.log)"
        except subprocess.TimeoutExpired:
            status = f"out of time ({sizes.budgets[name]} s)"
        entry = {"status": status, "seconds": round(time.monotonic() - t0, 1), "result": read_step(work, name)}
        report["steps"][name] = entry
        print(f"[{time.monotonic() - started:5.0f} s] {name}: {status}", flush=True)
        report["seconds"] = round(time.monotonic() - started, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    if not (args.only or args.dry_run):  # the dry run's CPU figures say nothing of a GPU
        report["acceptance"] = acceptance(report["steps"])
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    log.close()
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out / 'gpu_check.json'} and gpu_check.log ({report['seconds']} s)")
    return 0 if all(s["status"] == "ok" for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
