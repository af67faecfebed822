"""Build small Qwen2 / Qwen3 / Llama-architecture models locally: config, tokenizer and safetensors
weights written by our code, so tests and the embedded default never touch a hub.

The tokenizer is character-level (digits, letters, punctuation), which is all the
built-in arithmetic task needs and keeps the vocabulary tiny.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]
CHARS = string.digits + string.ascii_letters + " +-*/=()?.,:;!'\"\n#<>_%$&[]{}|@^~`\\"


def write_char_tokenizer(path: Path) -> int:
    """Write tokenizer.json + tokenizer_config.json; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(CHARS))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.decoder = decoders.Fuse()
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": SPECIAL_TOKENS[0],
        "pad_token": SPECIAL_TOKENS[1],
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }, indent=1))
    return len(vocab)


def tiny_config(vocab_size: int, family: str = "qwen2", **overrides):
    """A small config of `family`: qwen2 (QKV bias, tied), qwen3 (QK-norm, untied)
    or llama (no biases, untied)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    cfg = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=family == "qwen2",
        bos_token_id=0, eos_token_id=0, pad_token_id=1, torch_dtype="float32",
    )
    cfg.update(overrides)
    return {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig}[family](**cfg)


def build_tiny_model(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                     family: str = "qwen2", **config_overrides) -> Path:
    """Write a randomly initialised tiny model + tokenizer to `path` (an HF dir)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    vocab_size = write_char_tokenizer(path)
    config = tiny_config(vocab_size, family, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path, safe_serialization=True)
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}))
    return path
