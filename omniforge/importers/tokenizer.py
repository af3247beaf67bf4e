"""The tokenizer saved beside NExT-GPT's delta, rewritten as ``tokenizer.json`` for the runtime.

NExT-GPT saved its slow ``LlamaTokenizer`` with transformers 4.29: the SentencePiece
``tokenizer.model``, ``tokenizer_config.json``, ``special_tokens_map.json`` and
``added_tokens.json`` (38 tokens from id 32000 on). The ``tokenizers`` pipeline written here encodes
as that tokenizer did:

- text between added tokens is encoded piece by piece with SentencePiece's own settings, each piece
  getting the dummy ``▁`` prefix (4.29 had no ``legacy=False``);
- 4.29 stripped the whitespace on both sides of an added token given as a plain string (all of
  NExT-GPT's), so they are ``lstrip`` / ``rstrip`` added tokens here; ``<s>``, ``</s>``, ``<unk>``
  (AddedToken objects in 4.29) keep their neighbours' spaces;
- BPE merges are ranked by the merged piece's score, as SentencePiece picks them.

The release's two tags were added as Python sets (``add_tokens({"<Img>"})``, fixed upstream in
Nov 2023), so its tokenizer holds the literal strings ``{'<Img>'}`` and ``{'</Img>'}`` (ids 32000,
32001). NExT-GPT's code of that time wrote ``<Img>`` / ``</Img>`` in its prompts, which that
tokenizer encodes as ordinary SentencePiece pieces: the released model was trained and run with the
tags as text, never with those two ids. The summary names each tag's literal (``tags``) and the
tags whose plain spelling is not a token (``tags_as_text``), so prompts can be built as NExT-GPT's were.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

from omniforge.errors import ConfigError, MissingDependencyError, ModelNotFoundError

SIGNAL_RE = {"image": r"\[IMG(\d+)\]", "video": r"\[VID(\d+)\]", "audio": r"\[AUD(\d+)\]"}
SET_LITERAL_RE = re.compile(r"\{'(.+)'\}")  # str({"<Img>"}): how a set passed to add_tokens was stored
TAG_RE = re.compile(r"</?[A-Za-z]+>")
# SentencePiece piece types (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
SP_UNIGRAM, SP_BPE = 1, 2


def convert_tokenizer(src_dir: str | Path, dst_dir: str | Path) -> dict:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` in ``dst_dir`` from the tokenizer files in
    ``src_dir`` (a SentencePiece ``tokenizer.model`` with transformers' json files, or a
    ``tokenizer.json``). Added tokens keep their ids. Returns a summary: sizes, added tokens with
    ids, the literal strings of the tags (and which tags therefore encode as plain text), the signal
    tokens per modality, BOS/EOS."""
    src, dst = Path(src_dir), Path(dst_dir)
    if not src.is_dir():
        raise ModelNotFoundError(f"{src} is not a folder")
    config = _read_json(src / "tokenizer_config.json")
    special_map = _read_json(src / "special_tokens_map.json")
    added = _added_tokens(src / "added_tokens.json")
    add_bos = bool(config.get("add_bos_token", True))  # LlamaTokenizer's defaults
    add_eos = bool(config.get("add_eos_token", False))

    if (src / "tokenizer.json").is_file():
        try:
            tok = Tokenizer.from_file(str(src / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise ConfigError(f"{src / 'tokenizer.json'} cannot be read ({exc})") from None
        source, defaults = "tokenizer.json", {}
        base_size = tok.get_vocab_size(with_added_tokens=False)
    elif (src / "tokenizer.model").is_file():
        tok, defaults = _from_sentencepiece(src / "tokenizer.model")
        source, base_size = "tokenizer.model", tok.get_vocab_size(with_added_tokens=True)
    else:
        raise ModelNotFoundError(f"{src} has neither tokenizer.model nor tokenizer.json")

    specials = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = _token_str(special_map.get(name)) or _token_str(config.get(name)) or defaults.get(name)
        if value is not None:
            specials[name] = value
    for name in ("bos_token", "eos_token"):
        if name not in specials or tok.token_to_id(specials[name]) is None:
            raise ConfigError(f"{src} names no {name} that is in its vocabulary")

    if source == "tokenizer.model":
        _add_tokens_as_4_29(tok, added, special_map, src)
        bos, eos = specials["bos_token"], specials["eos_token"]
        single = [bos] * add_bos + ["$A"] + [eos] * add_eos
        pair = single + [f"{t}:1" if t in (bos, eos) else "$B:1" for t in single]
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(single),
            pair=" ".join(pair),
            special_tokens=[(t, tok.token_to_id(t)) for t in {bos, eos} if t in single],
        )
    wrong = {t: (i, tok.token_to_id(t)) for t, i in added.items() if tok.token_to_id(t) != i}
    if wrong:
        t, (want, got) = next(iter(wrong.items()))
        raise ConfigError(
            f"{src}: added token {t!r} has id {got} in the tokenizer, not {want} as added_tokens.json says"
        )

    dst.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst / "tokenizer.json"))
    out_config = {
        # the generic class: transformers then takes tokenizer.json as it is
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "model_max_length": config.get("model_max_length", 2048),
        "clean_up_tokenization_spaces": False,
        "legacy": True,
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(out_config, indent=2) + "\n")

    if not added:  # a tokenizer.json: its added tokens are those past the model's vocabulary
        added = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if i >= base_size}
    return {
        "source": source,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "base_vocab_size": base_size,
        "added_tokens": dict(sorted(added.items(), key=lambda kv: kv[1])),
        "tags": _tags(added),
        "tags_as_text": [t for t, literal in _tags(added).items() if t != literal],
        "signal_tokens": {
            m: {t: i for t, i in sorted(added.items(), key=lambda kv: kv[1]) if re.fullmatch(p, t)}
            for m, p in SIGNAL_RE.items()
        },
        "bos_token": specials["bos_token"],
        "eos_token": specials["eos_token"],
        "add_bos_token": add_bos,
    }


