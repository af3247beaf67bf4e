"""A real tritonserver on the default build's repository, on 127.0.0.1 with free ports.

The server is the one ``omniforge serve`` would run here (nvidia-pytriton's bundled tritonserver
on a CPU machine); the clients are tritonclient's HTTP and gRPC clients, as users write them.
Results are compared with the local runtime's on the same build: tokens exactly, media exactly.
"""

from __future__ import annotations

import io
import os
import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from omniforge.errors import MissingDependencyError


def _server_or_skip():
    try:
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401

        from omniforge.serving.server import find_tritonserver

        return find_tritonserver()
    except (ImportError, MissingDependencyError) as exc:
        pytest.skip(f"the serve extra is not installed (tritonclient and a tritonserver): {exc}")


def start(install, repo_path: Path, models: list[str], exit_on_error: bool = True):
    from omniforge.serving.server import ServerOptions, TritonServer, free_port

    ports = {free_port() for _ in range(6)}
    http, grpc, metrics = sorted(ports)[:3]
    options = ServerOptions(
        http_port=http, grpc_port=grpc, metrics_port=metrics, models=models, exit_on_error=exit_on_error
    )
    server = TritonServer(repo_path, options, install)
    server.start()
    return server


@pytest.fixture(scope="module")
def install():
    return _server_or_skip()


@pytest.fixture(scope="module")
def server(install, default_build, tmp_path_factory):
    from omniforge.serving.repository import write_repository

    repo = write_repository(default_build, tmp_path_factory.mktemp("triton") / "repo")
    s = start(install, repo.path, ["llm", "any2any", "omniforge_build", "image_encoder_py"])
    try:
        s.wait()
        yield s
    finally:
        s.stop()


# ---- clients ------------------------------------------------------------------------------------
def http_input(name: str, value: np.ndarray, dtype: str):
    import tritonclient.http as httpclient

    x = httpclient.InferInput(name, list(value.shape), dtype)
    x.set_data_from_numpy(value)
    return x


def grpc_input(name: str, value: np.ndarray, dtype: str):
    import tritonclient.grpc as grpcclient

    x = grpcclient.InferInput(name, list(value.shape), dtype)
    x.set_data_from_numpy(value)
    return x


