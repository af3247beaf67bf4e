"""Load on a running omniforge Triton server (``omniforge bench --server``).

Closed-loop clients over gRPC, as users write them (tritonclient): text requests stream from the
``llm`` model (one stream per client), image requests go to the ``any2any`` model with ``force``
= image. For each request kind and each number of concurrent clients, every client sends its
requests one after the other; the clients start together. Reported per (kind, clients): requests/s,
tokens/s, time to first token p50 and per-token latency p50 (text), end-to-end p50/p99, and the
errors by kind. tritonclient is imported only when a load runs.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omniforge.errors import ConfigError, EngineError, MissingDependencyError

KINDS = ("text", "image")
MODEL = {"text": "llm", "image": "any2any"}
DEFAULT_GRPC_PORT = 8001
TEXT_PROMPTS = (
    "A dog runs",
    "The harbour at night",
    "Once upon a time",
    "Colours of the sea",
    "Tell me about rivers",
    "Describe a quiet morning",
    "Why is the sky blue?",
    "A short story about a lighthouse",
)
IMAGE_PROMPTS = (
    "Make a picture of a harbour",
    "Make a picture of a boat",
    "Make a picture of a hill",
    "Make a picture of a red bird",
)

Log = Callable[[str], None]


def _grpc() -> Any:
    """``tritonclient.grpc``, or one sentence naming the ``serve`` extra."""
    try:
        import tritonclient.grpc as grpcclient
    except ImportError:
        raise MissingDependencyError(
            "omniforge bench --server needs tritonclient, which is not installed: install the `serve` "
            "extra (`pip install 'omniforge[serve]'`, or only the client: `pip install 'tritonclient[grpc]'`)"
        ) from None
    return grpcclient


def server_address(url: str) -> str:
    """The gRPC ``host:port`` of ``url`` (``host``, ``host:port`` or ``grpc://host:port``; port 8001
    when none is given); ``ConfigError`` for an HTTP URL or anything else."""
    u = url.strip()
    if u.startswith(("http://", "https://")):
        raise ConfigError(
            f"--server takes the server's gRPC address (HOST:PORT, the one `omniforge serve` prints after "
            f"'gRPC'), not an HTTP URL: got {url!r}"
        )
    u = u.removeprefix("grpc://").rstrip("/")
    host, sep, port = u.rpartition(":")
    if not sep or not port.isdigit() or (":" in host and not host.startswith("[")):
        host, port = u, str(DEFAULT_GRPC_PORT)  # no port given (an IPv6 address goes in brackets)
    bad = not host or "/" in host or any(c.isspace() for c in host) or (":" in host and host[0] != "[")
    if bad or not port.isdigit():
        raise ConfigError(f"--server {url!r} is not a gRPC address (HOST:PORT, e.g. 127.0.0.1:8001)")
    if not 1 <= int(port) <= 65535:
        raise ConfigError(f"--server {url!r}: the port must lie in [1, 65535]")
    return f"{host}:{int(port)}"


@dataclass(frozen=True)
class LoadOptions:
    """What a load run sends: kinds x client counts, ``requests`` per client at each level."""

    server: str = f"127.0.0.1:{DEFAULT_GRPC_PORT}"
    clients: tuple[int, ...] = (1, 4, 16)
    kinds: tuple[str, ...] = KINDS
    requests: int = 8  # per client, at each (kind, clients) level
    warmup: int = 1  # requests per kind before measuring (not counted)
    max_new_tokens: int = 16
    steps: int = 20  # denoising steps of an image request
    timeout_s: float = 300.0  # per request
    text_prompts: tuple[str, ...] = TEXT_PROMPTS
    image_prompts: tuple[str, ...] = IMAGE_PROMPTS

    def __post_init__(self) -> None:
        if not self.clients or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.clients
        ):
            raise ConfigError(f"the numbers of clients must be >= 1, got {list(self.clients)}")
        unknown = [k for k in self.kinds if k not in KINDS]
        if not self.kinds or unknown:
            raise ConfigError(f"the request kinds must be among {', '.join(KINDS)}, got {list(self.kinds)}")
        for name in ("requests", "max_new_tokens", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be >= 0, got {self.warmup}")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {self.timeout_s}")
        if not self.text_prompts or not self.image_prompts:
            raise ConfigError("give at least one text prompt and one image prompt")

    def prompt(self, kind: str, client: int, index: int, clients: int) -> str:
        """The prompt of a client's ``index``-th request: the list in turn across all clients."""
        prompts = self.text_prompts if kind == "text" else self.image_prompts
        return prompts[(index * clients + client) % len(prompts)]