def _tags(added: dict[str, int]) -> dict[str, str]:
    """Tag -> its literal string in the vocabulary: ``{"<Img>": "{'<Img>'}"}`` for the release."""
    tags = {}
    for literal in added:
        m = SET_LITERAL_RE.fullmatch(literal)
        if m and TAG_RE.fullmatch(m.group(1)):
            tags[m.group(1)] = literal
        elif TAG_RE.fullmatch(literal):
            tags.setdefault(literal, literal)
    return tags


def _sp_model_proto():
    """SentencePiece's ModelProto message: sentencepiece's own generated module, or, where that
    demands a newer protobuf runtime than is installed (serving clients pin protobuf below 7),
    transformers' copy of the same schema, which loads under protobuf 4 to 7."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb2
    except ImportError:
        raise MissingDependencyError(
            "reading a SentencePiece tokenizer.model needs sentencepiece (pip install 'omniforge[export]')"
        ) from None
    except Exception:  # protobuf's VersionError: the generated code is newer than the runtime
        from transformers.utils import sentencepiece_model_pb2_new as pb2
    return pb2.ModelProto()


def _from_sentencepiece(path: Path) -> tuple[Tokenizer, dict[str, str]]:
    """A ``tokenizers`` pipeline that encodes as ``SentencePieceProcessor.encode`` does."""
    proto = _sp_model_proto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception:  # protobuf's DecodeError, or a message that is not a model
        raise ConfigError(f"{path} is not a SentencePiece model") from None
    if not proto.pieces:
        raise ConfigError(f"{path} is not a SentencePiece model (it has no pieces)")
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    unk = next((p.piece for p in pieces if p.type == UNKNOWN), None)
    if spec.model_type == SP_BPE:
        # SentencePiece merges the adjacent pair whose union has the highest score: rank merges so
        normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == NORMAL}
        ranked = []
        for text, (score, i) in normal.items():
            for cut in range(1, len(text)):
                left, right = text[:cut], text[cut:]
                if left in normal and right in normal:
                    ranked.append((-score, i, left, right))
        merges = [(left, right) for _, _, left, right in sorted(ranked)]
        model = models.BPE(
            vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=spec.byte_fallback
        )
    elif spec.model_type == SP_UNIGRAM:
        model = models.Unigram([(p.piece, p.score) for p in pieces], spec.unk_id, spec.byte_fallback)
    else:
        raise ConfigError(
            f"{path} is a SentencePiece model of a kind omniforge does not convert (only BPE and unigram)"
        )
    tok = Tokenizer(model)
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:  # spaces only: SentencePiece leaves newlines alone
        steps += [normalizers.Replace(Regex(r"^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:  # every piece of text between added tokens, as 4.29's slow tokenizer did
        steps.append(normalizers.Prepend("▁"))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tail = [decoders.Fuse(), decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else [decoders.Fuse()]
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), *tail])
    special = [p.piece for p in pieces if p.type in (UNKNOWN, CONTROL)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])

    def piece(i: int) -> str | None:
        return pieces[i].piece if 0 <= i < len(pieces) else None

    defaults = {"bos_token": piece(spec.bos_id), "eos_token": piece(spec.eos_id), "unk_token": unk}
    return tok, {k: v for k, v in defaults.items() if v}


def _add_tokens_as_4_29(tok: Tokenizer, added: dict[str, int], special_map: dict, src: Path) -> None:
    """Append ``added_tokens.json``'s tokens in id order, each at the id it was saved with."""
    extra = special_map.get("additional_special_tokens") or []
    flags = {_token_str(t): t for t in extra if _token_str(t)}
    for token, index in sorted(added.items(), key=lambda kv: kv[1]):
        if index != tok.get_vocab_size(with_added_tokens=True):
            raise ConfigError(
                f"{src / 'added_tokens.json'}: {token!r} has id {index}, but the next free id is "
                f"{tok.get_vocab_size(with_added_tokens=True)} (ids must follow the vocabulary without gaps)"
            )
        spec = flags.get(token)
        # a plain string strips both sides in 4.29; an AddedToken dict says what it strips
        lstrip = spec.get("lstrip", False) if isinstance(spec, dict) else True
        rstrip = spec.get("rstrip", False) if isinstance(spec, dict) else True
        at = AddedToken(token, lstrip=lstrip, rstrip=rstrip, normalized=False, special=spec is not None)
        (tok.add_special_tokens if spec is not None else tok.add_tokens)([at])


def _added_tokens(path: Path) -> dict[str, int]:
    added = _read_json(path)
    if not all(
        isinstance(t, str) and isinstance(i, int) and not isinstance(i, bool) for t, i in added.items()
    ):
        raise ConfigError(f"{path} is not a JSON object of token -> integer id")
    if len(set(added.values())) != len(added):
        raise ConfigError(f"{path} gives two tokens the same id")
    return added


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{path} is not valid JSON") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return value


def _token_str(value: object) -> str | None:
    """A token given as a string or as an AddedToken dict ({"__type": "AddedToken", "content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None
