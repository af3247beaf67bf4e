"""The Python-backend models of a repository written by ``omniforge triton`` (run inside Triton).

Imported only by the ``model.py`` files of the repository, in Triton's Python-backend stub, where
``triton_python_backend_utils`` exists. Each model opens the build through omniforge's ``Build``
(every file it reads is checked against its SHA-256) after checking that the manifest is the one
the repository was written for, so a tampered build keeps the model from loading. Errors a client
causes come back as the request's error: one sentence, no traceback.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from omniforge.errors import (
    CachePoolExhaustedError,
    ConfigError,
    EngineError,
    InputError,
    ManifestError,
    OmniforgeError,
)
from omniforge.pipeline.manifest import MANIFEST, verify_file
from omniforge.runtime.build import Build
from omniforge.serving import requests as R
from omniforge.serving.repository import SUFFIX, batch_dim


def _error(exc: BaseException) -> pb_utils.TritonError:
    """A request error: the exception's one sentence, with a status a client can act on."""
    if isinstance(exc, OmniforgeError):
        msg = " ".join(str(exc).split())
    else:  # not a user error: still no traceback to the client
        msg = f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())}"
    code = pb_utils.TritonError.INTERNAL
    if isinstance(exc, (InputError, ConfigError)):
        code = pb_utils.TritonError.INVALID_ARG
    elif isinstance(exc, CachePoolExhaustedError):  # a full pool or queue: retry later
        code = pb_utils.TritonError.UNAVAILABLE
    return pb_utils.TritonError(msg, code)


def _inputs(request: Any) -> dict[str, np.ndarray]:
    return {t.name(): t.as_numpy() for t in request.inputs()}


class _BuildModel:
    """Shared ``initialize``: the model's parameters and its build, checked."""

    verify_all = False  # check every artifact at load (models that read the whole build)

    def initialize(self, args: dict[str, str]) -> None:
        self.model_config = json.loads(args["model_config"])
        self.params = {k: v["string_value"] for k, v in self.model_config.get("parameters", {}).items()}
        self.name = self.model_config["name"]
        try:
            self.build = self.open_build(self._checked_path(Path(args["model_repository"])))
            self.setup()
        except OmniforgeError as exc:  # the load fails with the one sentence, in the server's log
            raise pb_utils.TritonModelException(f"model '{self.name}' cannot load: {exc}") from None

    def _checked_path(self, model_dir: Path) -> Path:
        """The build folder, after checking that its manifest is the one the repository was written for."""
        ref = Path(self.params["build"])
        path = ref if ref.is_absolute() else (model_dir / ref).resolve()
        manifest = path / MANIFEST
        try:
            self.manifest_bytes = manifest.read_bytes()
        except OSError as exc:
            raise ManifestError(f"cannot read the build's manifest {manifest} ({exc.strerror})") from None
        if hashlib.sha256(self.manifest_bytes).hexdigest() != self.params["manifest_sha256"]:
            raise ManifestError(
                f"{manifest} is not the manifest this repository was written for (its SHA-256 changed); "
                "write the repository again with `omniforge triton`"
            )
        return path

    @property
    def session(self):
        """ONNX Runtime settings from the repository (``ConfigError`` when a provider is missing here)."""
        from omniforge.runtime.engine import SessionConfig

        providers = tuple(p for p in self.params.get("providers", "CPUExecutionProvider").split(",") if p)
        return SessionConfig(threads=int(self.params.get("threads", "0")), providers=providers)

    def open_build(self, path: Path) -> Build:
        return Build(path, self.session, verify=self.verify_all)

    def setup(self) -> None:
        pass

    def finalize(self) -> None:
        pass


