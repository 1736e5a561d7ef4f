"""Model shapes: the paper's Qwen2-style students and reference, and CPU-sized ones of several families.

A preset is `<family>-<size>`; families are qwen2 and llama (RMSNorm, SwiGLU, RoPE), gptneox (LayerNorm,
GeLU, partial rotary, untied head) and mamba (selective state spaces, no attention; transformers' own
PyTorch implementation runs on CPU without the CUDA kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import transformers


@dataclass(frozen=True)
class Shape:
    d_model: int
    d_ffn: int
    layers: int
    heads: int
    lr: float


# The paper's shapes (Qwen2: RMSNorm, SwiGLU, RoPE theta 1e6, QKV bias, no GQA, tied embeddings).
SIZES = {
    "104m": Shape(512, 1408, 8, 8, 6e-4),  # the reference model
    "200m": Shape(768, 2112, 12, 12, 6e-4),
    "500m": Shape(1024, 2816, 24, 16, 3e-4),
    "1.2b": Shape(1536, 4224, 24, 16, 2.5e-4),
    # CPU-sized
    "tiny": Shape(64, 176, 2, 4, 1e-3),
    "mini": Shape(128, 352, 4, 4, 1e-3),
    "small": Shape(256, 704, 4, 4, 1e-3),
}
FAMILIES = ("qwen2", "llama", "gptneox", "mamba")
PRESETS = {f"{family}-{size}": SIZES[size] for family in FAMILIES for size in SIZES}


def build_config(preset: str, vocab_size: int, context: int, eos_id: int | None, pad_id: int | None):
    """A transformers config for `preset` with the corpus tokenizer's vocabulary."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}, or pass a "
                         f"transformers config.json")
    family = preset.split("-", 1)[0]
    s = PRESETS[preset]
    common = {"vocab_size": vocab_size, "eos_token_id": eos_id, "pad_token_id": pad_id, "bos_token_id": None,
              "use_cache": False}
    if family == "mamba":
        return transformers.MambaConfig(hidden_size=s.d_model, num_hidden_layers=2 * s.layers, state_size=16,
                                        tie_word_embeddings=True, **common)
    if family == "gptneox":
        return transformers.GPTNeoXConfig(hidden_size=s.d_model, intermediate_size=4 * s.d_model,
                                          num_hidden_layers=s.layers, num_attention_heads=s.heads,
                                          max_position_embeddings=context, rotary_pct=0.25,
                                          tie_word_embeddings=False, **common)
    config_class = transformers.Qwen2Config if family == "qwen2" else transformers.LlamaConfig
    return config_class(hidden_size=s.d_model, intermediate_size=s.d_ffn, num_hidden_layers=s.layers,
                        num_attention_heads=s.heads, num_key_value_heads=s.heads, max_position_embeddings=context,
                        rope_theta=1e6 if family == "qwen2" else 5e5, tie_word_embeddings=True, **common)
