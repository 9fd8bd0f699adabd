"""Local tokenizers and the ChatML template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from enginesim.core.tokenizer import (
    ChatCodec,
    HashTokenizer,
    HFTokenizer,
    chat_prompt,
    load_tokenizer,
)


def test_hash_tokenizer_is_deterministic_and_wordlike() -> None:
    tok = HashTokenizer(1000)
    ids = tok.encode("Hello, world! Hello")
    assert len(ids) == 5  # "Hello" "," " world" "!" " Hello"
    assert ids == HashTokenizer(1000).encode("Hello, world! Hello")
    assert ids[0] != ids[4]  # leading space is part of the piece, as in GPT-2 BPE
    assert all(3 <= i < 1000 for i in ids)
    assert tok.encode("<|im_start|>user<|im_end|>") == [1, tok.token_to_id("user"), 2]
    assert tok.eos_token_id == 2


def test_hash_tokenizer_decodes_ids_to_distinct_pseudo_words() -> None:
    tok = HashTokenizer(49152)
    assert tok.decode([3, 4, 3 + 85, 2]) == " ba be beba"
    assert tok.decode([2, 3], skip_special_tokens=False) == "<|im_end|> ba"
    words = {tok.decode([i]) for i in range(3, 49152)}
    assert len(words) == 49152 - 3


def test_chat_prompt_is_chatml() -> None:
    msgs: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url"}]},
    ]
    assert chat_prompt(msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert chat_prompt([{"role": "user", "content": "x"}], default_system="S") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat_prompt([{"role": "user", "content": None}], add_generation_prompt=False) == (
        "<|im_start|>user\n<|im_end|>\n"
    )


def test_local_tokenizer_json_is_loaded(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["<|endoftext|>", "<|im_end|>"])
    hf.train_from_iterator(["the cat sat on the mat"] * 20, trainer=trainer)
    hf.save(str(tmp_path / "tokenizer.json"))

    tok = load_tokenizer(tmp_path)  # a directory holding tokenizer.json
    assert isinstance(tok, HFTokenizer)
    ids = tok.encode("the cat")
    assert tok.decode(ids) == "the cat" and tok.token_strs(ids) == ["the", "cat"]
    assert tok.eos_token_id == 1 and tok.vocab_size == hf.get_vocab_size()
    assert isinstance(load_tokenizer(None, vocab_size=100), HashTokenizer)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


def test_chat_codec_matches_the_server_seam() -> None:
    codec = ChatCodec(HashTokenizer(49152), default_system="S")
    assert codec.eos_token_ids == (2,)
    prompt = codec.chat_prompt([("user", "hi")], add_generation_prompt=True)
    assert prompt == chat_prompt([{"role": "user", "content": "hi"}], default_system="S")
    ids = codec.encode(prompt)
    assert ids[:2] == [1, codec.encode("system")[0]] and 2 in ids
    assert codec.token_strs([1, 3]) == ["<|im_start|>", " ba"]
    assert codec.decode([1, 3, 2]) == " ba"