class StageModel(_BuildModel):
    """One stage on omniforge's engine. Requests that Triton's dynamic batcher hands over together
    and whose shapes agree are run as one batch (up to the stage's batch max), then split."""

    def setup(self) -> None:
        self.stage = self.params["stage"]
        self.engine = self.build.engine(self.stage)  # reads the graph: its SHA-256 is checked
        self.spec = self.engine.spec
        dim = batch_dim(self.spec)
        self.max_batch = dim.max if dim is not None else 0

    def execute(self, requests: list[Any]) -> list[Any]:
        feeds = []
        for r in requests:
            try:
                feeds.append(_inputs(r))
            except Exception as exc:  # an input the stub could not read
                feeds.append(exc)
        out: list[Any] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, f in enumerate(feeds):
            if isinstance(f, Exception):
                out[i] = pb_utils.InferenceResponse(error=_error(InputError(str(f))))
                continue
            key = tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(f.items()))
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            for chunk in self._chunks(members, feeds):
                self._run(chunk, feeds, out)
        return out

    def _chunks(self, members: list[int], feeds: list[Any]) -> list[list[int]]:
        if not self.max_batch:
            return [[i] for i in members]
        chunks: list[list[int]] = [[]]
        size = 0
        for i in members:
            n = next(iter(feeds[i].values())).shape[0]
            if chunks[-1] and size + n > self.max_batch:
                chunks.append([])
                size = 0
            chunks[-1].append(i)
            size += n
        return chunks

    def _run(self, chunk: list[int], feeds: list[Any], out: list[Any]) -> None:
        try:
            if len(chunk) == 1:
                results = [self.engine.run(feeds[chunk[0]])]
            else:
                joined = {n: np.concatenate([feeds[i][n] for i in chunk]) for n in feeds[chunk[0]]}
                full = self.engine.run(joined)
                sizes = np.cumsum([next(iter(feeds[i].values())).shape[0] for i in chunk])[:-1]
                parts = {n: np.split(a, sizes) for n, a in full.items()}
                results = [{n: parts[n][k] for n in parts} for k in range(len(chunk))]
        except Exception as exc:
            if len(chunk) > 1:  # one bad request must not fail the others: run them one by one
                for i in chunk:
                    self._run([i], feeds, out)
                return
            out[chunk[0]] = pb_utils.InferenceResponse(error=_error(exc))
            return
        for i, res in zip(chunk, results, strict=True):
            out[i] = pb_utils.InferenceResponse(
                [pb_utils.Tensor(n, np.ascontiguousarray(a)) for n, a in res.items()]
            )


class LlmModel(_BuildModel):
    """Streamed text generation (decoupled: text pieces as they come, then a final response with
    the generated token ids and the finish reason). Requests run concurrently on the runtime's
    KV-cache slots through ``TextService`` (continuous batching)."""

    def setup(self) -> None:
        from omniforge.runtime.llm import LlmRuntime
        from omniforge.serving.text_service import TextService

        for role in ("tokenizer", "tokenizer_config"):  # read directly by the tokenizer: check them here
            if role in self.build.manifest.files:
                verify_file(self.build.path, self.build.manifest, self.build.manifest.files[role])
        slots = int(self.params.get("num_slots", "4"))
        self.runtime = LlmRuntime(self.build, num_slots=slots, slot_wait_s=30.0)
        self.service = TextService(self.runtime, max_queued=int(self.params.get("max_queued", "64")))

    def execute(self, requests: list[Any]) -> None:
        for r in requests:
            sender = r.get_response_sender()
            try:
                tensors = _inputs(r)
                prompt = R.prompt(tensors)
                config = R.generation_config(tensors)
                stream = _ResponseStream(sender, self._response)
                self.service.submit(
                    prompt, config, stream.piece, stream.finish, stream.cancelled, adapter=R.adapter(tensors)
                )
            except Exception as exc:
                sender.send(
                    pb_utils.InferenceResponse(error=_error(exc)),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
        return None

    @staticmethod
    def _response(text: str, ids: list[int], finish: str) -> Any:
        return pb_utils.InferenceResponse(
            [
                pb_utils.Tensor("text", np.array([text.encode()], dtype=object)),
                pb_utils.Tensor("token_ids", np.asarray(ids, np.int64)),
                pb_utils.Tensor("finish_reason", np.array([finish.encode()], dtype=object)),
            ]
        )

    def finalize(self) -> None:
        if hasattr(self, "service"):
            self.service.close()


class BlsEngine:
    """A stage called through BLS on another model of the repository (same ``run`` as ``Engine``)."""

    def __init__(self, model: str, spec: Any) -> None:
        self.model, self.spec = model, spec
        self.batched = batch_dim(spec) is not None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rank = {t.name: len(t.shape) for t in (*self.spec.inputs, *self.spec.outputs)}
        inputs = []
        for name, a in feeds.items():
            if self.batched and rank.get(name) == 1:  # declared [1] and reshaped to [] by the model
                a = a[:, None]
            inputs.append(pb_utils.Tensor(name, np.ascontiguousarray(a)))
        names = [t.name for t in self.spec.outputs]
        response = pb_utils.InferenceRequest(
            model_name=self.model, requested_output_names=names, inputs=inputs
        ).exec()
        if response.has_error():
            raise EngineError(f"stage model '{self.model}' failed: {response.error().message()}")
        out = {}
        for n in names:
            a = pb_utils.get_output_tensor_by_name(response, n).as_numpy()
            out[n] = a.reshape(a.shape[:-1]) if self.batched and rank[n] == 1 and a.ndim == 2 else a
        return out


class _BlsBuild(Build):
    """A build whose stage engines are other models of the repository (``<stage>_<backend>``)."""

    def __init__(self, path: Path, backend: str, session) -> None:
        super().__init__(
            path, session
        )  # every artifact checked: the LLM, tokenizer and configs are read here
        self.suffix = SUFFIX[backend]

    def engine(self, name: str) -> Any:  # type: ignore[override]
        with self._lock:
            if name not in self._engines:
                self._engines[name] = BlsEngine(name + self.suffix, self.pipeline.stage(name))
            return self._engines[name]

    def release(self, name: str) -> None:
        pass


class Any2AnyModel(_BuildModel):
    """The whole pipeline per request: ``Pipeline.run`` with the request's media, options and
    seed. Requests that arrive together run at once on ``workers`` threads; the stages run in this
    process, or (``stages`` = python / onnxruntime / tensorrt) on the per-stage models through BLS,
    while the LLM runs here (its KV cache and hidden states stay in process)."""

    verify_all = True

    def open_build(self, path: Path) -> Build:
        stages = self.params.get("stages", "process")
        return Build(path, self.session) if stages == "process" else _BlsBuild(path, stages, self.session)

    def setup(self) -> None:
        from omniforge.runtime.pipeline import Pipeline

        workers = int(self.params.get("workers", "4"))
        self.pipeline = Pipeline(self.build, num_slots=workers + 1)
        self.pipeline.llm.slot_wait_s = 30.0
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="omniforge-any2any")
        self.lock = threading.Lock()

    def execute(self, requests: list[Any]) -> list[Any]:
        return list(self.pool.map(self._one, requests))

    def _one(self, request: Any) -> Any:
        try:
            tensors = _inputs(request)
            batch = {a.shape[0] for a in tensors.values()}
            if batch != {1}:
                raise InputError(
                    f"send one prompt per request (batch size 1), got batch sizes {sorted(batch)}"
                )
            req = R.PipelineRequest.parse({n: a[0] for n, a in tensors.items()})
            with req.files() as paths:
                result = self.pipeline.run(
                    req.prompt,
                    image=paths.get("image"),
                    audio=paths.get("audio"),
                    video=paths.get("video"),
                    generation=req.generation,
                    diffusion=req.diffusion,
                    force=req.force,
                    adapter=req.adapter,
                )
            outputs = R.pipeline_outputs(result)
            return pb_utils.InferenceResponse([pb_utils.Tensor(n, a[None]) for n, a in outputs.items()])
        except Exception as exc:
            return pb_utils.InferenceResponse(error=_error(exc))

    def finalize(self) -> None:
        if hasattr(self, "pool"):
            self.pool.shutdown(wait=True)