@dataclass
class Sample:
    """One request: its timings (seconds), its tokens, or the kind of error it got."""

    kind: str
    client: int
    prompt: str
    e2e_s: float = 0.0
    ttft_s: float | None = None  # streamed text only
    token_ids: list[int] = field(default_factory=list)
    images: int = 0
    error: str | None = None  # the error's kind: a gRPC status, "timeout", "stream error", ...
    message: str = ""

    @property
    def per_token_s(self) -> float | None:
        """Seconds per generated token after the first (streamed text with >= 2 tokens)."""
        n = len(self.token_ids)
        if self.ttft_s is None or n < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (n - 1)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _p(values: Sequence[float | None], q: float) -> float | None:
    """The ``q`` percentile in milliseconds of the values that are set (None if none are)."""
    v = [x for x in values if x is not None]
    return float(np.percentile(np.asarray(v) * 1000.0, q)) if v else None


@dataclass
class Level:
    """Every request of one kind at one number of concurrent clients."""

    kind: str
    clients: int
    wall_s: float
    samples: list[Sample]

    def summary(self) -> dict[str, Any]:
        ok = [s for s in self.samples if s.error is None]
        errors = Counter(s.error for s in self.samples if s.error is not None)
        examples = {}
        for s in self.samples:
            if s.error is not None:
                examples.setdefault(s.error, s.message)
        wall = max(self.wall_s, 1e-9)
        return {
            "kind": self.kind,
            "clients": self.clients,
            "requests": len(self.samples),
            "ok": len(ok),
            "wall_s": self.wall_s,
            "requests_per_s": len(ok) / wall,
            "tokens_per_s": sum(len(s.token_ids) for s in ok) / wall,
            "ttft_ms_p50": _p([s.ttft_s for s in ok], 50),
            "per_token_ms_p50": _p([s.per_token_s for s in ok], 50),
            "e2e_ms_p50": _p([s.e2e_s for s in ok], 50),
            "e2e_ms_p99": _p([s.e2e_s for s in ok], 99),
            "errors": dict(sorted(errors.items())),
            "error_examples": examples,
        }


