"""TorchServe's gRPC stubs, generated at install time from the protos inside the installed TorchServe.

    python -m deploy.grpc_stubs        # (re)generate deploy/ts_grpc/ if missing or made from another jar

    from deploy.grpc_stubs import load
    stubs = load()                     # generates first if needed
    stub = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)

The protos come from the wheel's model-server.jar, so the stubs always match the server that is installed: nothing
is copied into the repo. deploy/ts_grpc/ is gitignored and carries a stamp (the jar's sha256 and the grpcio-tools
version); a matching stamp means there is nothing to do, so deploy/setup.sh runs this every time.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import importlib.util
import re
import shutil
import sys
import tempfile
import warnings
import zipfile
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

from handlers.contract import sha256

PACKAGE = Path(__file__).resolve().parent / "ts_grpc"
STAMP_FILE = "STAMP"
# inference.proto imports google/rpc/status.proto, which TorchServe's jar carries at its root (protobuf's own
# google/protobuf/*.proto come from grpc_tools). googleapis-common-protos is not a requirement, so status_pb2 is
# generated too, inside the package; should that package be imported as well, its descriptor is byte-identical,
# which protobuf accepts twice.
PROTOS = {"proto/inference.proto": "inference.proto", "proto/management.proto": "management.proto",
          "google/rpc/status.proto": "google/rpc/status.proto"}
SERVICES = ("inference.proto", "management.proto")
# protoc writes absolute imports (`import inference_pb2`, `from google.rpc import status_pb2`) that only work with
# the output directory on sys.path; made relative, the stubs are an ordinary package.
ABSOLUTE_IMPORT = re.compile(r"^(?:import (\w+_pb2)|from google\.rpc import (\w+_pb2)) as ", re.MULTILINE)
SETUP_HINT = "run bash deploy/setup.sh (grpcio-tools is pinned in requirements.txt)"


class StubsError(RuntimeError):
    """The stubs cannot be generated: no TorchServe, no grpc_tools, or protoc failed."""


class Stubs(NamedTuple):
    inference_pb2: ModuleType
    inference_pb2_grpc: ModuleType
    management_pb2: ModuleType
    management_pb2_grpc: ModuleType


def jar_path() -> Path:
    spec = importlib.util.find_spec("ts")  # finds, does not import, TorchServe's Python package
    if spec is None or not spec.submodule_search_locations:
        raise StubsError(f"TorchServe (the 'ts' package) is not installed in {sys.prefix}; {SETUP_HINT}")
    jar = Path(list(spec.submodule_search_locations)[0]) / "frontend" / "model-server.jar"
    if not jar.is_file():
        raise StubsError(f"{jar} not found: the TorchServe install is incomplete; reinstall it ({SETUP_HINT})")
    return jar


def expected_stamp(jar: Path) -> str:
    # The generated code checks the protobuf/grpcio runtime against the generator's version, hence both.
    try:
        tools = importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError:
        raise StubsError(f"grpcio-tools is not installed, so TorchServe's gRPC stubs cannot be generated; "
                         f"{SETUP_HINT}") from None
    return f"{sha256(jar)} grpcio-tools=={tools}\n"


def installed_stamp() -> str | None:
    path = PACKAGE / STAMP_FILE
    return path.read_text() if path.is_file() else None


def make_relative(source: str) -> str:
    return ABSOLUTE_IMPORT.sub(lambda m: f"from . import {m.group(1) or m.group(2)} as ", source)


def compile_protos(jar: Path, out: Path) -> None:
    try:
        from grpc_tools import protoc
    except ImportError:
        raise StubsError(f"grpc_tools is not importable, so TorchServe's gRPC stubs cannot be generated; "
                         f"{SETUP_HINT}") from None
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        with zipfile.ZipFile(jar) as zf:
            for member, name in PROTOS.items():
                try:
                    data = zf.read(member)
                except KeyError:
                    raise StubsError(f"{jar} has no {member}; is this TorchServe 0.12?") from None
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                (src / name).write_bytes(data)
        includes = [f"-I{src}", f"-I{importlib.resources.files('grpc_tools') / '_proto'}"]
        # Messages for every proto; service stubs only where there are services.
        for flag, protos in (("--python_out", list(PROTOS.values())), ("--grpc_python_out", list(SERVICES))):
            rc = protoc.main(["grpc_tools.protoc", *includes, f"{flag}={out}", *(str(src / p) for p in protos)])
            if rc != 0:
                raise StubsError(f"grpc_tools.protoc {flag} failed with exit code {rc} (its message is above)")
    (out / "google" / "rpc" / "status_pb2.py").rename(out / "status_pb2.py")
    shutil.rmtree(out / "google")
    for path in out.glob("*_pb2*.py"):
        path.write_text(make_relative(path.read_text()))
    (out / "__init__.py").write_text('"""TorchServe\'s gRPC stubs, generated by python -m deploy.grpc_stubs from '
                                     'the installed model-server.jar. Do not edit; not in git."""\n')


def generate() -> bool:
    """Generate the stubs unless they exist from the same jar and generator; True if generated."""
    jar = jar_path()
    stamp = expected_stamp(jar)
    if installed_stamp() == stamp:
        return False
    # Build beside the package and rename into place, so that a reader never sees half a package and concurrent
    # generators (parallel test runs) converge on one complete copy.
    with tempfile.TemporaryDirectory(dir=PACKAGE.parent, prefix=f"{PACKAGE.name}.") as tmp:
        build = Path(tmp) / PACKAGE.name
        build.mkdir()
        compile_protos(jar, build)
        (build / STAMP_FILE).write_text(stamp)
        shutil.rmtree(PACKAGE, ignore_errors=True)
        try:
            build.rename(PACKAGE)
        except OSError:
            if installed_stamp() != stamp:  # not another generator that got there first
                raise
    importlib.invalidate_caches()
    return True


@cache
def load() -> Stubs:
    """The four stub modules, generated first if missing or stale. Where they cannot be checked (a client-only
    install without TorchServe or grpcio-tools), existing stubs are used as they are."""
    try:
        generate()
    except StubsError as e:
        if installed_stamp() is None:
            raise
        warnings.warn(f"using the gRPC stubs in {PACKAGE} unchecked: {e}", stacklevel=2)
    return Stubs(*(importlib.import_module(f"{__package__}.{PACKAGE.name}.{name}") for name in Stubs._fields))


def main() -> None:
    try:
        generated = generate()
    except StubsError as e:
        sys.exit(f"error: {e}")
    where = PACKAGE.relative_to(Path.cwd()) if PACKAGE.is_relative_to(Path.cwd()) else PACKAGE
    print(f"gRPC stubs {'generated in' if generated else 'up to date in'} {where}")


if __name__ == "__main__":
    main()
