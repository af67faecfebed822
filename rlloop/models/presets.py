"""Architecture presets for benchmarks and configs: HF configs of real model families,
written locally (with our tokenizer) so an engine can start with load_format="dummy"
and a sender can make weights of the right shapes; no hub access."""
from __future__ import annotations

import json
from pathlib import Path

from rlloop.models.tiny import build_tiny_model, write_char_tokenizer

QWEN2 = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu",
             rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
             bos_token_id=0, eos_token_id=0, attention_dropout=0.0, use_sliding_window=False)

PRESETS = {
    "qwen2.5-0.5b": dict(QWEN2, vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(QWEN2, vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(QWEN2, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       tie_word_embeddings=False),
}


def model_dir(name: str, path: str | Path, dtype: str = "bfloat16", weights: bool = False) -> Path:
    """`tiny` builds a real tiny model with weights; a preset writes config + tokenizer
    (start engines with load_format="dummy") and, with `weights`, random weights too
    (for a learner, which loads a real checkpoint)."""
    path = Path(path)
    if name == "tiny":
        return build_tiny_model(path)
    cfg = dict(PRESETS[name], torch_dtype=dtype)
    write_char_tokenizer(path)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    if weights:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=getattr(torch, dtype))
        model.save_pretrained(path, safe_serialization=True)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # this process only wrote the weights: leave the GPU to the actors
    return path