class BuildModel(_BuildModel):
    """Returns the build's manifest (``what`` = ``manifest``) as JSON."""

    verify_all = True

    def execute(self, requests: list[Any]) -> list[Any]:
        out = []
        for r in requests:
            try:
                what = R.text(_inputs(r), "what")
                if what != "manifest":
                    raise InputError(f"'what' must be 'manifest', got {what!r:.40}")
                out.append(
                    pb_utils.InferenceResponse(
                        [pb_utils.Tensor("json", np.array([self.manifest_bytes], dtype=object))]
                    )
                )
            except Exception as exc:
                out.append(pb_utils.InferenceResponse(error=_error(exc)))
        return out


_FINAL = object()


class _ResponseStream:
    """One streamed request's responses, sent from a thread of its own: the decode loop hands a
    piece over and goes on, never waiting for the backend's IPC (a send, a cancellation query)
    between steps; pieces that queue up meanwhile leave as one response. The final response
    follows every piece."""

    def __init__(self, sender: Any, response: Any) -> None:
        self.sender, self.response = sender, response
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = bool(sender.is_cancelled())  # the client cancelled or went away
        threading.Thread(target=self._run, name="omniforge-llm-responses", daemon=True).start()

    def piece(self, delta: str) -> None:
        self._queue.put(delta)

    def finish(self, result: Any, error: BaseException | None) -> None:
        self._queue.put((_FINAL, result, error))

    def cancelled(self) -> bool:
        return self._cancelled

    def _send(self, *args: Any, final: bool = False, **kwargs: Any) -> None:
        """Send; after a piece, ask whether the client is still there (never after the final
        response: the sender is gone then)."""
        try:
            self.sender.send(*args, **kwargs)
            if not final and not self._cancelled and self.sender.is_cancelled():
                self._cancelled = True
        except Exception:  # the client is gone: the request is stopped at its next piece
            self._cancelled = True

    def _run(self) -> None:
        from omniforge.serving.text_service import Cancelled

        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        while True:
            items = [self._queue.get()]
            while not isinstance(items[-1], tuple):  # gather what queued up meanwhile
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            end = items.pop() if isinstance(items[-1], tuple) else None
            text = "".join(items)
            if text:
                self._send(self.response(text, [], ""))
            if end is None:
                continue
            _, result, error = end
            if isinstance(error, Cancelled):
                self._send(flags=final, final=True)
            elif error is not None:
                self._send(pb_utils.InferenceResponse(error=_error(error)), flags=final, final=True)
            else:
                self._send(self.response("", result.token_ids, result.finish_reason), flags=final, final=True)
            return