@dataclass
class LoadReport:
    """The levels run, the kinds left out (with why), and the settings."""

    server: str
    options: LoadOptions
    levels: list[Level]
    skipped: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        o = self.options
        return {
            "server": self.server,
            "settings": {
                "clients": list(o.clients),
                "kinds": list(o.kinds),
                "requests_per_client": o.requests,
                "warmup": o.warmup,
                "max_new_tokens": o.max_new_tokens,
                "steps": o.steps,
                "timeout_s": o.timeout_s,
            },
            "results": [lv.summary() for lv in self.levels],
            "skipped": self.skipped,
        }

    def table(self) -> str:
        """The results as one Markdown table, with the settings above it."""
        o = self.options

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f}"

        lines = [
            f"# omniforge bench --server {self.server}",
            "",
            f"{_n(o.requests, 'request')} per client, greedy, {_n(o.max_new_tokens, 'new token')}; image "
            f"requests: {_n(o.steps, 'denoising step')}. Latencies in ms, over the requests that succeeded.",
            "",
            "| kind | clients | requests | requests/s | tokens/s | TTFT p50 | per-token p50 "
            "| e2e p50 | e2e p99 | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for lv in self.levels:
            s = lv.summary()
            errors = str(sum(s["errors"].values()))
            if s["errors"]:
                errors += " (" + ", ".join(f"{k}: {n}" for k, n in s["errors"].items()) + ")"
            lines.append(
                f"| {s['kind']} | {s['clients']} | {s['requests']} | {s['requests_per_s']:.2f} "
                f"| {s['tokens_per_s']:.1f} | {ms(s['ttft_ms_p50'])} | {ms(s['per_token_ms_p50'])} "
                f"| {ms(s['e2e_ms_p50'])} | {ms(s['e2e_ms_p99'])} | {errors} |"
            )
        for kind, why in self.skipped.items():
            lines += ["", f"{kind} requests not sent: {why}."]
        return "\n".join(lines)

    def write_json(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return p


# ---- clients ------------------------------------------------------------------------------------
def _tensor(grpc: Any, name: str, value: np.ndarray, dtype: str) -> Any:
    t = grpc.InferInput(name, list(value.shape), dtype)
    t.set_data_from_numpy(value)
    return t


def _error_kind(exc: BaseException) -> tuple[str, str]:
    """(kind, one-line message) of a request's error: the gRPC status when there is one."""
    message = getattr(exc, "message", None)
    text = message() if callable(message) else str(exc)
    text = " ".join(str(text).split())[:300]
    status = exc.status() if callable(getattr(exc, "status", None)) else None
    if status:
        name = str(status).rsplit(".", 1)[-1].lower()
        return ("timeout" if name == "deadline_exceeded" else name), text
    if hasattr(exc, "status"):  # a tritonclient error without a status: sent in a stream
        return "stream error", text
    return type(exc).__name__, text


class _Client:
    """One client: its own gRPC connection and (for text) its own stream, reopened after an error."""

    def __init__(self, grpc: Any, address: str, options: LoadOptions) -> None:
        self.grpc = grpc
        self.options = options
        self.client = grpc.InferenceServerClient(address)
        self.responses: queue.Queue = queue.Queue()
        self.streaming = False
        self.count = 0

    def open_stream(self) -> None:
        if not self.streaming:
            self.client.start_stream(
                callback=lambda result, error: self.responses.put((time.perf_counter(), result, error))
            )
            self.streaming = True

    def close_stream(self, cancel: bool = False) -> None:
        if self.streaming:
            self.streaming = False
            try:
                self.client.stop_stream(cancel_requests=cancel)
            except Exception:  # the stream is gone already
                pass
            self.responses = queue.Queue()  # nothing of the old stream is read again

    def close(self) -> None:
        self.close_stream(cancel=True)
        self.client.close()

    def run(self, kind: str, prompt: str, client: int) -> Sample:
        sample = Sample(kind, client, prompt)
        try:
            (self.text if kind == "text" else self.image)(sample)
        except Exception as exc:
            sample.error, sample.message = _error_kind(exc)
            if kind == "text":
                self.close_stream(cancel=True)
        return sample

    def text(self, sample: Sample) -> None:
        g, o = self.grpc, self.options
        self.open_stream()
        self.count += 1
        rid = str(self.count)
        inputs = [
            _tensor(g, "prompt", np.array([sample.prompt.encode()], dtype=object), "BYTES"),
            _tensor(g, "max_new_tokens", np.array([o.max_new_tokens], np.int32), "INT32"),
            _tensor(g, "temperature", np.array([0.0], np.float32), "FP32"),
        ]
        t0 = time.perf_counter()
        self.client.async_stream_infer(MODEL["text"], inputs, request_id=rid)
        deadline = t0 + o.timeout_s
        while True:
            try:
                at, result, error = self.responses.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                self.close_stream(cancel=True)
                sample.error, sample.message = "timeout", f"no answer within {o.timeout_s:g} s"
                return
            if error is not None:
                raise error
            if result.get_response().id != rid:  # an answer to an earlier request that timed out
                continue
            if sample.ttft_s is None:
                sample.ttft_s = at - t0
            if result.as_numpy("finish_reason")[0]:
                sample.e2e_s = at - t0
                sample.token_ids = [int(i) for i in result.as_numpy("token_ids")]
                return

    def image(self, sample: Sample) -> None:
        g, o = self.grpc, self.options

        def one(name: str, value: object, dtype: str, np_dtype: Any) -> Any:
            return _tensor(g, name, np.array([[value]], dtype=np_dtype), dtype)

        inputs = [
            one("prompt", sample.prompt.encode(), "BYTES", object),
            one("force", b"image", "BYTES", object),
            one("steps", o.steps, "INT32", np.int32),
            one("max_new_tokens", o.max_new_tokens, "INT32", np.int32),
            one("seed", sample.client, "UINT64", np.uint64),
        ]
        t0 = time.perf_counter()
        r = self.client.infer(MODEL["image"], inputs, client_timeout=o.timeout_s)
        sample.e2e_s = time.perf_counter() - t0
        sample.token_ids = [int(i) for i in r.as_numpy("token_ids")[0]]
        sample.images = int(r.as_numpy("images").shape[1])


# ---- the run ------------------------------------------------------------------------------------
def ready_models(address: str, timeout_s: float = 10.0) -> set[str]:
    """The models of ``MODEL`` that the server at ``address`` has ready; one sentence
    (``EngineError``) when no server answers there or it is not ready."""
    grpc = _grpc()
    from tritonclient.utils import InferenceServerException

    try:
        client = grpc.InferenceServerClient(address)
    except Exception as exc:
        raise ConfigError(
            f"--server {address!r} is not a gRPC address ({' '.join(str(exc).split())})"
        ) from None
    try:
        try:
            ready = client.is_server_ready(client_timeout=timeout_s)
        except InferenceServerException as exc:
            _, why = _error_kind(exc)
            raise EngineError(
                f"no Triton server answers at {address} ({why}): start one with `omniforge serve BUILD`, "
                "wait until it prints 'ready' and give the gRPC address it prints"
            ) from None
        if not ready:
            raise EngineError(
                f"the Triton server at {address} is not ready (its models are loading or one failed to "
                "load); wait for `omniforge serve` to print 'ready'"
            )
        found = set()
        for model in MODEL.values():
            try:
                if client.is_model_ready(model, client_timeout=timeout_s):
                    found.add(model)
            except InferenceServerException:  # not in the repository, or not loaded
                pass
        return found
    finally:
        client.close()


def _level(grpc: Any, address: str, options: LoadOptions, kind: str, clients: int) -> Level:
    """``clients`` clients, started together, each sending ``options.requests`` requests in turn."""
    pool = [_Client(grpc, address, options) for _ in range(clients)]
    samples: list[list[Sample]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def work(c: int) -> None:
        if kind == "text":
            try:
                pool[c].open_stream()
            except Exception:  # the request reports it
                pass
        start.wait()
        for i in range(options.requests):
            samples[c].append(pool[c].run(kind, options.prompt(kind, c, i, clients), c))

    threads = [threading.Thread(target=work, args=(c,), daemon=True) for c in range(clients)]
    try:
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        for c in pool:
            c.close()
    return Level(kind, clients, wall, [s for per in samples for s in per])


def run_load(options: LoadOptions, log: Log = lambda _m: None) -> LoadReport:
    """Check the server, then run every (kind, clients) level of ``options`` in turn."""
    grpc = _grpc()
    address = server_address(options.server)
    models = ready_models(address)
    skipped: dict[str, str] = {}
    kinds = []
    for kind in options.kinds:
        if MODEL[kind] in models:
            kinds.append(kind)
        else:
            skipped[kind] = f"the server has no ready '{MODEL[kind]}' model"
    if not kinds:
        raise EngineError(
            f"the Triton server at {address} serves none of the models the requests need "
            f"({', '.join(MODEL[k] for k in options.kinds)}); serve a build with `omniforge serve BUILD`"
        )
    for kind, why in skipped.items():
        log(f"{kind} requests left out: {why}")
    levels = []
    for kind in kinds:
        if options.warmup:
            log(f"warming up: {options.warmup} {kind} request(s)")
            warm = _Client(grpc, address, options)
            try:
                for i in range(options.warmup):
                    warm.run(kind, options.prompt(kind, 0, i, 1), 0)
            finally:
                warm.close()
        for n in options.clients:
            log(f"{kind}: {n} concurrent client(s) x {options.requests} request(s)")
            levels.append(_level(grpc, address, options, kind, n))
    return LoadReport(address, options, levels, skipped)
