"""The embedded models' tokenizer, written beside the weights when text-driven surfaces need one
(SGLang's /v1/completions answers its logprobs keyed by token text, /v1/chat/completions applies a
chat template; neither works with --skip-tokenizer-init). Character level: ids 0-2 special, then
printable ASCII (one character, one id), then filler tokens "<tN>", so every id decodes to its own
text and a prompt of `text_ids()` encodes back to the same ids. Written as tokenizer.json by hand
(the `tokenizers` format), so nothing is downloaded and `tokenizers` is not needed here.

It is a byte-level BPE without merges (space is the byte-level "Ġ", every other printable character
itself), because transformers 5 does not always load a tokenizer.json as written: for a model whose
config says `qwen2` (every embedded shape) AutoTokenizer builds `Qwen2Tokenizer`, which keeps the
vocabulary but imposes its own byte-level pre-tokenizer and decoder. A WordLevel vocabulary with a
plain " " then lost every space (transformers 5.12.1 on the H200 host, 2026-12-04); this one encodes
and decodes the same under both loaders."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pytest_miles.errors import InputError

SPECIAL = ("<unk>", "<s>", "</s>")
SPACE = "\u0120"  # "Ġ": the byte-level form of " " (GPT-2's bytes_to_unicode); 33..126 map to themselves
# The chat template: the messages' contents, concatenated (no role markers, no generation prompt),
# so a chat request's prompt ids are exactly the ids of its content.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def vocab(vocab_size: int) -> dict[str, int]:
    """token text -> id for a model of `vocab_size` ids."""
    if not isinstance(vocab_size, int) or vocab_size < len(SPECIAL) + 95:
        raise InputError(f"vocab_size: expected an integer >= {len(SPECIAL) + 95} (special tokens and printable "
                         f"ASCII), got {vocab_size!r}")
    out = {t: i for i, t in enumerate(SPECIAL)}
    for c in map(chr, range(32, 127)):
        out[SPACE if c == " " else c] = len(out)
    while len(out) < vocab_size:
        out[f"<t{len(out)}>"] = len(out)
    return out


def text_ids() -> range:
    """The ids that are one printable character each: a prompt of these round-trips through text."""
    return range(len(SPECIAL), len(SPECIAL) + 95)


def decode(ids: list[int]) -> str:
    """The text of ids from `text_ids()` (what a chat message carries); InputError for any other id."""
    ids_range = text_ids()
    bad = [t for t in ids if t not in ids_range]
    if bad:
        raise InputError(f"token id {bad[0]!r} is not one printable character (accepted: {ids_range.start} to "
                         f"{ids_range.stop - 1}): a chat prompt must round-trip through its text")
    return "".join(chr(32 + t - ids_range.start) for t in ids)


def encode(text: str) -> list[int]:
    """The ids of `text` (printable ASCII only, one id per character); InputError for anything else."""
    bad = [c for c in text if not 32 <= ord(c) < 127]
    if bad:
        raise InputError(f"text: {bad[0]!r} is not printable ASCII (the embedded tokenizer has one id per "
                         "printable character)")
    return [len(SPECIAL) + ord(c) - 32 for c in text]


def write_tokenizer(path: str | Path, vocab_size: int) -> None:
    """tokenizer.json (byte-level BPE without merges: one character per token) and tokenizer_config.json
    with the chat template, for text-driven tools (`sglang.test.test_deterministic`, the OpenAI surfaces)."""
    path = Path(path)
    v = vocab(vocab_size)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    special = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, t in enumerate(SPECIAL)]
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": special, "normalizer": None,
           "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
           "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     "vocab": v, "merges": []}}
    (path / "tokenizer.json").write_text(json.dumps(tok))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 512, "add_bos_token": False, "chat_template": CHAT_TEMPLATE}))


def has_tokenizer(model_dir: str | Path) -> bool:
    return any((Path(model_dir) / n).exists() for n in TOKENIZER_FILES)


def is_embedded_tokenizer(model_dir: str | Path) -> bool | None:
    """Whether `model_dir` holds this tokenizer (its chat template and vocabulary); None when the
    folder cannot be read here (a remote path, a hub name)."""
    path = Path(str(model_dir))
    try:
        cfg = json.loads((path / "tokenizer_config.json").read_text())
        tok = json.loads((path / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return None if not path.is_dir() else False
    vocab_size = len(tok.get("model", {}).get("vocab") or {})
    return cfg.get("chat_template") == CHAT_TEMPLATE and vocab_size >= 98 and tok["model"]["vocab"] == vocab(vocab_size)


def with_tokenizer(model_dir: str | Path, dest: str | Path) -> Path:
    """`dest`: the model of `model_dir` (its files linked, not copied) with the embedded tokenizer
    and its chat template, for engines whose OpenAI surfaces need one. The model dir is untouched; a
    model folder that has a tokenizer of its own is returned as it is (its tokenizer is the model's)."""
    src, dest = Path(model_dir), Path(dest)
    if has_tokenizer(src):
        return src
    cfg = src / "config.json"
    if not cfg.exists():
        raise InputError(f"model_dir: {src} has no config.json (expected an HF model folder)")
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in TOKENIZER_FILES and not (dest / f.name).exists():
            os.symlink(f.resolve(), dest / f.name)
    write_tokenizer(dest, int(json.loads(cfg.read_text())["vocab_size"]))
    return dest
