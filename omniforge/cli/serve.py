"""``omniforge serve``: a real ``tritonserver`` on a build (or on a repository from ``omniforge triton``)."""

from __future__ import annotations

import argparse
import signal
import tempfile
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from omniforge.cli.triton import add_repository_args

    p = sub.add_parser(
        "serve",
        help="serve a build with Triton Inference Server (HTTP, gRPC, metrics on 127.0.0.1)",
        description="Write a Triton model repository for BUILD to a temporary folder (or take --repo) "
        "and run tritonserver on it until interrupted: the server given with --tritonserver, one on "
        "the PATH (NVIDIA's containers), or the one bundled in nvidia-pytriton (the `serve` extra; "
        "Python backend only). Readiness: GET /v2/health/ready; metrics on --metrics-port.",
    )
    p.add_argument("build", nargs="?", help="build folder (or give --repo)")
    p.add_argument(
        "--repo", help="serve this repository (written by `omniforge triton`) instead of writing one"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
    p.add_argument(
        "--models",
        help="comma-separated models to load, or 'all' (default: llm, any2any, omniforge_build and the "
        "per-stage models any2any calls; on a full Triton also every onnxruntime/tensorrt stage model)",
    )
    p.add_argument(
        "--tritonserver", help="path of the tritonserver binary (default: PATH, then nvidia-pytriton's)"
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the server to be ready (default 300)",
    )
    add_repository_args(p)
    p.set_defaults(run=run)


def models_to_load(repo, install, wanted: str | None) -> list[str]:
    """The models loaded at start: ``wanted`` (a list or 'all'), else the defaults for this server."""
    from omniforge.errors import ConfigError
    from omniforge.serving.repository import SUFFIX

    servable = [m for m in repo.models if m.backend == "python" or not install.bundled]
    if wanted == "all":
        return [m.name for m in servable]
    if wanted:
        names = [n.strip() for n in wanted.split(",") if n.strip()]
        known = {m.name: m for m in repo.models}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"the repository has no model(s) {unknown} (it has: {', '.join(known)})")
        if install.bundled:
            other = [n for n in names if known[n].backend != "python"]
            if other:
                raise ConfigError(
                    f"the bundled tritonserver has only the Python backend; it cannot load {other}"
                )
        return names
    chosen = [m.name for m in repo.models if m.kind in ("llm", "any2any", "build")]
    stages = repo.options.any2any_stages
    if stages != "process":
        chosen += [m.name for m in repo.models if m.kind == "stage" and m.name.endswith(SUFFIX[stages])]
    if not install.bundled:
        chosen += [
            m.name for m in repo.models if m.backend in ("onnxruntime", "tensorrt") and m.name not in chosen
        ]
    if install.bundled and stages in ("onnxruntime", "tensorrt"):
        raise ConfigError(
            f"the repository's any2any calls the {stages} stage models, which the bundled tritonserver cannot serve"
        )
    return chosen


def run(args: argparse.Namespace) -> int:
    from omniforge.cli._common import log
    from omniforge.cli.triton import repository_options
    from omniforge.errors import ConfigError, EngineError
    from omniforge.serving.repository import read_repository, write_repository
    from omniforge.serving.server import ServerOptions, TritonServer, find_tritonserver

    if bool(args.build) == bool(args.repo):
        raise ConfigError("give a build folder or --repo REPOSITORY (one of them)")
    options = ServerOptions(
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        ready_timeout_s=args.ready_timeout,
    )
    install = find_tritonserver(args.tritonserver)  # before writing anything: one sentence if missing
    log(f"server: {install.description}")
    with tempfile.TemporaryDirectory(prefix="omniforge-serve-") as tmp:
        if args.repo:
            repo = read_repository(args.repo)
            log(f"repository: {repo.path} ({len(repo.models)} models)")
        else:
            repo = write_repository(
                args.build, Path(tmp) / "repository", repository_options(args), log=lambda m: log(m)
            )
        options.models = models_to_load(repo, install, args.models)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            log(
                f"binding {args.host}: the server is reachable from other machines (it has no authentication)"
            )
        server = TritonServer(repo.path, options, install, log=log)
        log(f"starting: loading {len(options.models)} models ({', '.join(options.models)})")
        # SIGINT too: a server started in the background of a script inherits it ignored
        previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.start()
            took = server.wait()
            log(
                f"ready in {took:.1f} s: HTTP {server.http_url} (readiness {server.http_url}/v2/health/ready), "
                f"gRPC {server.grpc_url}, metrics {server.metrics_url}; Ctrl-C stops it"
            )
            while server.process.poll() is None:
                time.sleep(0.5)
            server.failed = True
            raise EngineError(
                f"tritonserver stopped by itself (status {server.process.returncode}): {server.last_error()}"
            )
        except KeyboardInterrupt:
            log("stopping")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            server.stop()
        log("stopped")
    return 0


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt
