"""Tiny Qwen-architecture models and a character tokenizer, built locally (no downloads).

The tests, the benchmarks and the embedded demo all build their models here. Shapes are
chosen for vLLM's CPU build, whose attention kernels need head_dim >= 32.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PAD = "<pad>"
EOS = "<|endoftext|>"
SPECIAL_TOKENS = [PAD, EOS]
CHARACTERS = "\n" + "".join(c for c in string.printable if c.isprintable())
VOCAB_SIZE = 128  # embedding rows; the tokenizer uses the first len(SPECIAL+CHARACTERS)


class TinyModelConfig(BaseModel):
    hidden_size: int = Field(default=128, description="Model width.")
    num_layers: int = Field(default=2)
    num_heads: int = Field(default=2, description="hidden_size / num_heads must be >= 32.")
    intermediate_size: int = Field(default=256)
    max_position_embeddings: int = Field(default=1024)
    tie_word_embeddings: bool = Field(default=False)
    seed: int = Field(default=0)


SIZES: dict[str, TinyModelConfig] = {
    "student": TinyModelConfig(),
    "teacher": TinyModelConfig(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=768),
    # `rlad bootstrap`'s teacher: twice the student's depth and heads (head_dim 32), small
    # enough to learn K&K by SFT in minutes on a CPU.
    "bootstrap-teacher": TinyModelConfig(num_layers=4, num_heads=4, intermediate_size=512),
}


def _byte_level(char: str) -> str:
    """GPT-2's byte-to-unicode alphabet for ASCII: 33..126 stand for themselves, lower
    bytes are shifted past 255 (space is `Ġ`, newline `Ċ`)."""
    code = ord(char)
    return char if 33 <= code <= 126 else chr(256 + code)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character: every string of printable ASCII round-trips exactly.

    The vocabulary is written in the byte-level alphabet with a byte-level pre-tokenizer
    and decoder, because `AutoTokenizer` reloads a Qwen2 model's tokenizer as
    `Qwen2Tokenizer`, which imposes exactly that pipeline: a plain character vocabulary
    would silently lose every space and newline on reload.
    """
    tokens = SPECIAL_TOKENS + [_byte_level(c) for c in CHARACTERS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS)
    tokenizer.model_max_length = SIZES["student"].max_position_embeddings
    return tokenizer


def build_model(config: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    torch.manual_seed(config.seed)
    hf_config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    model = Qwen2ForCausalLM(hf_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def save_tiny_model(
    out_dir: Path,
    size: Literal["student", "teacher"] | TinyModelConfig = "student",
    seed: int | None = None,
) -> Path:
    """Build and `save_pretrained` a tiny model with its tokenizer; returns `out_dir`."""
    config = SIZES[size] if isinstance(size, str) else size
    if seed is not None:
        config = config.model_copy(update={"seed": seed})
    tokenizer = build_tokenizer()
    model = build_model(config, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
