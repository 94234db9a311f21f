"""The tiny character tokenizer survives a save and an `AutoTokenizer` reload unchanged —
the reload resolves to `Qwen2Tokenizer`, which once dropped every space and newline."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from services.bootstrap.tiny_models import build_tokenizer, save_tiny_model

TEXT = "A: ~B=B\nB: ~A>A\n<think>KNK:10+0.-01-</think><answer>(1) A is a knave</answer>"


def test_reloaded_tokenizer_encodes_and_decodes_like_the_built_one(tmp_path: Path) -> None:
    built = build_tokenizer()
    reloaded = AutoTokenizer.from_pretrained(save_tiny_model(tmp_path / "m", "student"))
    ids = built.encode(TEXT, add_special_tokens=False)
    assert len(ids) == len(TEXT)  # one token per character, whitespace included
    assert reloaded.encode(TEXT, add_special_tokens=False) == ids
    assert reloaded.decode(ids) == TEXT == built.decode(ids)
    assert reloaded.eos_token_id == built.eos_token_id
