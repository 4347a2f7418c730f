"""The embedded tokenizer: one id per printable character, filler tokens, a chat template that
keeps the prompt's ids; written beside a model folder without touching it."""

from __future__ import annotations

import json

import pytest

from pytest_miles.errors import InputError
from pytest_miles.models.tokenizer_vocab import (
    CHAT_TEMPLATE,
    decode,
    encode,
    has_tokenizer,
    text_ids,
    vocab,
    with_tokenizer,
    write_tokenizer,
)


def test_text_ids_round_trip_and_bad_ones_are_named():
    ids = list(text_ids())
    assert encode(decode(ids)) == ids and len(vocab(512)) == 512
    with pytest.raises(InputError, match="token id 200 is not one printable character"):
        decode([5, 200])
    with pytest.raises(InputError, match="not printable ASCII"):
        encode("a\n")
    with pytest.raises(InputError, match="vocab_size: expected an integer >= 98"):
        vocab(50)


def test_the_written_tokenizer_has_the_vocab_and_the_chat_template(tmp_path):
    write_tokenizer(tmp_path, 300)
    tok = json.loads((tmp_path / "tokenizer.json").read_text())
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tok["model"]["vocab"] == vocab(300) and cfg["chat_template"] == CHAT_TEMPLATE
    assert tok["model"]["vocab"]["<t299>"] == 299 and tok["model"]["vocab"]["A"] == encode("A")[0]


def test_with_tokenizer_links_the_model_and_leaves_it_untouched(tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"vocab_size": 256}))
    (src / "model.safetensors").write_bytes(b"x")
    dest = with_tokenizer(src, tmp_path / "t")
    assert has_tokenizer(dest) and not has_tokenizer(src)
    assert (dest / "model.safetensors").is_symlink() and (dest / "config.json").read_text() == '{"vocab_size": 256}'
    with pytest.raises(InputError, match="has no config.json"):
        with_tokenizer(tmp_path / "nothing", tmp_path / "t2")


def test_the_embedded_tokenizer_is_told_from_another_and_a_models_own_is_kept(tmp_path):
    from pytest_miles.models.tokenizer_vocab import is_embedded_tokenizer

    write_tokenizer(tmp_path, 256)
    assert is_embedded_tokenizer(tmp_path) is True and is_embedded_tokenizer(tmp_path / "absent") is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ other }}"}))
    assert is_embedded_tokenizer(tmp_path) is False
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 256}))
    assert with_tokenizer(tmp_path, tmp_path / "t") == tmp_path  # the model's own tokenizer stays


@pytest.mark.parametrize("model_type", [None, "qwen2"])
def test_transformers_reads_the_tokenizer_back_as_written(tmp_path, model_type):
    """transformers 5 builds Qwen2Tokenizer for a qwen2 config (its own byte-level pre-tokenizer and
    decoder around our vocabulary): the text ids must round-trip under that loader too. A WordLevel
    vocabulary with a plain " " lost every space there (transformers 5.12.1, H200 host, 2026-12-04)."""
    transformers = pytest.importorskip("transformers")
    if model_type:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": 300}))
    write_tokenizer(tmp_path, 300)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ids = list(text_ids())
    text = tok.decode(ids)
    assert text == decode(ids) and tok.encode(text, add_special_tokens=False) == ids and tok.encode(text) == ids
    chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    assert tok.encode(chat, add_special_tokens=False) == ids


def test_token_text_of_the_space_is_read_in_both_forms():
    from pytest_miles.engines.openai_surfaces import token_id, token_text
    from pytest_miles.models.tokenizer_vocab import SPACE

    assert token_text(encode(" ")[0]) == " " and token_id(" ") == token_id(SPACE) == encode(" ")[0]
