"""Text generation for a server: requests in, streamed text and a result out, on the LLM's slot pool.

``TextService.submit`` is all a server front end (the Triton ``llm`` model) calls: a prompt, its
sampling options, a callback for each text piece, one for the end, and a way to ask whether the
client has gone. Requests go to the runtime's continuous-batching scheduler
(``omniforge.runtime.batching``): they join and leave the running batch between decode steps, so
concurrent clients share each decode step; a full queue refuses at once with ``QueueFullError``.
"""

from __future__ import annotations

from collections.abc import Callable

from omniforge.errors import OmniforgeError, QueueFullError
from omniforge.runtime.batching import ContinuousBatcher
from omniforge.runtime.llm import GenerationResult, LlmRuntime
from omniforge.runtime.sampling import GenerationConfig

OnText = Callable[[str], None]
OnDone = Callable[[GenerationResult | None, OmniforgeError | None], None]


class Cancelled(OmniforgeError):
    """The client went away; the request stopped and released its slot."""


class TextService:
    """Run generation requests on a runtime's continuous-batching scheduler; at most ``max_queued``
    wait for a KV-cache slot."""

    def __init__(self, runtime: LlmRuntime, max_queued: int) -> None:
        self.runtime = runtime
        self.max_queued = max_queued
        self._batcher = ContinuousBatcher(runtime, max_queue=max_queued)

    def submit(
        self,
        prompt: str,
        config: GenerationConfig,
        on_text: OnText,
        on_done: OnDone,
        cancelled: Callable[[], bool] = lambda: False,
        adapter: str | None = "auto",
    ) -> None:
        """Queue a request; ``QueueFullError`` at once when ``max_queued`` already wait. Exactly one
        ``on_done`` call follows, with the result or the error (``Cancelled`` when the client left).
        ``adapter``: the request's LoRA adapter (a name, ``auto`` or ``none``)."""
        if cancelled():
            on_done(None, Cancelled("the request was cancelled before it started"))
            return

        def piece(delta: str) -> None:
            if cancelled():  # raising here ends the request and frees its slot before the next step
                raise Cancelled("the request was cancelled")
            on_text(delta)

        def done(result: GenerationResult | None, error: BaseException | None) -> None:
            if error is not None and not isinstance(error, OmniforgeError):  # still one sentence
                error = OmniforgeError(f"generation failed: {type(error).__name__}: {error}")
            on_done(result, error)

        try:
            self._batcher.submit(prompt, config, on_text=piece, on_done=done, adapter=adapter)
        except QueueFullError:
            raise
        except OmniforgeError as exc:  # a prompt the runtime refuses: reported like any other end
            on_done(None, exc)

    def close(self) -> None:
        self._batcher.close()
