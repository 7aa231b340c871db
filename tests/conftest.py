"""Shared fixtures: a tiny model trained once per session, archives built from it, and real TorchServe."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from handlers.contract import ModelCard  # noqa: E402
from harness.torchserve import TorchServe  # noqa: E402
from packager import golden  # noqa: E402
from packager.manifest import read_manifest, write_manifest  # noqa: E402
from training import export, train  # noqa: E402
from training.data import Splits  # noqa: E402
from training.evaluate import splits_for  # noqa: E402
from training.technique import build  # noqa: E402
from training.variants.pruned import PRUNED  # noqa: E402

TINY_SIZE = 32  # resnet18 at 32x32 trains to ~97% on the digits in ~15 s on 2 cores
TINY_ARGS = ["--input-size", str(TINY_SIZE), "--epochs", "3", "--no-progress"]


def pytest_addoption(parser: pytest.Parser) -> None:
    # tests/test_reliability.py: the CI form is the default; longer soaks by flag.
    parser.addoption("--soak-seconds", type=float, default=60, help="soak duration at ~80%% of max (default 60)")
    parser.addoption("--figures-out", type=Path, default=None, help="write the reliability figures as JSON here")


def is_slow(item: pytest.Item) -> bool:
    return item.get_closest_marker("slow") is not None


@pytest.hookimpl(trylast=True)  # after pytest-randomly has shuffled
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The fast tier first, then the slow one, each in its shuffled order: one session, so both tiers share the
    session's fixtures (the tiny model, its archives, the variants), and a fast failure ends the run early."""
    items.sort(key=is_slow)


def pytest_sessionstart(session: pytest.Session) -> None:
    session.stash[STARTED] = time.monotonic()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[object]:
    result = yield
    if nextitem is not None and not is_slow(item) and is_slow(nextitem):
        session = item.session
        seconds = time.monotonic() - session.stash[STARTED]
        reporter = item.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"\n==> fast tier: {session.testsfailed} failed, {seconds:.0f} s; the slow tier next")
        if session.testsfailed:
            session.shouldstop = "the fast tier failed; the slow tier did not run"
    return result


STARTED = pytest.StashKey[float]()
TORCH_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """A handler initialized in the test process sizes torch's threads for a worker (cores / workers);
    put the process default back so later tests train and time at full speed."""
    yield
    torch.set_num_threads(TORCH_THREADS)


def train_tiny(out: Path, *extra: str) -> Path:
    train.main(["--out", str(out), *TINY_ARGS, *extra])
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet18 @ 32px, trained and exported to frozen TorchScript."""
    out = train_tiny(tmp_path_factory.mktemp("models") / "tiny")
    export.export_dir(out)
    return out


@pytest.fixture(scope="session")
def tiny_card(tiny_model: Path) -> ModelCard:
    return ModelCard.read(tiny_model)


@pytest.fixture(scope="session")
def tiny_splits(tiny_card: ModelCard) -> Splits:
    return splits_for(tiny_card)


@pytest.fixture(scope="session")
def pruned_parent(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny model with its structured-pruned variant (40% of channels, one fine-tune epoch),
    made through the technique interface as training.optimize makes it."""
    parent = tmp_path_factory.mktemp("optimize") / "parent"
    shutil.copytree(tiny_model, parent)
    args = argparse.Namespace(prune_ratio=0.4, prune_epochs=1, prune_lr=1e-3, seed=0, progress=False)
    build(parent, PRUNED, args)
    return parent


def build_mar(model_dir: Path, store: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real build_mar.sh, as a user would."""
    result = subprocess.run(["bash", str(ROOT / "build_mar.sh"), str(model_dir), "--store", str(store), *args],
                            capture_output=True, text=True, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"build_mar.sh failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def model_store(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("model_store")
    build_mar(tiny_model, store)
    return store


def copy_store(src: Path, dest: Path, *names: str) -> Path:
    """A private model store holding only `names` (with their manifest entries) from src."""
    dest.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(src)
    for name in names:
        shutil.copy(src / name, dest / name)
    write_manifest(dest, {n: manifest[n] for n in names})
    return dest


@contextlib.contextmanager
def serve(store: Path, workdir: Path, models: list[str], overrides: dict[str, str] | None = None,
          allow_worker_deaths: bool = False, snapshot: bool = False, env: dict[str, str] | None = None
          ) -> Iterator[TorchServe]:
    """Real TorchServe on free loopback ports; always stopped. Fails if a worker died, with the log tail."""
    ts = TorchServe(workdir, store, overrides, snapshot=snapshot, env=env)
    try:
        ts.start(wait_for=models)
        yield ts
        deaths = ts.worker_deaths()
        if deaths and not allow_worker_deaths:
            pytest.fail(f"a TorchServe worker died during the test: {deaths[:3]}\n{ts.log_tail()}")
    except BaseException:
        print(ts.log_tail(), file=sys.stderr)
        raise
    finally:
        ts.stop()


@contextlib.contextmanager
def serve_scalable(store: Path, workdir: Path, models: list[str], overrides: dict[str, str] | None = None
                   ) -> Iterator[TorchServe]:
    """`serve` for tests that scale a model to zero workers: that logs a deliberate WORKER_SCALED_DOWN, which
    is allowed; any other worker death still fails."""
    with serve(store, workdir, models, overrides, allow_worker_deaths=True) as server:
        yield server
        crashes = [line for line in server.worker_deaths() if "SCALED_DOWN" not in line]
        assert not crashes, f"a TorchServe worker died: {crashes[:3]}\n{server.log_tail()}"


@pytest.fixture(scope="session")
def images(model_store: Path) -> list[tuple[bytes, str]]:
    """The golden set packed in digits.mar: (PNG bytes, label)."""
    return golden.images(golden.from_archive(model_store / "digits.mar"))
