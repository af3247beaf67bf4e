"""Load: 8 threads x 50 mixed text/media requests share the engines and the KV pool."""

import hashlib
import threading

import numpy as np

from omniforge.runtime.pipeline import Pipeline
from omniforge.runtime.sampling import GenerationConfig

PROMPTS = [
    "A dog runs",
    "Describe the image in one sentence.",
    "<image> What is in this photo?",
    "Generate the sound of rain",
    "<image> Describe the image",
    "The piano plays a slow melody",
]


def make_requests(n: int) -> list[tuple[str, np.ndarray | None, int]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        prompt = PROMPTS[i % len(PROMPTS)]
        image = (rng.random((24, 24, 3)) * 255).astype(np.uint8) if "<image>" in prompt else None
        out.append((prompt, image, 4 + i % 5))
    return out


def test_eight_threads_by_fifty_requests_equal_serial(default_build):
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in default_build.rglob("*") if p.is_file()}
    pipe = Pipeline(default_build, num_slots=4)
    rt = pipe.llm
    rt.slot_wait_s = 60.0  # contention waits for a slot rather than failing
    addresses = [a.ctypes.data for a in (*rt.pool.keys, *rt.pool.values)]
    nbytes = rt.pool.nbytes

    def serve(req):
        prompt, image, n = req
        media = {"image": [pipe.encode_image(image)]} if image is not None else None
        return rt.generate(prompt, GenerationConfig(max_new_tokens=n, seed=n), media=media).token_ids

    requests = make_requests(400)
    distinct = {(p, None if im is None else im.tobytes(), n): (p, im, n) for p, im, n in requests}
    serial = {k: serve(v) for k, v in distinct.items()}
    results: list[tuple[tuple, list[int]]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(chunk):
        for req in chunk:
            try:
                ids = serve(req)
            except BaseException as exc:  # collected and asserted below
                with lock:
                    errors.append(exc)
                continue
            key = (req[0], None if req[1] is None else req[1].tobytes(), req[2])
            with lock:
                results.append((key, ids))

    threads = [threading.Thread(target=worker, args=(requests[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads)  # no request hung
    assert not errors, errors[:3]
    assert len(results) == 400
    mismatched = [k for k, ids in results if ids != serial[k]]
    assert not mismatched
    # nothing leaked: only prefix-cache entries hold slots, and the pool never grew or moved
    assert rt.pool.slots_in_use == len(rt.prefix_cache) <= rt.prefix_cache.max_entries
    assert rt.pool.nbytes == nbytes
    assert [a.ctypes.data for a in (*rt.pool.keys, *rt.pool.values)] == addresses
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in default_build.rglob("*") if p.is_file()}
    assert after == before  # the runtime never writes into the build folder