def stream_text(
    server, prompt: str, max_new_tokens: int, adapter: str | None = None, **extra
) -> tuple[str, list[int], int]:
    """Streamed generation over gRPC: (the text pieces joined, the token ids, responses received)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        inputs = [
            grpc_input("prompt", np.array([prompt.encode()], dtype=object), "BYTES"),
            grpc_input("max_new_tokens", np.array([max_new_tokens], np.int32), "INT32"),
        ]
        inputs += [grpc_input(k, np.array([v], np.float32), "FP32") for k, v in extra.items()]
        if adapter is not None:
            inputs.append(grpc_input("adapter", np.array([adapter.encode()], dtype=object), "BYTES"))
        client.async_stream_infer("llm", inputs)
        pieces, responses = [], 0
        while True:
            result, error = got.get(timeout=60)
            if error is not None:
                raise error
            responses += 1
            pieces.append(result.as_numpy("text")[0].decode())
            if result.as_numpy("finish_reason")[0]:
                return "".join(pieces), result.as_numpy("token_ids").tolist(), responses
    finally:
        client.stop_stream()
        client.close()


def any2any(
    server,
    prompt: str,
    force=(),
    steps: int = 2,
    seed: int = 0,
    image: bytes | None = None,
    max_new_tokens: int = 6,
):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_address, network_timeout=120)
    inputs = [
        http_input("prompt", np.array([[prompt.encode()]], dtype=object), "BYTES"),
        http_input("steps", np.array([[steps]], np.int32), "INT32"),
        http_input("seed", np.array([[seed]], np.uint64), "UINT64"),
        http_input("max_new_tokens", np.array([[max_new_tokens]], np.int32), "INT32"),
    ]
    if force:
        inputs.append(http_input("force", np.array([[m.encode() for m in force]], dtype=object), "BYTES"))
    if image is not None:
        inputs.append(http_input("image", np.array([[image]], dtype=object), "BYTES"))
    try:
        r = client.infer("any2any", inputs)
        return {n: r.as_numpy(n)[0] for n in ("text", "token_ids", "images", "signals")}
    finally:
        client.close()


def png_bytes() -> bytes:
    from PIL import Image

    rng = np.random.default_rng(5)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ---- tests ----------------------------------------------------------------------------------------
def test_ready_models_and_metrics(server):
    import urllib.error
    import urllib.request

    assert server.get("/v2/health/ready")[0] == 200
    states = server.model_states()
    for name in ("llm", "any2any", "omniforge_build", "image_encoder_py"):
        assert states[name][0] == "READY", states[name]
    assert states["image_unet_onnx"][0] == ""  # in the repository, not loaded
    for attempt in range(20):  # the metrics endpoint may open a moment after the server is ready
        try:
            with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
                assert b"nv_inference_request_success" in r.read()
            break
        except urllib.error.URLError:
            if attempt == 19:
                raise
            time.sleep(0.5)
    assert server.options.host == "127.0.0.1"


def test_streamed_generation_equals_local_greedy_tokens(server, default_build):
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig

    text, ids, responses = stream_text(server, "A dog runs", 12)
    local = LlmRuntime(default_build).generate("A dog runs", GenerationConfig(max_new_tokens=12))
    assert ids == local.token_ids
    assert text == local.text
    # streamed: pieces, then the final response (pieces that queue up while one is being sent
    # leave together, so how many depends on timing)
    assert responses >= 2


def test_a_request_chooses_its_lora_adapter(server, default_build):
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig

    local = LlmRuntime(default_build, num_slots=2)
    for name in ("video", "none"):
        _, ids, _ = stream_text(server, "A dog runs", 8, adapter=name)
        assert ids == local.generate("A dog runs", GenerationConfig(max_new_tokens=8), adapter=name).token_ids
    msg = _one_line_error(lambda: stream_text(server, "A dog", 4, adapter="smell"), status=None)
    assert "unknown adapter 'smell'" in msg


def test_image_request_equals_local_pipeline(server, default_build):
    from omniforge.runtime.pipeline import DiffusionConfig, Pipeline
    from omniforge.runtime.sampling import GenerationConfig

    got = any2any(server, "Make a picture of a harbour", force=["image"], steps=2, seed=3)
    local = Pipeline(default_build).run(
        "Make a picture of a harbour",
        generation=GenerationConfig(max_new_tokens=6, seed=3),
        diffusion=DiffusionConfig(steps=2, seed=3),
        force=["image"],
    )
    assert got["images"].shape == (1, *local.images[0].shape)
    np.testing.assert_array_equal(got["images"][0], local.images[0])
    assert got["token_ids"].tolist() == local.generation.token_ids
    assert got["text"][0].decode() == local.text


def test_image_input_equals_local_pipeline(server, default_build, tmp_path):
    from omniforge.runtime.pipeline import Pipeline
    from omniforge.runtime.sampling import GenerationConfig

    data = png_bytes()
    (tmp_path / "in.png").write_bytes(data)
    got = any2any(server, "Describe this photo", image=data)
    local = Pipeline(default_build).run(
        "Describe this photo", image=tmp_path / "in.png", generation=GenerationConfig(max_new_tokens=6)
    )
    assert got["token_ids"].tolist() == local.generation.token_ids


def test_stage_model_batches_and_matches_the_engine(server, default_build):
    import tritonclient.http as httpclient

    from omniforge.runtime.build import Build

    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    client = httpclient.InferenceServerClient(server.http_address)
    try:
        r = client.infer("image_encoder_py", [http_input("pixel_values", x, "FP32")])
    finally:
        client.close()
    want = Build(default_build).engine("image_encoder").run({"pixel_values": x})["embeds"]
    np.testing.assert_array_equal(r.as_numpy("embeds"), want)


def _one_line_error(call, status: str | None = "400") -> str:
    """The error ``call`` gets: one line, no traceback; over HTTP with status 400 (invalid argument)."""
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as info:
        call()
    msg = info.value.message()
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    if status is not None:
        assert info.value.status() == status, (info.value.status(), msg)
    return msg


def test_malformed_requests_get_an_error_status_and_one_line(server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_address)
    prompt = http_input("prompt", np.array([[b"x"]], dtype=object), "BYTES")
    try:
        msg = _one_line_error(
            lambda: client.infer("any2any", [prompt, http_input("steps", np.array([[0]], np.int32), "INT32")])
        )
        assert "steps must be >= 1" in msg
        bad = http_input("prompt", np.array([[b"\xff\xfe"]], dtype=object), "BYTES")
        assert "not valid UTF-8" in _one_line_error(lambda: client.infer("any2any", [bad]))
        junk = http_input("image", np.array([[b"not an image"]], dtype=object), "BYTES")
        assert "not a file format it takes" in _one_line_error(
            lambda: client.infer("any2any", [prompt, junk])
        )
        nan = http_input("pixel_values", np.full((1, 3, 32, 32), np.nan, np.float32), "FP32")
        assert "NaN" in _one_line_error(lambda: client.infer("image_encoder_py", [nan]))
        _one_line_error(
            lambda: client.infer("any2any", [http_input("steps", np.array([[2]], np.int32), "INT32")])
        )
    finally:
        client.close()
    # over gRPC, in the stream (a streamed error carries its message, not a status)
    msg = _one_line_error(lambda: stream_text(server, "A dog", 4, temperature=-1.0), status=None)
    assert "temperature must be >= 0" in msg
    assert server.get("/v2/health/ready")[0] == 200  # and the server serves on


def test_eight_concurrent_clients_get_their_serial_results(server):
    jobs = [
        ("text", ("A dog runs", 10)),
        ("text", ("The harbour at night", 14)),
        ("text", ("Once upon a time", 8)),
        ("text", ("Colours of the sea", 12)),
        ("any", ("Describe a cat", (), 1)),
        ("any", ("Make a picture of a boat", ("image",), 4)),
        ("any", ("Make a picture of a hill", ("image",), 5)),
        ("any", ("Tell me about rivers", (), 2)),
    ]

    def run(job):
        kind, a = job
        if kind == "text":
            text, ids, _ = stream_text(server, *a)
            return text, ids
        out = any2any(server, a[0], force=a[1], seed=a[2])
        return out["text"].tolist(), out["token_ids"].tolist(), out["images"].tobytes()

    serial = [run(j) for j in jobs]
    barrier = threading.Barrier(len(jobs))

    def together(job):
        barrier.wait(timeout=30)
        return run(job)

    with ThreadPoolExecutor(len(jobs)) as pool:
        concurrent = list(pool.map(together, jobs))
    assert concurrent == serial


def test_tampered_artifact_keeps_that_model_from_loading(install, default_build, tmp_path):
    from omniforge.serving.repository import RepositoryOptions, write_repository

    repo = write_repository(default_build, tmp_path / "repo", RepositoryOptions(copy=True))
    graph = repo.path / "omniforge_build" / "build" / "stages" / "image_vae_decoder.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    s = start(
        install,
        repo.path,
        ["image_vae_decoder_py", "image_encoder_py", "image_unet_onnx"],
        exit_on_error=False,
    )
    try:
        s.wait(ready=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = s.model_states()
            if all(
                states[m][0] in ("READY", "UNAVAILABLE")
                for m in ("image_vae_decoder_py", "image_encoder_py", "image_unet_onnx")
            ):
                break
            time.sleep(0.2)
        assert states["image_encoder_py"][0] == "READY"
        state, reason = states["image_vae_decoder_py"]
        assert state == "UNAVAILABLE"
        assert "image_vae_decoder.onnx" in reason and "SHA-256" in reason, reason
        # no onnxruntime backend here: the config passed the server's own checks, only the backend is missing
        if install.bundled:
            assert "unable to find backend library for backend 'onnxruntime'" in states["image_unet_onnx"][1]
    finally:
        s.stop()


def test_any2any_through_bls_on_stage_models_equals_local(install, default_build, tmp_path):
    from omniforge.runtime.pipeline import DiffusionConfig, Pipeline
    from omniforge.runtime.sampling import GenerationConfig
    from omniforge.serving.repository import RepositoryOptions, write_repository

    repo = write_repository(
        default_build, tmp_path / "repo", RepositoryOptions(copy=True, any2any_stages="python")
    )
    stages = ["image_output_projector_py", "image_unet_py", "image_vae_decoder_py"]
    s = start(install, repo.path, ["any2any", *stages])
    try:
        s.wait()
        got = any2any(s, "Make a picture of a harbour", force=["image"], steps=2, seed=7)
    finally:
        s.stop()
    local = Pipeline(default_build).run(
        "Make a picture of a harbour",
        generation=GenerationConfig(max_new_tokens=6, seed=7),
        diffusion=DiffusionConfig(steps=2, seed=7),
        force=["image"],
    )
    np.testing.assert_array_equal(got["images"][0], local.images[0])


def test_killed_server_fails_the_request_and_a_restart_serves_again(install, default_build, tmp_path):
    import tritonclient.grpc as grpcclient

    from omniforge.serving.repository import write_repository

    repo = write_repository(default_build, tmp_path / "repo")
    s = start(install, repo.path, ["llm"])
    try:
        s.wait()
        client = grpcclient.InferenceServerClient(s.grpc_url)
        got: queue.Queue = queue.Queue()

        def on_response(result, error) -> None:
            if got.empty() and error is None:  # the first piece: kill the server at once, from the
                os.killpg(s.process.pid, signal.SIGKILL)  # stream's thread (a busy machine is no race)
            got.put((result, error))

        client.start_stream(callback=on_response)
        client.async_stream_infer(
            "llm",
            [
                grpc_input("prompt", np.array([b"A long story"], dtype=object), "BYTES"),
                grpc_input("max_new_tokens", np.array([250], np.int32), "INT32"),
            ],
        )
        first, error = got.get(timeout=60)
        assert error is None and not first.as_numpy("finish_reason")[0]  # mid-generation
        s.process.wait()  # killed with its model processes
        while True:  # responses already on their way, then the error
            result, error = got.get(timeout=60)
            if error is not None:
                break
            assert not result.as_numpy("finish_reason")[0], (
                "the request finished although the server was killed"
            )
        client.stop_stream()
        client.close()
    finally:
        s.stop()
    again = start(install, repo.path, ["llm"])
    try:
        again.wait()
        text, ids, _ = stream_text(again, "A dog runs", 4)
        assert len(ids) == 4
    finally:
        again.stop()


def test_client_examples_run_against_the_server(server, tmp_path):
    import subprocess
    import sys

    examples = Path(__file__).resolve().parents[1] / "examples" / "triton"
    res = subprocess.run(
        [
            sys.executable,
            str(examples / "grpc_stream.py"),
            "A dog runs",
            "--url",
            server.grpc_url,
            "--max-new-tokens",
            "7",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.rstrip().endswith("[7 tokens, finish: length]")
    res = subprocess.run(
        [sys.executable, str(examples / "http_any2any.py"), "A harbour", "--url", server.http_address]
        + [
            "--force",
            "image",
            "--force",
            "audio",
            "--steps",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "image_0.png").is_file() and (tmp_path / "audio_0.wav").is_file()
    res = subprocess.run(
        [
            sys.executable,
            str(examples / "http_any2any.py"),
            "x",
            "--url",
            server.http_address,
            "--steps",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1 and res.stderr.strip() == "error (400): steps must be >= 1, got 0"
