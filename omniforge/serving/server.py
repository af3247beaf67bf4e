"""Start and stop a real ``tritonserver`` on a repository written by ``omniforge triton``.

Where the server comes from, in order: ``--tritonserver PATH`` (or ``$OMNIFORGE_TRITONSERVER``),
``tritonserver`` on the PATH (NVIDIA's containers: every backend), then the binary bundled in
the ``nvidia-pytriton`` wheel (Python backend only). For the bundled one, what FACTS measured is
set up here: its Python-backend stub is linked against ``libpython3.X.so.1.0`` and must load the
running interpreter's own (``LD_LIBRARY_PATH`` = this interpreter's LIBDIR), it is built against
NumPy 1.x (with NumPy 2 in the models' environment it returns wrong tensors), so its models get a
NumPy 1.26 from a private folder put first on their path; and a backend folder holding the stub
for this Python version is made for the server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from omniforge.errors import ConfigError, EngineError, MissingDependencyError

STUB_NUMPY = "1.26.4"  # the NumPy the bundled stub was built against (pytriton pins numpy < 2)
SERVE_EXTRA_HINT = (
    "install the `serve` extra (`pip install 'omniforge[serve]'`; to keep NumPy 2 in this "
    "environment: `pip install --no-deps nvidia-pytriton==0.7.0` and `pip install 'tritonclient[grpc,http]'`), "
    "or run inside NVIDIA's Triton container"
)


@dataclass(frozen=True)
class TritonInstall:
    """A ``tritonserver`` binary and what it needs to run here."""

    binary: Path
    bundled: bool  # the nvidia-pytriton one: Python backend only
    version: str = ""

    @property
    def description(self) -> str:
        if self.bundled:
            return f"tritonserver {self.version or '?'} bundled in nvidia-pytriton ({self.binary}; Python backend only)"
        return f"tritonserver {self.binary}"


def _pytriton_root() -> Path | None:
    """The installed ``pytriton`` package folder, found without importing it (its imports need zmq)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_tritonserver(explicit: str | os.PathLike[str] | None = None) -> TritonInstall:
    """The server to run; ``MissingDependencyError`` (one sentence) when there is none."""
    given = explicit or os.environ.get("OMNIFORGE_TRITONSERVER")
    if given:
        p = Path(given)
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise MissingDependencyError(f"tritonserver '{p}' is not an executable file")
        return TritonInstall(p, bundled=_bundled_root(p) is not None)
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path), bundled=_bundled_root(Path(on_path)) is not None)
    root = _pytriton_root()
    binary = root / "tritonserver" / "bin" / "tritonserver" if root else None
    if binary is None or not binary.is_file():
        raise MissingDependencyError(
            f"no tritonserver found (none given, none on the PATH, no nvidia-pytriton): {SERVE_EXTRA_HINT}"
        )
    version = ""
    try:
        from importlib.metadata import version as dist_version

        version = {"0.7.0": "2.51"}.get(dist_version("nvidia-pytriton"), "")
    except Exception:  # metadata missing: the version is only informative
        version = ""
    return TritonInstall(binary, bundled=True, version=version)


def _bundled_root(binary: Path) -> Path | None:
    """The ``tritonserver`` folder of nvidia-pytriton if ``binary`` is its bundled server."""
    root = binary.resolve().parent.parent
    return root if (root / "python_backend_stubs").is_dir() else None


def stub_site(home: Path | None = None) -> Path:
    """The private folder with NumPy 1.x for the bundled stub's models (for this Python version)."""
    from omniforge.pipeline.model_config import omniforge_home

    base = home or omniforge_home()
    return base / "triton" / f"stub-site-py{sys.version_info.major}{sys.version_info.minor}-numpy{STUB_NUMPY}"


def ensure_stub_site(log=lambda _m: None) -> Path | None:
    """A folder with NumPy < 2 for the bundled stub's models, installed once with pip when this
    environment has NumPy 2; None when this environment's NumPy already suits the stub."""
    import numpy

    if int(numpy.__version__.split(".")[0]) < 2:
        return None
    site = stub_site()
    if (site / "numpy" / "__init__.py").is_file():
        return site
    from omniforge.pipeline.atomic import atomic_folder

    log(
        f"installing numpy {STUB_NUMPY} for the bundled server's Python stub into {site} "
        f"(once; this environment has numpy {numpy.__version__}, which the stub cannot read)"
    )
    site.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(site) as tmp:
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--target",
                str(tmp),
                f"numpy=={STUB_NUMPY}",
            ],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise MissingDependencyError(
                f"cannot install numpy {STUB_NUMPY} for the bundled server's Python stub ({last}); "
                f"install it yourself with `pip install --target {site} numpy=={STUB_NUMPY}`"
            )
    return site


def bundled_backends(install: TritonInstall, into: Path) -> Path:
    """A backend folder for the bundled server: its Python backend with the stub for this Python."""
    root = _bundled_root(install.binary)
    assert root is not None
    tag = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / tag / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (root / "python_backend_stubs").iterdir())
        raise MissingDependencyError(
            f"the bundled tritonserver has no Python-backend stub for Python {tag} (it has {', '.join(have)})"
        )
    python = into / "python"
    python.mkdir(parents=True, exist_ok=True)
    for src in (
        root / "backends" / "python" / "libtriton_python.so",
        root / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ):
        (python / src.name).unlink(missing_ok=True)
        os.symlink(src, python / src.name)
    return into


def libpython_dir() -> Path:
    """The folder holding this interpreter's ``libpython3.X.so.1.0``, which the stub must load."""
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "")
    name = f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
    if not (libdir / name).is_file():
        raise MissingDependencyError(
            f"this Python ({sys.version.split()[0]}) has no shared library {name} in {libdir}; the Python "
            "backend's stub needs one (a Python built with --enable-shared)"
        )
    return libdir


