"""Text generation for a server: requests in, streamed text and a result out, on the LLM's slot pool.

``TextService.submit`` is all a server front end (the Triton ``llm`` model) calls: a prompt, its
sampling options, a callback for each text piece, one for the end, and a way to ask whether the
client has gone. Today each request runs ``LlmRuntime.generate_rows`` on one of ``workers``
threads (one per KV-cache slot), so requests generate concurrently but each one's decode steps run
alone. A continuous-batching scheduler in the runtime replaces ``_generate`` only: submit the same
rows, config and callbacks to the scheduler instead of calling ``generate_rows`` on a worker;
queueing, refusal, cancellation and the callbacks' contract stay as they are.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from omniforge.errors import OmniforgeError, QueueFullError
from omniforge.runtime.llm import GenerationResult, LlmRuntime
from omniforge.runtime.sampling import GenerationConfig

OnText = Callable[[str], None]
OnDone = Callable[[GenerationResult | None, OmniforgeError | None], None]


class Cancelled(OmniforgeError):
    """The client went away; the request stopped and released its slot."""


class TextService:
    """Run generation requests on a runtime; at most ``max_queued`` wait for a worker."""

    def __init__(self, runtime: LlmRuntime, workers: int, max_queued: int) -> None:
        self.runtime = runtime
        self.max_queued = max_queued
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="omniforge-llm")
        self._lock = threading.Lock()
        self._waiting = 0

    def submit(
        self,
        prompt: str,
        config: GenerationConfig,
        on_text: OnText,
        on_done: OnDone,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> None:
        """Queue a request; ``QueueFullError`` at once when ``max_queued`` already wait. Exactly one
        ``on_done`` call follows, with the result or the error (``Cancelled`` when the client left)."""
        with self._lock:
            if self._waiting >= self.max_queued:
                raise QueueFullError(
                    f"{self._waiting} requests already wait for the LLM (at most {self.max_queued}); retry later"
                )
            self._waiting += 1
        self._pool.submit(self._run, prompt, config, on_text, on_done, cancelled)

    def _run(
        self, prompt: str, config: GenerationConfig, on_text: OnText, on_done: OnDone, cancelled
    ) -> None:
        with self._lock:
            self._waiting -= 1
        try:
            if cancelled():
                raise Cancelled("the request was cancelled before it started")
            result = self._generate(prompt, config, on_text, cancelled)
        except OmniforgeError as exc:
            on_done(None, exc)
            return
        except Exception as exc:  # a bug or a backend failure: still one sentence to the client
            on_done(None, OmniforgeError(f"generation failed: {type(exc).__name__}: {exc}"))
            return
        on_done(result, None)

    def _generate(
        self, prompt: str, config: GenerationConfig, on_text: OnText, cancelled: Callable[[], bool]
    ) -> GenerationResult:
        rows, ids = self.runtime.prepare(prompt)

        def piece(_i: int, delta: str) -> None:
            if cancelled():  # raising here releases the request's slot at once
                raise Cancelled("the request was cancelled")
            on_text(delta)

        return self.runtime.generate_rows([rows], [ids], config, piece)[0]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
