import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from omniforge.errors import StageError
from omniforge.pipeline.spec import Dim, Edge, PipelineSpec, StageKind, StageSpec, TensorSpec


def llm_like() -> StageSpec:
    return StageSpec(
        name="llm",
        kind=StageKind.LLM,
        component="llm",
        inputs=(
            TensorSpec("x", "float32", ("batch", "seq", 8)),
            TensorSpec("mask", "int64", ("batch", "total"), fill="ones"),
            TensorSpec("pos", "int64", ("batch", "seq"), fill="positions"),
            TensorSpec("ids", "int64", ("batch", "seq"), fill="randint", high=10),
        ),
        outputs=(TensorSpec("y", "float32", ("batch", "seq", 8)),),
        dims=(
            Dim("batch", 1, 1, 4),
            Dim("seq", 1, 3, 16),
            Dim("past", 0, 5, 15),
            Dim("total", 1, 8, 31, sum_of=("past", "seq")),
        ),
    )


def test_dim_rejects_bad_ranges():
    with pytest.raises(StageError, match="min <= opt <= max"):
        Dim("batch", 2, 1, 4)


def test_resolve_profile_points_and_derived_dims():
    s = llm_like()
    assert s.resolve("opt") == {"batch": 1, "seq": 3, "past": 5, "total": 8}
    assert s.resolve("min")["total"] == 1
    assert s.resolve({"seq": 2, "past": 0}) == {"batch": 1, "seq": 2, "past": 0, "total": 2}
    with pytest.raises(StageError, match="outside"):
        s.resolve({"seq": 17})
    with pytest.raises(StageError, match="no dim"):
        s.resolve({"height": 2})
    with pytest.raises(StageError, match="unknown profile point"):
        s.resolve("median")


def test_sample_inputs_follow_shapes_fills_and_seed():
    s = llm_like()
    a = s.sample_inputs({"batch": 2, "seq": 3, "past": 4}, seed=3)
    b = s.sample_inputs({"batch": 2, "seq": 3, "past": 4}, seed=3)
    c = s.sample_inputs({"batch": 2, "seq": 3, "past": 4}, seed=4)
    assert a["x"].shape == (2, 3, 8) and a["x"].dtype == np.float32
    assert a["mask"].shape == (2, 7) and (a["mask"] == 1).all()
    np.testing.assert_array_equal(a["pos"], [[4, 5, 6], [4, 5, 6]])
    assert a["ids"].min() >= 0 and a["ids"].max() < 10
    np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], c["x"])


def test_dynamic_axes_name_the_dims():
    assert llm_like().dynamic_axes()["mask"] == {0: "batch", 1: "total"}


def test_pipeline_roundtrips_through_json_and_selects():
    p = PipelineSpec(
        "p", (llm_like(),), (Edge("llm.y", "llm.x", via="loop"),), {"image": ["[IMG0]"]}, {"image": "<image>"}
    )
    q = PipelineSpec.from_dict(json.loads(json.dumps(p.to_dict())))
    assert q == p
    assert p.select(["llm"]).stage_names == ["llm"]
    with pytest.raises(StageError, match="unknown stage 'vae'"):
        p.select(["vae"])


@given(
    batch=st.integers(1, 4),
    seq=st.integers(1, 16),
    past=st.integers(0, 15),
)
def test_resolve_accepts_exactly_the_declared_ranges(batch, seq, past):
    s = llm_like()
    sizes = s.resolve({"batch": batch, "seq": seq, "past": past})
    assert sizes["total"] == seq + past
    shapes = {k: v.shape for k, v in s.sample_inputs({"batch": batch, "seq": seq, "past": past}).items()}
    assert shapes["mask"] == (batch, seq + past)
