"""The tiny default's tokenizer: a byte-level BPE trained with ``tokenizers`` on shipped text.

It carries the NExT-GPT signal tokens ([IMG0..3], [VID0..23], [AUD0..7]) and the media
placeholders as added special tokens, so each is exactly one id.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
SIGNAL_TOKENS = {
    "image": [f"[IMG{i}]" for i in range(4)],
    "video": [f"[VID{i}]" for i in range(24)],
    "audio": [f"[AUD{i}]" for i in range(8)],
}
PLACEHOLDERS = {"image": "<image>", "video": "<video>", "audio": "<audio>"}


def special_tokens() -> list[str]:
    toks = [BOS, EOS, UNK, PAD]
    for m in ("image", "video", "audio"):
        toks += SIGNAL_TOKENS[m]
    return toks + list(PLACEHOLDERS.values())


def train_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """Deterministic BPE over the corpus that ships in ``omniforge/data``."""
    text = resources.files("omniforge").joinpath("data/corpus.txt").read_text()
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, folder: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json so transformers' AutoTokenizer loads it too."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "model_max_length": 4096,
        "add_bos_token": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def require_tokenizer_json(llm: Path) -> None:
    """Refuse an LLM folder without ``tokenizer.json``: the torch-free runtime reads prompts only
    through it, so its build could not run from text."""
    from omniforge.errors import ExportError

    if (llm / "tokenizer.json").is_file():
        return
    hint = (
        "; save its SentencePiece tokenizer.model as tokenizer.json first "
        "(transformers: AutoTokenizer.from_pretrained(folder).save_pretrained(folder))"
        if (llm / "tokenizer.model").is_file()
        else ""
    )
    raise ExportError(
        f"the LLM folder {llm} has no tokenizer.json, which the runtime needs to read prompts{hint}"
    )
