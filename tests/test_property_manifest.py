"""Property tests over whole manifests (issue 20): mutations of the default build's real
manifest.json - values swapped for values of another type or for other names and paths of the same
manifest, numbers made huge, negative, zero or NaN, strings with NUL bytes or 100,000 characters,
100,000-deep nesting, 5,000-digit numbers, keys and list items dropped, duplicated or added, the
text cut off. Opening the build and running a short request either works or ends in exactly one
OmniforgeError sentence, in bounded time, with nothing written into the build folder."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from omniforge.errors import ManifestError, OmniforgeError
from omniforge.pipeline.manifest import load_manifest
from omniforge.runtime.pipeline import MODALITIES, DiffusionConfig, Pipeline, PipelineResult
from omniforge.runtime.sampling import GenerationConfig
from tests.test_hostile_inputs import bounded

PROPERTY = settings(
    max_examples=int(os.environ.get("OMNIFORGE_PROPERTY_EXAMPLES", 60)),
    deadline=None,  # `bounded` is the time limit
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

DEEP, BIG = "\x01deep\x01", "\x01big\x01"  # markers replaced in the text: json cannot write these


def outcome(fn, timeout: float = 60.0):
    """``fn()``'s result, or the one-line OmniforgeError it raised (anything else fails)."""
    try:
        return bounded(fn, timeout)
    except OmniforgeError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 600, str(exc)
        return exc


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root, name)
            s = p.lstat()
            out[str(p.relative_to(folder))] = (s.st_size, s.st_mtime_ns)
    return out


def paths(node, prefix=()):
    """The path of every value in a JSON tree, the root's included."""
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield from paths(v, (*prefix, k))


def get(node, path):
    for k in path:
        node = node[k]
    return node


