"""Model shapes: the paper's Qwen2-style students and reference, and CPU-sized ones for tests and demos."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    d_model: int
    d_ffn: int
    layers: int
    heads: int
    lr: float


# The paper's shapes (Qwen2: RMSNorm, SwiGLU, RoPE theta 1e6, QKV bias, no GQA, tied embeddings).
PRESETS = {
    "qwen2-104m": Shape(512, 1408, 8, 8, 6e-4),  # the reference model
    "qwen2-200m": Shape(768, 2112, 12, 12, 6e-4),
    "qwen2-500m": Shape(1024, 2816, 24, 16, 3e-4),
    "qwen2-1.2b": Shape(1536, 4224, 24, 16, 2.5e-4),
    # CPU-sized, same family
    "qwen2-tiny": Shape(64, 176, 2, 4, 1e-3),
    "qwen2-mini": Shape(128, 352, 4, 4, 1e-3),
    "qwen2-small": Shape(256, 704, 4, 4, 1e-3),
}


def build_config(preset: str, vocab_size: int, context: int, eos_id: int | None, pad_id: int | None):
    """A transformers config for a preset (Qwen2 architecture) with the corpus tokenizer's vocabulary."""
    from transformers import Qwen2Config

    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}, or pass a "
                         f"transformers config.json as model_config")
    s = PRESETS[preset]
    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=s.d_model, intermediate_size=s.d_ffn, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.heads, max_position_embeddings=context,
        rope_theta=1e6, tie_word_embeddings=True, eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None,
        use_cache=False,
    )
