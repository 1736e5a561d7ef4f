"""Per-instance log-probabilities of a causal LM, computed exactly and without a full-vocabulary blow-up.

For an instance x of n tokens the inputs are x[:-1] and the targets x[1:]. Position t is scored unless
its *input* token x[t] is EOS or pad: the first token of a document cannot be predicted from the previous
document, and the paper's loss mask (pad inputs masked, pad = EOS for its models) drops exactly these
positions. The scorer returns, per instance, logp_sum = sum of log p(x[t+1] | x[:t+1]) over scored
positions, and n_scored.

Speed without approximation: the backbone runs once on a right-padded batch; only the scored positions'
hidden states go through the output layer, a chunk of positions at a time, so the [tokens, vocab] logits
exist for one chunk only. log-softmax is taken in fp32 and the per-instance sum in fp64, whatever the
autocast dtype of the matmuls. The output layer's low-precision weight is cast once, not per chunk
(autocast keeps no cast cache under inference_mode).

Every batch is padded to `plan.padded_width` of its longest instance, so an instance scored in batches of
one padded width (what `plan_batches` makes) gets the same shapes, and on a CPU the same bits, whatever
the batch size or the other rows.

`score_with_features` also returns what a cheap predictor of another model's scores can learn from (the
proxy stage): per instance, the mean over scored positions of the final hidden state (after the final
norm, the output layer's input) and quantiles of the per-position log-probs.

`compile=True` fuses what lies between the matmuls with torch.compile: the output layer's log-softmax (the
eager version reads and writes the [chunk, vocab] logits about seven times) and each decoder layer's norms,
rotary embedding and activations (one compilation, dynamic in the batch shape, serves every layer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch

from miniplm.core.models import context_length, decoder_layers
from miniplm.scoring.plan import padded_width

_OOM = (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else (torch.cuda.OutOfMemoryError,)


def default_head_chunk(device: torch.device) -> int:
    """Positions per output-layer chunk: small on a CPU, where a chunk's logits stay in cache."""
    return 4096 if device.type == "cuda" else 256


WIDTH_PROBE = 32  # positions of the batch that compiles the model
# families whose layers torch.compile rebuilds for every new sequence width (Mamba's scan branches on it):
# 114x slower than eager on 27 instances, and the output layer alone did not pay its compile time either
# (bench/compile.py): they are scored eagerly
RECOMPILING_FAMILIES = {"mamba", "mamba2", "falcon_mamba"}
GRAPH_STORM = 6  # graphs built after the probe batch beyond which compiling is given up for eager


LOGP_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, _OOM) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


