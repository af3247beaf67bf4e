# ruff: noqa: F811  (the native fixtures are imported from tests/test_native.py by name)
"""The native core's tokenizer (``of_tokenizer_*`` through ctypes) against the ``tokenizers``
library, on >= 10,000 generated strings per tokenizer omniforge builds carry: the embedded default's
byte-level BPE, a Vicuna/Llama SentencePiece BPE with byte fallback as ``omniforge import nextgpt``
converts it (with NExT-GPT's 38 added tokens, lstrip/rstrip), and the same model in the newer Llama
form (a Metaspace pre-tokenizer). Strings mix Unicode from many scripts and planes, emoji, combining
marks, whitespace runs, digits, contractions, added tokens and long inputs; ids must be identical,
and decoding (with and without special tokens) must give the library's text. A fourth tokenizer has
Qwen2's form (NFC, the Split regex, byte-level BPE, ChatML special tokens and omniforge's signal
tokens), its merges learnt across the regex's boundaries so that every split shows in the ids; the
strings also carry text that is not in NFC (decomposed accents, Hangul jamo, marks out of canonical
order, singletons and composition exclusions) and each branch of Qwen's regex. Unsupported
tokenizer features are refused at load with one sentence."""

from __future__ import annotations

import ctypes
import json
import random
import unicodedata
from pathlib import Path

import pytest

from omniforge.model.families import QWEN_SPLIT  # the split Qwen's released files carry
from tests.test_native import (  # noqa: F401  (fixtures)
    native_build,
    native_cache,
    ort_headers,
)

N_STRINGS = 10_000


class NativeTokenizer:
    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.lib = lib
        self.h = ctypes.c_void_p()
        st = lib.of_tokenizer_open(str(path).encode(), ctypes.byref(self.h))
        self.status, self.error = st, lib.of_tokenizer_last_error(self.h).decode()
        self.ids = (ctypes.c_int32 * 200_000)()
        self.text = ctypes.create_string_buffer(1 << 20)

    def close(self) -> None:
        self.lib.of_tokenizer_close(self.h)

    def encode(self, text: str, special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n = ctypes.c_size_t()
        st = self.lib.of_tokenizer_encode(
            self.h, data, len(data), int(special), self.ids, len(self.ids), ctypes.byref(n)
        )
        assert st == 0, self.lib.of_tokenizer_last_error(self.h).decode()
        return self.ids[: n.value]

    def decode(self, ids: list[int], skip_special: bool) -> str:
        arr = (ctypes.c_int32 * max(1, len(ids)))(*ids)
        n = ctypes.c_size_t()
        st = self.lib.of_tokenizer_decode(
            self.h, arr, len(ids), int(skip_special), self.text, len(self.text), ctypes.byref(n)
        )
        assert st == 0, self.lib.of_tokenizer_last_error(self.h).decode()
        return ctypes.string_at(self.text, n.value).decode("utf-8")


@pytest.fixture(scope="module")
def lib(native_build: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(native_build / "libomniforge.so"))
    p, sz = ctypes.POINTER, ctypes.c_size_t
    lib.of_tokenizer_open.argtypes = [ctypes.c_char_p, p(ctypes.c_void_p)]
    lib.of_tokenizer_last_error.argtypes = [ctypes.c_void_p]
    lib.of_tokenizer_last_error.restype = ctypes.c_char_p
    lib.of_tokenizer_close.argtypes = [ctypes.c_void_p]
    lib.of_tokenizer_encode.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        sz,
        ctypes.c_int,
        p(ctypes.c_int32),
        sz,
        p(sz),
    ]
    lib.of_tokenizer_decode.argtypes = [
        ctypes.c_void_p,
        p(ctypes.c_int32),
        sz,
        ctypes.c_int,
        ctypes.c_char_p,
        sz,
        p(sz),
    ]
    lib.of_status_name.restype = ctypes.c_char_p
    return lib


