"""``omniforge bench``: statistics, report writing and plots (not the timing values)."""

import json

import pytest

from omniforge.bench.report import compare_runs, markdown
from omniforge.bench.stats import Stats, measure
from omniforge.cli import main


def test_stats_percentiles_and_spread():
    s = Stats.of([float(x) for x in range(1, 101)])
    assert (s.n, s.min, s.p50, s.mean) == (100, 1.0, 50.5, 50.5)
    assert s.p90 == pytest.approx(90.1) and s.p99 == pytest.approx(99.01)
    assert s.spread == pytest.approx((90.1 - 1.0) / 50.5)
    with pytest.raises(ValueError):
        Stats.of([])


def test_measure_runs_exactly_warmup_plus_runs():
    calls = []
    s = measure(lambda: calls.append(1), warmup=2, runs=7)
    assert len(calls) == 9 and s.n == 7 and s.min >= 0


def test_measure_on_a_tiny_stage(default_build):
    from omniforge.runtime.build import Build

    b = Build(default_build)
    engine = b.engine("input_projector")
    feeds = engine.spec.sample_inputs("opt")
    s = measure(lambda: engine.session.run(None, feeds), runs=5)
    assert s.n == 5 and s.min <= s.p50 <= s.p90 <= s.p99


def test_bench_cli_writes_json_markdown_plots_and_compares(default_build, tmp_path, capsys):
    out = tmp_path / "bench"
    args = [
        "bench",
        str(default_build),
        "--out",
        str(out),
        "--runs",
        "2",
        "--steps",
        "1",
        "--new-tokens",
        "3",
        "--no-reference",
    ]
    assert main(args) == 0
    data = json.loads((out / "bench.json").read_text())
    b = data["builds"][0]
    assert {s["stage"] for s in b["stages"]} >= {"llm", "image_unet", "vocoder"}
    for s in b["stages"]:
        assert set(s["latency_ms"]) >= {"min", "p50", "p90", "p99", "mean", "spread"}
    assert "tokens_per_s_batch1" in b["llm"] and "of the bandwidth bound" in b["llm"]["roofline"]
    assert b["e2e"]["steps"] == 1 and b["peak_rss_mib"] > 0
    md = (out / "bench.md").read_text()
    assert "| image_unet |" in md and "End to end" in md
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "accuracy_vs_speed.png",
        "latency_per_stage.png",
        "tokens_per_s_vs_context.png",
    ]
    capsys.readouterr()
    assert (
        main([*args[:2], "--out", str(tmp_path / "b2"), *args[4:], "--compare", str(out / "bench.json")]) == 0
    )
    assert "Change against" in capsys.readouterr().out


def test_report_functions_on_synthetic_data():
    stage = {
        "stage": "s",
        "precision": "fp32",
        "latency_ms": {**Stats.of([1.0, 2.0]).to_dict()},
        "size_kib": 1,
    }
    build = {
        "name": "a",
        "stages": [stage],
        "llm": {"tokens_per_s_batch1": 10.0},
        "e2e": {"total_ms": 5.0, "stages_ms": {"x": 5.0}},
        "peak_rss_mib": 1.0,
    }
    data = {
        "machine": {"cpu": "c"},
        "settings": {"threads": 2},
        "builds": [build],
        "reference": {"total_ms": 15.0, "stages_ms": {"x": 15.0}},
    }
    md = markdown(data)
    assert "| a | image + prompt in, text + image out | 5 | 3.00x |" in md
    other = json.loads(json.dumps(data))  # another request: no ratio against the image reference
    other["builds"][0]["e2e"]["request"] = "audio + prompt in, text out"
    assert "| a | audio + prompt in, text out | 5 | - |" in markdown(other)
    slower = json.loads(json.dumps(data))
    slower["builds"][0]["stages"][0]["latency_ms"]["p50"] = 3.0
    assert "+100.0%" in compare_runs(data, slower)


def test_bench_rejects_bad_options(default_build, tmp_path, capsys):
    assert main(["bench", str(default_build), "--runs", "0", "--out", str(tmp_path)]) == 1
    assert "must be >= 1" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "nope")]) == 1