def _stop_with_parent() -> None:
    """In the server's process, before exec: Linux sends it SIGINT when the process that started it
    dies, so a killed ``omniforge serve`` or test run leaves no server behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGINT)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    models: list[str] = field(default_factory=list)  # loaded at start (explicit model control)
    exit_on_error: bool = True  # a model that fails to load stops the server
    ready_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("http_port", "grpc_port", "metrics_port"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
                raise ConfigError(f"{name.replace('_', '-')} must be a port number in [1, 65535], got {v!r}")
        if len({self.http_port, self.grpc_port, self.metrics_port}) != 3:
            raise ConfigError("the HTTP, gRPC and metrics ports must differ")


class TritonServer:
    """A running ``tritonserver`` process on ``repository`` (``start``/``stop``, or ``with``)."""

    def __init__(
        self,
        repository: Path,
        options: ServerOptions,
        install: TritonInstall | None = None,
        log=lambda _m: None,
    ):
        self.repository = Path(repository)
        self.options = options
        self.install = install or find_tritonserver()
        self.log = log
        self.process: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self.log_path: Path | None = None
        self.failed = False  # the server exited or was not ready in time: its log is kept

    @property
    def http_url(self) -> str:
        return f"http://{self.options.host}:{self.options.http_port}"

    @property
    def http_address(self) -> str:
        """host:port, as tritonclient.http takes it."""
        return f"{self.options.host}:{self.options.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.options.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.options.host}:{self.options.metrics_port}/metrics"

    def command(self, backend_dir: Path | None) -> list[str]:
        o = self.options
        cmd = [
            str(self.install.binary),
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in o.models),
            "--strict-model-config=true",
            "--strict-readiness=true",
            f"--exit-on-error={'true' if o.exit_on_error else 'false'}",
            "--exit-timeout-secs=5",
            f"--http-address={o.host}",
            f"--http-port={o.http_port}",
            f"--grpc-address={o.host}",
            f"--grpc-port={o.grpc_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            f"--metrics-address={o.host}",
            f"--metrics-port={o.metrics_port}",
        ]
        if backend_dir is not None:
            cmd.append(f"--backend-directory={backend_dir}")
        return cmd

    def environment(self, stub_numpy: Path | None) -> dict[str, str]:
        env = dict(os.environ)
        paths = [str(stub_numpy)] if stub_numpy else []
        # the models import the omniforge that wrote the repository, installed or not
        paths.append(str(Path(__file__).resolve().parents[2]))
        env["PYTHONPATH"] = os.pathsep.join(
            paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        if self.install.bundled:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                [str(libpython_dir())] + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
            )
        return env

    def start(self) -> TritonServer:
        self.workdir = Path(tempfile.mkdtemp(prefix="omniforge-triton-"))
        backend_dir = None
        stub_numpy = None
        if self.install.bundled:
            backend_dir = bundled_backends(self.install, self.workdir / "backends")
            stub_numpy = ensure_stub_site(self.log)
            if stub_numpy:
                self.log(
                    f"models run with numpy {STUB_NUMPY} from {stub_numpy} (the bundled stub needs numpy < 2)"
                )
        env = self.environment(stub_numpy)
        self.log_path = self.workdir / "tritonserver.log"
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                self.command(backend_dir),
                cwd=self.workdir,  # the stub puts its working folder first on sys.path: keep it empty of modules
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_stop_with_parent,
            )
        return self

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def post(self, path: str, body: dict, timeout: float = 5.0) -> tuple[int, bytes]:
        req = urllib.request.Request(self.http_url + path, data=json.dumps(body).encode(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait(self, ready: bool = True) -> float:
        """Seconds until the server is ready (``ready``) or at least live; ``EngineError`` with the
        log's last error line when it exits first or the time runs out."""
        assert self.process is not None
        t0 = time.monotonic()
        path = "/v2/health/ready" if ready else "/v2/health/live"
        while time.monotonic() - t0 < self.options.ready_timeout_s:
            if self.process.poll() is not None:
                self.failed = True
                raise EngineError(
                    f"tritonserver exited with status {self.process.returncode}: {self.last_error()}"
                )
            try:
                if self.get(path, timeout=1.0)[0] == 200:
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.1)
        self.failed = True
        raise EngineError(
            f"tritonserver was not {'ready' if ready else 'live'} within {self.options.ready_timeout_s:.0f} s: {self.last_error()}"
        )

    def model_states(self) -> dict[str, tuple[str, str]]:
        """Model name -> (state, reason) from the repository index."""
        status, body = self.post("/v2/repository/index", {})
        if status != 200:
            raise EngineError(f"the repository index answered HTTP {status}")
        return {m["name"]: (m.get("state", ""), m.get("reason", "")) for m in json.loads(body)}

    def last_error(self) -> str:
        """The last error line of the server's log (a model that could not load says why)."""
        if self.log_path is None or not self.log_path.is_file():
            return "no log"
        lines = self.log_path.read_text(errors="replace").splitlines()
        errors = [
            ln for ln in lines if ln.startswith("E") and "CudaDriverHelper" not in ln and "DCGM" not in ln
        ]
        line = (errors or lines or ["no output"])[-1].split("\\n\\nAt:")[
            0
        ]  # the stub's traceback follows "At:"
        return f"{' '.join(line.split())[:500]} (log: {self.log_path})"

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server (SIGINT, then SIGKILL after ``timeout``) and remove its working folder
        (kept, with the log, when the server failed)."""
        p = self.process
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)  # the server and the stubs it started
                p.wait()
        if p is not None:  # stubs left behind by a killed server share its process group
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.workdir is not None and not self.failed:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
