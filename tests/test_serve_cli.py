"""``omniforge serve``: a real tritonserver from the command line, and one sentence when there is none."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from omniforge.cli import main
from omniforge.errors import MissingDependencyError


def test_missing_server_is_one_sentence(default_build, monkeypatch, capsys):
    from omniforge.serving import server

    monkeypatch.delenv("OMNIFORGE_TRITONSERVER", raising=False)
    monkeypatch.setattr(server.shutil, "which", lambda _name: None)
    monkeypatch.setattr(server, "_pytriton_root", lambda: None)
    with pytest.raises(MissingDependencyError, match="serve"):
        server.find_tritonserver()
    assert main(["serve", str(default_build)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("omniforge: error: no tritonserver found") and "\n" not in err
    assert "omniforge[serve]" in err
    assert main(["serve", str(default_build), "--tritonserver", "/no/such/tritonserver"]) == 1
    assert "is not an executable file" in capsys.readouterr().err
    assert main(["serve"]) == 1
    assert "give a build folder or --repo" in capsys.readouterr().err


def test_serve_starts_reports_each_step_and_stops_on_interrupt(default_build):
    try:
        from omniforge.serving.server import find_tritonserver, free_port

        find_tritonserver()
    except MissingDependencyError as exc:
        pytest.skip(f"the serve extra is not installed: {exc}")
    ports = sorted({free_port() for _ in range(6)})[:3]
    cmd = [sys.executable, "-m", "omniforge", "serve", str(default_build), "--models", "llm"]
    cmd += ["--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if line.startswith("ready in"):
                break
        assert lines and lines[-1].startswith("ready in"), lines
        assert f"HTTP http://127.0.0.1:{ports[0]}" in lines[-1] and f"gRPC 127.0.0.1:{ports[1]}" in lines[-1]
        assert lines[0].startswith("server: tritonserver")
        assert any(ln.startswith("repository ") for ln in lines) and any(
            ln.startswith("starting: loading 1 models (llm)") for ln in lines
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=5) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[2]}/metrics", timeout=5) as r:
            assert b"nv_" in r.read()
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, rest
    assert rest.strip().splitlines()[-2:] == ["stopping", "stopped"]