class LogProbScorer:
    def __init__(
        self,
        model,
        masked_input_ids: set[int],
        autocast_dtype: torch.dtype | None = None,
        head_chunk_tokens: int | None = None,
        log: Callable[[str], None] = print,
        compile: bool = False,
    ):
        self.model = model
        self.device = next(model.parameters()).device
        self.masked_input_ids = torch.tensor(sorted(masked_input_ids), dtype=torch.long, device=self.device)
        self.pad_id = int(min(masked_input_ids)) if masked_input_ids else 0
        self.autocast_dtype = autocast_dtype
        self.head_chunk_tokens = head_chunk_tokens or default_head_chunk(self.device)
        self.log = log
        self.max_width = context_length(model)
        self.backbone = model.base_model
        self.head = model.get_output_embeddings()
        self.chunked_head = self.head is not None and self._chunked_head_matches_model()
        if not self.chunked_head:
            log(f"{type(model).__name__}: its logits are not lm_head(hidden states); scoring from full logits")
        self.head_logp = _head_logp
        self.min_rows = 1
        self.compiled_layers: list[torch.nn.Module] | None = None  # while compiled: what to undo on a storm
        self.graphs_after_probe = 0
        if self.chunked_head:
            dtype = autocast_dtype or self.head.weight.dtype
            self.head_weight = self.head.weight.detach().to(dtype)
            bias = getattr(self.head, "bias", None)
            self.head_bias = bias.detach().to(dtype) if bias is not None else None
        if compile:
            self._compile()

    def _compile(self) -> None:
        """torch.compile the output layer's log-softmax and, in place (nn.Module.compile, the state dict
        unchanged), each decoder layer; both dynamic in the batch shape. Compiled on a probe batch, so that a
        failure (no C++ compiler on a CPU, no Triton on a GPU) shows here: then eager, with a message."""
        family = getattr(self.model.config, "model_type", "")
        if family in RECOMPILING_FAMILIES:
            self.log(f"{family}: scoring eagerly (torch.compile rebuilds its layers for every new sequence "
                     f"width, which costs more than it saves)")
            return
        layers = decoder_layers(self.model)
        for layer in layers:
            layer.compile(dynamic=True)
        if self.chunked_head:
            self.head_logp = torch.compile(_head_logp, dynamic=True)
        vocab = self.model.get_input_embeddings().weight.shape[0]
        self.min_rows = 2  # see _score
        try:
            self._score([np.arange(WIDTH_PROBE + 1) % vocab])
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run the same code eagerly
            self._eager(layers)
            self.log(f"compiling the model failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                     "scoring eagerly (scores within bf16 rounding of the compiled ones, slower)")
            return
        self.compiled_layers, self.graphs_after_probe = layers, _graphs_built()
        self.log(f"compiled {len(layers)} decoder layers" + (" and the output layer" if self.chunked_head else ""))

    def _eager(self, layers: list[torch.nn.Module]) -> None:
        for layer in layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set: back to the eager forward
        self.head_logp, self.min_rows, self.compiled_layers = _head_logp, 1, None

    def _watch_recompiles(self) -> None:
        """Give up compiling when torch.compile keeps building graphs for new shapes (a recompilation storm:
        each costs seconds, more than the compiled code saves)."""
        built = _graphs_built() - self.graphs_after_probe
        if built > GRAPH_STORM:
            self._eager(self.compiled_layers)
            self.log(f"torch.compile built {built} more graphs after the first batch (the model specialises on "
                     f"input shapes); scoring eagerly from here (scores within bf16 rounding)")

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.inference_mode()
    def _chunked_head_matches_model(self) -> bool:
        """Some families post-process logits (soft-capping, scaling); then use the model's own logits."""
        vocab = self.head.weight.shape[0]
        ids = torch.arange(16, device=self.device).remainder(vocab).view(1, -1)
        full = self.model(input_ids=ids, use_cache=False).logits.float()
        hidden = self.backbone(input_ids=ids, use_cache=False)[0]
        return torch.allclose(full, self.head(hidden).float(), atol=1e-4, rtol=1e-4)

    def score(self, instances: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(logp_sum float64 [B], n_scored int64 [B]); halves the batch and retries on out-of-memory."""
        return self._scored(instances, False)

    def score_with_features(self, instances: list[np.ndarray]) -> tuple[np.ndarray, ...]:
        """(logp_sum, n_scored, mean final hidden state float32 [B, d], log-prob quantiles float32 [B, 5] at
        LOGP_QUANTILES); NaN features for an instance without a scored position."""
        if not self.chunked_head:
            raise ValueError(f"{type(self.model).__name__}: features need a model whose logits are "
                             f"lm_head(final hidden state); score it without features")
        return self._scored(instances, True)

    def _scored(self, instances: list[np.ndarray], features: bool) -> tuple[np.ndarray, ...]:
        try:
            result = self._score(instances, features)
            if self.compiled_layers is not None:
                self._watch_recompiles()
            return result
        except (RuntimeError, *_OOM) as exc:
            if not is_oom(exc) or len(instances) == 1:
                raise
            half = len(instances) // 2
            self.log(f"out of memory on a batch of {len(instances)} instances: retrying as {half} + "
                     f"{len(instances) - half}")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            first, second = self._scored(instances[:half], features), self._scored(instances[half:], features)
            return tuple(np.concatenate([a, b]) for a, b in zip(first, second))

    @torch.inference_mode()
    def _score(self, instances: list[np.ndarray], features: bool = False) -> tuple[np.ndarray, ...]:
        rows = len(instances)
        width = int(padded_width(max(len(x) for x in instances)))
        if self.max_width:
            width = min(width, self.max_width)
        # Compiled code specializes on sizes of 1 (its own graph, its own kernels: other bits), so a compiled
        # model gets at least two rows (a padding row, nothing scored) and output-layer chunks of 2+ positions.
        tokens = torch.full((max(rows, self.min_rows), width + 1), self.pad_id, dtype=torch.long)
        real = torch.zeros((len(tokens), width), dtype=torch.bool)
        for i, x in enumerate(instances):
            tokens[i, : len(x)] = torch.from_numpy(x.astype(np.int64))
            real[i, : len(x) - 1] = True
        tokens, real = tokens.to(self.device), real.to(self.device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        scored = real & ~torch.isin(inputs, self.masked_input_ids)
        wanted = targets[scored]
        logp = torch.empty(len(wanted), dtype=torch.float32, device=self.device)
        with self._autocast():
            if self.chunked_head:
                states = self.backbone(input_ids=inputs, use_cache=False)[0][scored]
            else:
                states = self.model(input_ids=inputs, use_cache=False).logits[scored]
        starts = list(range(0, len(wanted), self.head_chunk_tokens))
        if len(starts) > 1 and len(wanted) - starts[-1] == 1:
            starts[-1] -= 1  # no chunk of one position
        for start, end in zip(starts, [*starts[1:], len(wanted)]):
            if self.chunked_head:
                logp[start:end] = self.head_logp(states[start:end].to(self.head_weight.dtype), self.head_weight,
                                                 self.head_bias, wanted[start:end])
            else:
                logp[start:end] = _logp_of(states[start:end].float(), wanted[start:end])
        per_position = torch.zeros(scored.shape, dtype=torch.float64, device=self.device)
        per_position[scored] = logp.double()
        sums, counts = per_position.sum(1)[:rows], scored.sum(1)[:rows]
        result = (sums.cpu().numpy(), counts.cpu().numpy().astype(np.int64))
        if features:
            result += _features(states, logp, scored, rows)
        return result


def _features(states: torch.Tensor, logp: torch.Tensor, scored: torch.Tensor, rows: int):
    """Per row: the mean final hidden state over its scored positions, and quantiles of their log-probs.
    Each row is reduced over its own padded width in position order, so other rows change nothing."""
    pooled = torch.zeros((*scored.shape, states.shape[-1]), dtype=torch.float32, device=states.device)
    pooled[scored] = states.float()
    counts = scored.sum(1, keepdim=True)
    hidden = pooled.sum(1) / counts.clamp(min=1)
    hidden[counts[:, 0] == 0] = float("nan")
    # one row at a time in float64: a vectorised quantile over the batch rounds by the batch's size
    values = np.split(logp.double().cpu().numpy(), np.cumsum(counts[:rows, 0].cpu().numpy())[:-1])
    quantiles = np.array([np.quantile(v, LOGP_QUANTILES) if len(v) else np.full(len(LOGP_QUANTILES), np.nan)
                          for v in values], dtype=np.float32).reshape(rows, len(LOGP_QUANTILES))
    return hidden[:rows].cpu().numpy(), quantiles


def _graphs_built() -> int:
    """Graphs torch.compile has built in this process."""
    from torch._dynamo.utils import counters  # torch's compiler internals: imported only when compiling

    return int(counters["stats"].get("unique_graphs", 0))


def _logp_of(logits: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """log-softmax of fp32 logits at the wanted tokens."""
    return logits.gather(1, wanted[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def _head_logp(states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               wanted: torch.Tensor) -> torch.Tensor:
    """The output layer in the weight's precision (what autocast would run), its log-softmax in fp32."""
    return _logp_of(torch.nn.functional.linear(states, weight, bias).float(), wanted)
