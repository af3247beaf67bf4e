"""The peak resident memory of real requests, each run in a fresh process: what ``omniforge plan``'s
predictions are checked against (``tests/test_plan.py`` on the default, ``benchmarks/plan_accuracy.py``
at real size)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

FORCED = {"text-to-image": ["image"], "text-to-video": ["video"], "text-to-audio": ["audio"]}

CHILD = r"""
import json, sys
def status():
    got = {}
    for line in open("/proc/self/status"):
        key, value = line.split(":", 1)
        if key in ("VmRSS", "VmHWM"):
            got[key] = int(value.split()[0]) * 1024
    return got
import numpy, onnx, onnxruntime
from omniforge.runtime.pipeline import DiffusionConfig, Pipeline
from omniforge.runtime.sampling import GenerationConfig
build, requests, budget, media, forced, tokens, fill = sys.argv[1:8]
media, forced, tokens = json.loads(media), json.loads(forced), int(tokens)
base = status()["VmRSS"]  # the interpreter with the runtime imported, before the build is opened
pipe = Pipeline(build, num_slots=1, memory_budget=budget or None)
prompt = "hello there"
if fill == "1":  # as many words as the context holds beside the new tokens
    room = pipe.llm.pool.max_context - tokens - 8
    prompt = " ".join(["hello"] * room)
    while len(pipe.llm.tokenizer.encode(prompt)) > room:
        prompt = prompt[: int(len(prompt) * 0.95)]
made = []
for one in requests.split(","):  # one request after another
    r = pipe.run(prompt, generation=GenerationConfig(max_new_tokens=tokens),
                 diffusion=DiffusionConfig(steps=4), force=forced.get(one, []), adapter="none", **media)
    made += [m for m, x in (("image", r.images), ("video", r.videos), ("audio", r.audios)) if x]
print(json.dumps({"base": base, "peak": status()["VmHWM"], "rss": status()["VmRSS"], "made": made,
                  "loaded": pipe.build.loaded(), "backend": pipe.llm.backend}))
"""


def measure_requests(
    build: str | Path,
    requests: str,
    budget: str = "",
    backend: str = "auto",
    new_tokens: int = 16,
    fill_context: bool = False,
    timeout: float = 300,
    **media: str,
) -> dict:
    """Open ``build`` in a fresh process and serve ``requests`` (request types, comma-separated, one
    after another; ``fill_context``: a prompt as long as the context holds beside the new tokens); its RSS before opening the build (``base``), peak (``peak``) and at the end
    (``rss``), the media made, the stages left loaded and the decode backend used."""
    env = {**os.environ, "OMNIFORGE_LLM_BACKEND": backend}
    args = [
        str(build),
        requests,
        budget,
        json.dumps(media),
        json.dumps(FORCED),
        str(new_tokens),
        str(int(fill_context)),
    ]
    res = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if res.returncode != 0:
        raise RuntimeError(f"the measured request failed: {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.splitlines()[-1])