# ---- the tokenizers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory: pytest.TempPathFactory, default_model: Path) -> dict[str, Path]:
    from tokenizers import Tokenizer, pre_tokenizers

    from omniforge.importers.tokenizer import convert_tokenizer
    from tests.release_format.delta import signal_tokens
    from tests.release_format.vicuna import added_token, train_sentencepiece, vicuna_tokenizer_config

    root = tmp_path_factory.mktemp("tokenizers")
    src = root / "vicuna-src"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(train_sentencepiece())
    (src / "tokenizer_config.json").write_text(json.dumps(vicuna_tokenizer_config()))
    plain = {
        k: {kk: vv for kk, vv in added_token(t).items() if kk != "__type"}
        for k, t in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))
    }
    (src / "special_tokens_map.json").write_text(json.dumps({**plain, "pad_token": "</s>"}))
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model")).get_piece_size()
    added = {t: vocab + i for i, t in enumerate(["{'<Img>'}", "{'</Img>'}", *signal_tokens()])}
    (src / "added_tokens.json").write_text(json.dumps(added))
    try:
        convert_tokenizer(src, root / "vicuna")
    except Exception as exc:  # noqa: BLE001  (protobuf's VersionError where sentencepiece's pb2 is newer)
        if "protobuf" not in f"{type(exc).__module__} {exc}".lower():
            raise
        _convert_like_the_importer(src, root / "vicuna", added)
    # the newer Llama form of the same model: no normalizer, a Metaspace pre-tokenizer
    tok = Tokenizer.from_file(str(root / "vicuna" / "tokenizer.json"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    (root / "llama-metaspace").mkdir()
    tok.save(str(root / "llama-metaspace" / "tokenizer.json"))
    # a SentencePiece model that removes extra whitespace: transformers writes two regex Replaces first
    d = json.loads((root / "vicuna" / "tokenizer.json").read_text())
    spaces = [
        {"type": "Replace", "pattern": {"Regex": "^ +| +$"}, "content": ""},
        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
    ]
    d["normalizer"] = {"type": "Sequence", "normalizers": [*spaces, *d["normalizer"]["normalizers"]]}
    (root / "sentencepiece-spaces").mkdir()
    (root / "sentencepiece-spaces" / "tokenizer.json").write_text(json.dumps(d))
    (root / "qwen").mkdir()
    _qwen_tokenizer(signal_tokens()).save(str(root / "qwen" / "tokenizer.json"))
    return {
        "default": default_model / "llm" / "tokenizer.json",
        "vicuna": root / "vicuna" / "tokenizer.json",
        "llama-metaspace": root / "llama-metaspace" / "tokenizer.json",
        "qwen": root / "qwen" / "tokenizer.json",
        "sentencepiece-spaces": root / "sentencepiece-spaces" / "tokenizer.json",
    }


def _qwen_tokenizer(signals: list[str]):
    """Qwen2's tokenizer.json form (as tests/test_qwen.py writes it): the NFC normalizer, the Split
    regex (Isolated) then ByteLevel without its regex, the ByteLevel post-processor and decoder,
    <|endoftext|>/<|im_start|>/<|im_end|> special and the signal tokens added (normalized). Its BPE is
    learnt on whole strings (no pre-tokenizer), so merges run across the regex's boundaries and a
    split in the wrong place changes the ids."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    from omniforge.model.families import QWEN_SPECIAL as SPECIAL
    from tests.test_qwen import CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    rng = random.Random(7)
    corpus = CORPUS + _strings(rng, _words(), [], 1500)
    trainer = trainers.BpeTrainer(
        vocab_size=3000, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, normalized=True) for t in signals])
    return tok


def _convert_like_the_importer(src: Path, dst: Path, added: dict[str, int]) -> None:
    """What ``convert_tokenizer`` writes for this folder, read through SentencePieceProcessor where
    the installed protobuf cannot load sentencepiece's model description: BPE merges ranked by the
    merged piece's score, byte fallback, fused unk, Prepend + Replace normalizers, the
    Replace/ByteFallback/Fuse/Strip decoder, added tokens as 4.29 stripped them, BOS template."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {p: i for i, p in enumerate(pieces)}
    normal = {
        p: (sp.get_score(i), i)
        for i, p in enumerate(pieces)
        if not (sp.is_unknown(i) or sp.is_control(i) or sp.is_byte(i) or sp.is_unused(i))
    }
    ranked = sorted(
        (-score, i, p[:cut], p[cut:])
        for p, (score, i) in normal.items()
        for cut in range(1, len(p))
        if p[:cut] in normal and p[cut:] in normal
    )
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(a, b) for *_, a, b in ranked],
            unk_token="<unk>",
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    for t, _ in sorted(added.items(), key=lambda kv: kv[1]):
        tok.add_tokens([AddedToken(t, lstrip=True, rstrip=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", vocab["<s>"])]
    )
    dst.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst / "tokenizer.json"))


# ---- the strings -------------------------------------------------------------------------------

BLOCKS = [
    (0x20, 0x7E),
    (0xA0, 0x17F),
    (0x370, 0x3FF),
    (0x400, 0x4FF),
    (0x590, 0x5FF),
    (0x600, 0x6FF),
    (0x900, 0x97F),
    (0xE00, 0xE7F),
    (0x1100, 0x11FF),
    (0x1E00, 0x1EFF),
    (0x2000, 0x206F),
    (0x2190, 0x23FF),
    (0x3000, 0x30FF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
    (0xFF00, 0xFFEF),
    (0x1F300, 0x1FAFF),
    (0x10000, 0x1007F),
    (0x1D400, 0x1D7FF),
    (0x20000, 0x2A6DF),
    (0xE0000, 0xE007F),
]
SPACES = [
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n",
    "\r\n",
    " \n ",
    "\u00a0",
    "\u3000",
    "\u2009",
    "\u200b",
    "\x0b",
    "\x0c",
    "\u2028",
    "\u0085",
]
PUNCT = list(".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`") + ["...", "--", "\u2014", "\u00bf", "\u201c", "\u201d"]
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'x"]
CONTRACTIONS += ["'T", "'Re", "'rE", "'VE", "'M", "'lL", "'D", "'\u017f", "'\u017ft", "'ss", "\u2019s", "'"]
EMOJI = [
    "\U0001f600",
    "\U0001f44d\U0001f3fd",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "\u2764\ufe0f",
    "\U0001f1ef\U0001f1f5",
]
COMBINING = ["e\u0301", "n\u0303", "\u0915\u094d\u0937", "a\u0308\u0304", "\u05e9\u05c1"]
# marks of many combining classes (1, 7, 9, 10-26, 103, 129-132, 202-240), U+1DF6, U+07FD and U+0898
# among them: classes newer than the Unicode 9.0 of tokenizers' normalizer, in which they are 0
MARKS = [chr(c) for c in (*range(0x300, 0x370), 0x334, 0x93C, 0x94D, *range(0x5B0, 0x5C3), 0xE38, 0xE48)]
MARKS += [chr(c) for c in (0xF71, 0xF72, 0xF74, 0x1DCE, 0x31B, 0x302A, 0x302E, 0x1DF6, 0x7FD, 0x898, 0x1D165)]
# singletons, composition exclusions, non-starter decompositions, U+11938 (decomposed only after 9.0)
ODD = [
    "\u2126",
    "\u212b",
    "\u0958",
    "\u0340",
    "\u0344",
    "\u0f73",
    "\u2adc",
    "\U0001d15e",
    "\u1f71",
    "\U00011938",
]
ODD += ["\U00011935\U00011930", "\u0b47\u0b3e", "\u0cc6\u0cc2\u0cd5", "\u1025\u102e", "\u0e4d\u0e32"]
DECOMPOSABLE = [chr(c) for c in range(0x110000) if unicodedata.decomposition(chr(c))[:1] not in ("", "<")]
NEWLINES = ["\n", "\n\n\n", "\r\n", "\r\n\r\n", " \n", "  \n\t ", "\n ", "\r", "\t\n\n  ", "\u2028\n"]


def _char(rng: random.Random) -> str:
    if rng.random() < 0.1:  # anywhere in Unicode (no surrogates)
        while True:
            c = rng.randrange(0x110000)
            if not 0xD800 <= c <= 0xDFFF:
                return chr(c)
    lo, hi = rng.choice(BLOCKS)
    return chr(rng.randint(lo, hi))


def _strings(rng: random.Random, words: list[str], added: list[str], n: int) -> list[str]:
    out = []
    for i in range(n):
        s = _string(rng, words, added)
        if i % 97 == 0:  # long inputs
            s = " ".join(_string(rng, words, added) for _ in range(60))[:8000]
        if i % 50 == 1:
            s = rng.choice(SPACES) * rng.randint(1, 40) + s + rng.choice(SPACES) * rng.randint(1, 40)
        out.append(s)
    return out + ["", " ", "  ", "\n", "a", "'s", "\ufffd", "\u2581", "\u2581\u2581x", "<0x41>"]


def _unnormalized(rng: random.Random) -> str:
    """Text NFC changes (or must leave alone): decomposed characters, marks out of canonical order,
    Hangul jamo (LV, LVT, a syllable then a trailing jamo, lone jamo), singletons and exclusions."""
    kind = rng.random()
    if kind < 0.3:
        base = rng.choice("aeiouAEIOUnNcCsSzZ\u03b1\u03b5\u03c9\u0438\u0415\u05e9\u0915 ")
        return base + "".join(rng.choice(MARKS) for _ in range(rng.randint(1, 4)))
    if kind < 0.55:
        ch = rng.choice(DECOMPOSABLE)
        return unicodedata.normalize("NFD", ch) if rng.random() < 0.7 else ch
    if kind < 0.8:
        jamo = [chr(rng.randint(0x1100, 0x1112)), chr(rng.randint(0x1161, 0x1175))]
        if rng.random() < 0.5:
            jamo.append(chr(rng.randint(0x11A8, 0x11C2)))
        if rng.random() < 0.2:
            jamo = [chr(0xAC00 + 28 * rng.randrange(399)), chr(rng.randint(0x11A7, 0x11C3))]
        if rng.random() < 0.2:
            rng.shuffle(jamo)
        return "".join(jamo)
    return rng.choice(ODD)


def _string(rng: random.Random, words: list[str], added: list[str]) -> str:
    parts = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        if kind < 0.3:
            parts.append(rng.choice(words))
        elif kind < 0.45:
            parts.append("".join(_char(rng) for _ in range(rng.randint(1, 6))))
        elif kind < 0.58:
            parts.append(rng.choice(SPACES) * rng.randint(1, 3))
        elif kind < 0.64:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 12))))
        elif kind < 0.7:
            parts.append(rng.choice(PUNCT) * rng.randint(1, 3))
        elif kind < 0.76:
            parts.append(rng.choice(CONTRACTIONS))
        elif kind < 0.8:
            r = rng.random()
            if r < 0.3:
                parts.append(rng.choice(EMOJI + COMBINING))
            elif r < 0.8:
                parts.append(_unnormalized(rng))
            else:
                parts.append(rng.choice(NEWLINES) * rng.randint(1, 3))
        elif kind < 0.92 and added:
            t = rng.choice(added)
            parts.append(rng.choice(["", " ", "  ", "\n"]) + t + rng.choice(["", " ", "  ", "\t"]))
        else:
            parts.append(rng.choice(words).upper())
    return "".join(p + (" " if rng.random() < 0.5 else "") for p in parts)