def near(value, others):
    """Values of the same kind as ``value``: what gets past the schema and reaches the code."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [0, 1, value - 1, value + 1, 2 * value, value // 2, 1 << 30]
    if isinstance(value, float):
        return [0.0, -value, value * 1e6, 1e-30]
    if isinstance(value, str):
        return [*others, value + "x", value.upper()]
    if isinstance(value, list):
        return [value[:-1], value + value[-1:], value[::-1], value[1:]] if value else [[]]
    if isinstance(value, dict):
        keys = list(value)
        return [{k: v for k, v in value.items() if k != drop} for drop in keys[:8]] or [{}]
    return [None]


ODD = [
    None, True, 0, -1, -(2**63), 2**64, 10**30, 1.5, float("nan"), float("inf"), -1e308,
    "", "a\x00b", "x" * 100_000, "../../etc/passwd", "/abs", "stages/../../x", "\u202e", [], {},
    [[[]]], {"": None}, DEEP, BIG,
]  # fmt: skip


@st.composite
def mutation(draw, manifest: dict, all_paths: list, strings: list):
    """One edit of ``manifest``: (path, kind, new value)."""
    path = draw(st.sampled_from(all_paths))
    value = get(manifest, path)
    kind = draw(st.sampled_from(["near", "near", "near", "odd", "drop", "add", "swap"]))
    if kind == "near":
        return path, "set", draw(st.sampled_from(near(value, strings)))
    if kind == "odd":
        return path, "set", draw(st.sampled_from(ODD))
    if kind == "swap":  # a value from elsewhere in the same manifest: the right kind of thing, misplaced
        return path, "set", copy.deepcopy(get(manifest, draw(st.sampled_from(all_paths))))
    return path, kind, draw(st.sampled_from(ODD[:12]))


def apply(manifest: dict, edits) -> dict:
    m = copy.deepcopy(manifest)
    for path, kind, shared in edits:
        value = copy.deepcopy(shared)  # the drawn value may share parts with the real manifest
        if not path:
            m = value if kind == "set" else m
            continue
        try:
            parent, key = get(m, path[:-1]), path[-1]
            if kind == "set":
                parent[key] = value
            elif kind == "drop":
                del parent[key]
            elif isinstance(parent, dict):  # add: an unknown key beside it
                parent[f"{key}_extra"] = value
            else:
                parent.insert(key, value)
        except (KeyError, IndexError, TypeError, AttributeError):  # an earlier edit changed what lay here
            continue
    return m


def manifest_text(m) -> str:
    text = json.dumps(m)
    text = text.replace(json.dumps(DEEP), "[" * 100_000 + "]" * 100_000)
    return text.replace(json.dumps(BIG), "1" + "0" * 5000)


@pytest.fixture(scope="module")
def real(default_build):
    m = json.loads((default_build / "manifest.json").read_text())
    all_paths = list(paths(m))
    strings = sorted({v for p in all_paths if isinstance(v := get(m, p), str)})
    return m, all_paths, strings


@pytest.fixture(scope="module")
def build_copy(default_build, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("manifest") / "build"
    shutil.copytree(default_build, dst)
    return dst


def try_build(build: Path, text: str | bytes, tmp: Path) -> object:
    """Write ``text`` as the manifest, open the build and run a short request with each modality
    forced in turn; what came of it (the last result or the first error)."""
    (build / "manifest.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    before = snapshot(build)
    pipe = outcome(lambda: Pipeline(build))
    got = pipe
    if isinstance(pipe, Pipeline):
        got = outcome(lambda: pipe.llm.generate("A dog", GenerationConfig(max_new_tokens=2)))
        for modality in sorted(pipe.modalities_in()) if not isinstance(got, OmniforgeError) else ():
            got = outcome(
                lambda m=modality: pipe.run(
                    "A dog",
                    generation=GenerationConfig(max_new_tokens=1),
                    diffusion=DiffusionConfig(steps=1),
                    force=[m],
                )
            )
            if isinstance(got, OmniforgeError):
                break
            assert isinstance(got, PipelineResult)
            for arr in (*got.images, *got.videos, *got.audios):
                assert np.isfinite(arr).all() and arr.size < 1 << 24
            got.save(tmp / "out")  # the media are writable at the rate and sizes it reports
    assert snapshot(build) == before, "the build folder changed"
    return got


@PROPERTY
@given(data=st.data())
def test_any_mutated_manifest_opens_and_runs_or_gets_one_error(real, build_copy, tmp_path, data):
    manifest, all_paths, strings = real
    edits = data.draw(st.lists(mutation(manifest, all_paths, strings), min_size=1, max_size=3))
    got = try_build(build_copy, manifest_text(apply(manifest, edits)), tmp_path)
    event(type(got).__name__)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[" * 100_000 + "]" * 100_000, "is not valid JSON"),
        ('{"schema_version": ' + "9" * 5000 + "}", "is not valid JSON"),
        ('{"schema_version": 2, "schema_version": 2}', "does not match its schema"),
        ("\ufeff{}", "is not valid JSON"),
        (b"\xff\xfe{\x00}\x00", "is not valid JSON"),
        ("null", "manifest"),
        ("NaN", "manifest"),
    ],
)
def test_hostile_manifest_text_gets_one_sentence(build_copy, tmp_path, text, needle):
    got = try_build(build_copy, text, tmp_path)
    assert isinstance(got, ManifestError) and needle in str(got), got


@PROPERTY
@given(cut=st.integers(0, 10**9))
def test_a_cut_off_manifest_gets_one_sentence(real, build_copy, tmp_path, cut):
    text = json.dumps(real[0], indent=1)
    got = try_build(build_copy, text[: cut % len(text)], tmp_path)
    assert isinstance(got, ManifestError), got


def test_the_real_manifest_still_opens(real, build_copy, tmp_path):
    got = try_build(build_copy, json.dumps(real[0]), tmp_path)
    assert isinstance(got, PipelineResult)
    assert load_manifest(build_copy).to_dict()["stages"] == real[0]["stages"]


@pytest.mark.parametrize("modality", MODALITIES)
def test_a_manifest_whose_stage_graphs_are_swapped_is_refused(real, build_copy, tmp_path, modality):
    """A decoder served from another stage's graph (hashes and paths all valid): the contract
    check at load refuses it."""
    m = copy.deepcopy(real[0])
    unet, vae = m["stages"][f"{modality}_unet"], m["stages"][f"{modality}_vae_decoder"]
    unet["variants"], vae["variants"] = vae["variants"], unet["variants"]
    got = try_build(build_copy, json.dumps(m), tmp_path)
    assert isinstance(got, OmniforgeError), got
