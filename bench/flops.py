"""Model FLOPs per token and MFU, shared by the benchmarks (PaLM's convention: matmuls only)."""

from __future__ import annotations

import torch

# dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def linear_shapes(model) -> dict[tuple[int, int], int]:
    """(in, out) -> how many nn.Linear layers of that shape (the output layer included, tied or not)."""
    shapes: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            shape = (module.in_features, module.out_features)
            shapes[shape] = shapes.get(shape, 0) + 1
    return shapes


def forward_flops_per_token(model, mean_context: float) -> float:
    """2 FLOPs per weight of every linear layer, plus causal attention's scores and values (4 * layers *
    attention width * context, halved by the causal mask)."""
    flops = sum(2 * i * o * n for (i, o), n in linear_shapes(model).items())
    config = model.config
    layers = getattr(config, "num_hidden_layers", 0)
    head_dim = getattr(config, "head_dim", None)
    width = config.num_attention_heads * head_dim if head_dim else getattr(config, "hidden_size", 0)
    return flops + 4 * layers * width * mean_context / 2


def mfu_line(achieved_flops_per_second: float) -> str | None:
    """'MFU ...' against the lent GPU's bf16 peak, or None off a known GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16.items():
        if key in name:
            return (f"MFU on {name} (bf16 dense peak {peak / 1e12:.0f} TFLOP/s): "
                    f"{achieved_flops_per_second / 1e12:.1f} TFLOP/s = {achieved_flops_per_second / peak:.1%}")
    return f"MFU: no bf16 peak on record for {name}; achieved {achieved_flops_per_second / 1e12:.1f} TFLOP/s"