def _words() -> list[str]:
    from importlib import resources

    text = resources.files("omniforge").joinpath("data/corpus.txt").read_text()
    return sorted(set(text.split()))[:3000] or ["hello", "world"]


@pytest.mark.parametrize("kind", ["default", "vicuna", "llama-metaspace", "qwen", "sentencepiece-spaces"])
def test_ids_and_text_equal_the_tokenizers_library(
    lib: ctypes.CDLL, tokenizer_files: dict[str, Path], kind: str
) -> None:
    from tokenizers import Tokenizer

    path = tokenizer_files[kind]
    ref = Tokenizer.from_file(str(path))
    native = NativeTokenizer(lib, path)
    assert native.status == 0, native.error
    try:
        added = [t.content for t in ref.get_added_tokens_decoder().values()]
        rng = random.Random(16)
        strings = _strings(rng, _words(), added, N_STRINGS)
        assert len(strings) >= N_STRINGS
        for special in (True, False):
            want = [e.ids for e in ref.encode_batch(strings, add_special_tokens=special)]
            for s, w in zip(strings, want, strict=True):
                got = native.encode(s, special)
                assert got == w, f"{kind}: {s!r}: native {got} != tokenizers {w}"
                if special:
                    for skip in (False, True):
                        assert native.decode(got, skip) == ref.decode(w, skip_special_tokens=skip), (
                            kind,
                            s,
                            skip,
                        )
        # random id sequences: byte tokens cut mid-character, special and added tokens, unknown ids
        size = ref.get_vocab_size(with_added_tokens=True)
        for _ in range(2000):
            ids = [rng.randrange(size + 3) for _ in range(rng.randint(0, 30))]
            for skip in (False, True):
                assert native.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), (
                    kind,
                    ids,
                    skip,
                )
    finally:
        native.close()


