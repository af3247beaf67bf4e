"""``omniforge bench --server``: the load tool against one real tritonserver (the ``llm`` model only,
started as in ``tests/test_triton_server.py``); its text results are compared with the local
runtime's greedy tokens."""

from __future__ import annotations

import json

import pytest

from omniforge.cli import main
from tests.test_triton_server import install, start  # noqa: F401  (the fixture is imported by name)

NEW_TOKENS = 8
FIELDS = {
    "kind",
    "clients",
    "requests",
    "ok",
    "wall_s",
    "requests_per_s",
    "tokens_per_s",
    "ttft_ms_p50",
    "per_token_ms_p50",
    "e2e_ms_p50",
    "e2e_ms_p99",
    "errors",
    "error_examples",
}


@pytest.fixture(scope="module")
def llm_server(install, default_build, tmp_path_factory):  # noqa: F811
    from omniforge.serving.repository import write_repository

    repo = write_repository(default_build, tmp_path_factory.mktemp("load") / "repo")
    s = start(install, repo.path, ["llm"])
    try:
        s.wait()
        yield s
    finally:
        s.stop()


def test_sixteen_concurrent_text_clients_get_the_serial_greedy_tokens(llm_server, default_build):
    from omniforge.runtime.llm import LlmRuntime
    from omniforge.runtime.sampling import GenerationConfig
    from omniforge.serving.load import LoadOptions, run_load

    options = LoadOptions(
        server=llm_server.grpc_url, clients=(16,), requests=1, max_new_tokens=NEW_TOKENS, timeout_s=60
    )
    report = run_load(options)
    assert "any2any" in report.skipped["image"]  # the server has no any-to-any model: text only
    (level,) = report.levels
    assert (level.kind, level.clients, len(level.samples)) == ("text", 16, 16)
    assert [s.error for s in level.samples] == [None] * 16, [s.message for s in level.samples]
    assert sorted(s.prompt for s in level.samples) == sorted(
        options.prompt("text", c, 0, 16) for c in range(16)
    )

    runtime = LlmRuntime(default_build)
    serial = {
        p: runtime.generate(p, GenerationConfig(max_new_tokens=NEW_TOKENS)).token_ids
        for p in sorted({s.prompt for s in level.samples})
    }
    assert [s.token_ids for s in level.samples] == [serial[s.prompt] for s in level.samples]

    data = report.to_dict()
    assert data["server"] == llm_server.grpc_url and data["settings"]["clients"] == [16]
    (summary,) = data["results"]
    assert set(summary) == FIELDS
    assert summary["ok"] == 16 and summary["errors"] == {} and summary["requests_per_s"] > 0
    assert 0 < summary["ttft_ms_p50"] <= summary["e2e_ms_p50"] <= summary["e2e_ms_p99"]
    assert summary["per_token_ms_p50"] > 0 and summary["tokens_per_s"] > 0
    assert "| text | 16 | 16 |" in report.table()


def test_bench_server_cli_prints_one_table_writes_json_and_counts_errors(llm_server, tmp_path, capsys):
    out = tmp_path / "load.json"
    args = ["bench", "--server", llm_server.grpc_url, "--kind", "text", "--clients", "1,2"]
    args += ["--requests", "2", "--new-tokens", "3", "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert printed.err == ""  # quiet: the table only
    assert printed.out.count("| text |") == 2 and "TTFT p50" in printed.out
    data = json.loads(out.read_text())
    assert [(r["clients"], r["requests"], r["ok"]) for r in data["results"]] == [(1, 2, 2), (2, 4, 4)]
    assert all(set(r) == FIELDS for r in data["results"])

    # a request that outlives --timeout is an error of kind "timeout"; the server serves on
    assert main([*args[:5], "--clients", "2", "--requests", "1", "--timeout", "0.0001"]) == 0
    assert "| 2 (timeout: 2) |" in capsys.readouterr().out
    assert main(args) == 0


def test_bench_server_without_a_server_is_one_sentence(install, capsys):  # noqa: F811
    from omniforge.serving.server import free_port

    assert main(["bench", "--server", f"127.0.0.1:{free_port()}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("omniforge: error: no Triton server answers at 127.0.0.1:") and "\n" not in err
    assert main(["bench", "--server", "http://127.0.0.1:8000"]) == 1
    assert "gRPC address" in capsys.readouterr().err
    assert main(["bench", "--clients", "4"]) == 1
    assert "--clients goes with --server" in capsys.readouterr().err
