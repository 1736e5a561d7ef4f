"""Load HF causal LMs (teacher, reference, students) from a directory, a hub id, a GGUF file or an alias.

Weights load only from safetensors or GGUF (`use_safetensors=True` refuses pickled `.bin` checkpoints),
and `trust_remote_code` stays off unless the caller asks for it.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import gguf
import torch
import transformers.modeling_gguf_pytorch_utils as gguf_utils
from transformers import AutoModelForCausalLM
from transformers.utils import logging as transformers_logging

from miniplm.core.tokenizer import require_module, resolve_source

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def quiet_transformers() -> None:
    """miniplm draws its own progress bars; transformers' per-load and per-save bars only add noise."""
    transformers_logging.disable_progress_bar()


@contextlib.contextmanager
def _quiet_gguf_conversion(active: bool):
    """transformers' GGUF loader draws its own tqdm bar per load, outside its progress-bar switch; in logs
    and in `miniplm run` output that is hundreds of lines per teacher load."""
    if not active:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def load_causal_lm(spec: str, trust_remote_code: bool = False, device: str | torch.device = "cpu"):
    """An fp32 `AutoModelForCausalLM` in eval mode (autocast, not the weights, sets compute precision)."""
    quiet_transformers()
    source, gguf_file = resolve_source(spec)
    kwargs = {"dtype": torch.float32, "trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        require_module("gguf", "reading a GGUF file")
        require_module("accelerate", "loading a GGUF model")
        kwargs["gguf_file"] = gguf_file
    else:
        kwargs["use_safetensors"] = True
    try:
        with _quiet_gguf_conversion(gguf_file is not None):
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ValueError as exc:
        if "GGUF model with architecture" in str(exc):
            raise ValueError(
                f"cannot load {spec}: {exc} transformers reads GGUF files of these architectures: "
                f"{', '.join(sorted(gguf_utils.GGUF_SUPPORTED_ARCHITECTURES))}; convert the model to "
                f"safetensors instead"
            ) from None
        raise
    except OSError as exc:
        raise OSError(f"could not load model '{spec}': {exc}") from None
    return model.to(device).eval()


def weights_description(spec: str) -> str:
    """How a model's weights are stored: a GGUF file's quantization (the default teacher is 4-bit), else
    'full precision' (safetensors, loaded as fp32)."""
    source, gguf_file = resolve_source(spec)
    if gguf_file is None:
        return "full-precision weights"
    field = gguf.GGUFReader(str(Path(source) / gguf_file)).fields.get("general.file_type")
    if field is None:
        return "GGUF weights (quantization not recorded), dequantized to fp32 when loaded"
    kind = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")
    bits = re.match(r"[A-Z]+(\d+)", kind)
    width = f"{bits.group(1)}-bit " if bits else ""
    return f"{width}{kind} GGUF weights, dequantized to fp32 when loaded"


def context_length(model) -> int | None:
    """The longest sequence the model's position embeddings cover (None when unbounded, e.g. Mamba)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules of the classes transformers names in `_no_split_modules` (the
    unit it never splits across devices), outermost only (Mamba names its mixer inside its block too)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers, prefixes = [], []
    for name, module in model.named_modules():
        if type(module).__name__ in names and not any(name.startswith(p) for p in prefixes):
            layers.append(module)
            prefixes.append(name + ".")
    return layers


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None: plain fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_bf16():
        return torch.bfloat16
    return None


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """auto: this rank's GPU when there is one, else the CPU; otherwise the device named."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)