GPT4_SPLIT = (  # cl100k's: digits in threes, a pattern the native core does not match
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split(regex: str, **fields) -> dict:
    split = {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
    return {
        "type": "Sequence",
        "pretokenizers": [
            {**split, **fields},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }


def test_a_qwen_tokenizer_written_by_transformers(
    lib: ctypes.CDLL, tokenizer_files: dict[str, Path], tmp_path: Path
) -> None:
    """Qwen2TokenizerFast's own tokenizer.json (from vocab.json and merges.txt, as a Qwen folder
    without tokenizer.json gets one): its template and decoder settings differ from the library's
    defaults; ids and text must still be the library's."""
    from tokenizers import Tokenizer
    from transformers import Qwen2TokenizerFast

    model = json.loads(tokenizer_files["qwen"].read_text())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    hf = Qwen2TokenizerFast(
        vocab_file=str(tmp_path / "vocab.json"),
        merges_file=str(tmp_path / "merges.txt"),
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    hf.save_pretrained(str(tmp_path / "hf"))
    path = tmp_path / "hf" / "tokenizer.json"
    assert json.loads(path.read_text())["pre_tokenizer"]["pretokenizers"][0]["pattern"] == {
        "Regex": QWEN_SPLIT
    }
    ref = Tokenizer.from_file(str(path))
    native = NativeTokenizer(lib, path)
    assert native.status == 0, native.error
    try:
        added = [t.content for t in ref.get_added_tokens_decoder().values()]
        strings = _strings(random.Random(17), _words(), added, 1500)
        for s, e in zip(strings, ref.encode_batch(strings), strict=True):
            got = native.encode(s)
            assert got == e.ids, f"{s!r}: native {got} != tokenizers {e.ids}"
            assert native.decode(got, True) == ref.decode(e.ids, skip_special_tokens=True), s
    finally:
        native.close()


def test_qwen_pattern_is_the_one_its_files_carry(tokenizer_files: dict[str, Path]) -> None:
    d = json.loads(tokenizer_files["qwen"].read_text())
    assert d["pre_tokenizer"]["pretokenizers"][0]["pattern"] == {"Regex": QWEN_SPLIT}
    assert d["normalizer"] == {"type": "NFC"}


def _refused(lib: ctypes.CDLL, path: Path) -> tuple[str, str]:
    t = NativeTokenizer(lib, path)
    t.close()
    return lib.of_status_name(t.status).decode(), t.error


@pytest.mark.parametrize(
    "edit, status, words",
    [
        (lambda d: d["model"].update(type="Unigram"), "OF_ERR_UNSUPPORTED", "Unigram model"),
        (lambda d: d.update(normalizer={"type": "NFKC"}), "OF_ERR_UNSUPPORTED", "the normalizer 'NFKC'"),
        (lambda d: d.update(normalizer={"type": "NFD"}), "OF_ERR_UNSUPPORTED", "the normalizer 'NFD'"),
        (lambda d: d.update(normalizer={"type": "NFKD"}), "OF_ERR_UNSUPPORTED", "the normalizer 'NFKD'"),
        (
            lambda d: d.update(
                normalizer={"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}
            ),
            "OF_ERR_UNSUPPORTED",
            "the normalizer 'Lowercase'",
        ),
        (
            lambda d: d.update(normalizer={"type": "Replace", "pattern": {"Regex": " +"}, "content": " "}),
            "OF_ERR_UNSUPPORTED",
            "a Replace normalizer with a regex pattern other than SentencePiece's whitespace rules",
        ),
        (
            lambda d: d.update(pre_tokenizer=_split(GPT4_SPLIT)),
            "OF_ERR_UNSUPPORTED",
            "a Split pre-tokenizer whose pattern is not Qwen2's regex",
        ),
        (
            lambda d: d.update(pre_tokenizer=_split(QWEN_SPLIT[:-4])),
            "OF_ERR_UNSUPPORTED",
            "a Split pre-tokenizer whose pattern is not Qwen2's regex",
        ),
        (
            lambda d: d.update(pre_tokenizer=_split(QWEN_SPLIT, pattern={"String": " "})),
            "OF_ERR_UNSUPPORTED",
            "a Split pre-tokenizer whose pattern is not Qwen2's regex",
        ),
        (
            lambda d: d.update(pre_tokenizer=_split(QWEN_SPLIT, behavior="Removed")),
            "OF_ERR_UNSUPPORTED",
            "a Split pre-tokenizer with behavior 'Removed'",
        ),
        (
            lambda d: d.update(pre_tokenizer=_split(QWEN_SPLIT, invert=True)),
            "OF_ERR_UNSUPPORTED",
            "a Split pre-tokenizer with behavior 'Isolated' inverted",
        ),
        (
            lambda d: d.update(pre_tokenizer={"type": "Whitespace"}),
            "OF_ERR_UNSUPPORTED",
            "the pre-tokenizer 'Whitespace'",
        ),
        (lambda d: d.update(decoder={"type": "WordPiece"}), "OF_ERR_UNSUPPORTED", "the decoder 'WordPiece'"),
        (
            lambda d: d.update(post_processor={"type": "BertProcessing"}),
            "OF_ERR_UNSUPPORTED",
            "post-processor 'BertProcessing'",
        ),
        (lambda d: d.update(truncation={"max_length": 8}), "OF_ERR_UNSUPPORTED", "truncation"),
        (lambda d: d["model"].update(dropout=0.1), "OF_ERR_UNSUPPORTED", "dropout"),
        (lambda d: d["added_tokens"][0].update(single_word=True), "OF_ERR_UNSUPPORTED", "single_word"),
        (
            lambda d: d["model"].update(merges=[["no-such", "token"]]),
            "OF_ERR_MANIFEST",
            "merge names a token",
        ),
        (lambda d: d.clear(), "OF_ERR_MANIFEST", "has no model"),
    ],
)
def test_unsupported_features_are_refused_in_one_sentence(
    lib: ctypes.CDLL, tokenizer_files: dict[str, Path], tmp_path: Path, edit, status: str, words: str
) -> None:
    d = json.loads(tokenizer_files["default"].read_text())
    edit(d)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(d))
    got_status, message = _refused(lib, path)
    assert got_status == status and words in message and "\n" not in message, message
    path.write_text("{not json")
    assert _refused(lib, path)[0] == "OF_ERR_MANIFEST"
