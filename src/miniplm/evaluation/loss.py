"""`miniplm eval loss`: held-out LM loss of a model, or of every checkpoint of a training run.

Two means, as the paper reports: per token (sum of losses / scored positions) and per instance (the mean of
each instance's per-token loss); and bits per byte, comparable across tokenizers (`core.metrics`), each
with a bootstrap interval. Positions are scored exactly as `miniplm score` scores them (input EOS/pad
masked), through the same LogProbScorer. A model whose tokenizer differs from the corpus's (a student of
another family) is evaluated on the held-out instances re-tokenized for it, one instance to one instance, as
`miniplm export --tokenizer` does; its nats/token are per *its* tokens, its bits per byte on the same text.

Compute per point: training FLOPs = 6 * N * D (N: the model's parameters, D: training tokens), plus
2 * N_teacher * D for online Vanilla KD (the teacher's forward), as the paper counts them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from miniplm.core.config import Compute, option, require_at_least_one
from miniplm.core.flops import training_flops
from miniplm.core.manifest import read_manifest, read_plan, write_json_atomic
from miniplm.core.metrics import half_width, loss_summary, scored_bytes
from miniplm.core.models import quiet_transformers, resolve_device, resolve_precision
from miniplm.core.progress import progress
from miniplm.core.tokens import (
    Retokenizer,
    masked_id_array,
    masked_input_ids,
    token_byte_lengths,
    vocab_fingerprint,
)
from miniplm.data import ngram
from miniplm.data.shards import PackedCorpus, PackedSplit
from miniplm.scoring.plan import plan_batches, plan_parts
from miniplm.scoring.scorer import LogProbScorer


@dataclass
class EvalLossConfig(Compute):
    model: str = option("out/train", "a model directory, or a `miniplm train` run directory (evaluates every "
                        "kept checkpoint and final/)")
    corpus: str = option("out/corpus", "a `miniplm prepare` output holding the held-out split")
    split: str = option("heldout_hq", "split to evaluate (heldout_hq stands in for the paper's DCLM set)")
    max_instances: int | None = option(None, "evaluate only the first N instances of the split (null: all)")
    batch_tokens: int = option(16384, "padded tokens per forward")
    output: str | None = option(None, "write the results as JSON here (null: <run>/eval_loss.json for a run, "
                                "else print only)")

    def validate(self) -> None:
        super().validate()
        require_at_least_one(self, "batch_tokens", "max_instances")


class HeldOut:
    """The instances of a held-out split as token arrays in one model's tokenizer (re-tokenized if needed)."""

    def __init__(self, corpus: PackedCorpus, split: str, max_instances: int | None = None,
                 indices: Sequence[int] | None = None):
        self.corpus = corpus
        self.split: PackedSplit = corpus.split(split)
        if indices is None:
            indices = range(len(self.split) if max_instances is None else min(max_instances, len(self.split)))
        if len(indices) == 0:
            raise ValueError(f"{corpus.path}/{split} has no instances to evaluate")
        self.instances = [self.split[int(i)] for i in indices]
        self._tokenizer = None
        self._cache: dict[str, tuple[list[np.ndarray], int, np.ndarray]] = {}

    def for_tokenizer(self, tokenizer) -> tuple[list[np.ndarray], int]:
        """(instances, EOS id) in `tokenizer`'s ids: the stored ones when the vocabularies agree."""
        return self._entry(tokenizer)[:2]

    def scored_bytes(self, tokenizer) -> np.ndarray:
        """Per instance, the bytes of text its scored positions cover in `tokenizer`'s ids (bits per byte)."""
        return self._entry(tokenizer)[2]

    def _entry(self, tokenizer) -> tuple[list[np.ndarray], int, np.ndarray]:
        if self._tokenizer is None:
            self._tokenizer = self.corpus.load_tokenizer()
        key = vocab_fingerprint(tokenizer)
        if key not in self._cache:
            if key == vocab_fingerprint(self._tokenizer):
                instances, eos = self.instances, self.corpus.eos_id
            else:
                max_len = self.corpus.manifest["max_len"]
                retokenize = Retokenizer(self._tokenizer, self.corpus.eos_id, tokenizer, max_len, "auto")
                instances, eos = [retokenize(x) for x in self.instances], int(tokenizer.eos_token_id)
            nbytes = scored_bytes(instances, masked_id_array(eos, tokenizer), token_byte_lengths(tokenizer, eos))
            self._cache[key] = (instances, eos, nbytes)
        return self._cache[key]


def heldout_loss(model, tokenizer, heldout: HeldOut, precision: str = "auto", batch_tokens: int = 16384,
                 show_progress: bool = False, per_instance: bool = False) -> dict:
    """Mean held-out loss of `model` (per token and per instance, nats; bits per byte), with intervals; and with
    `per_instance`, each instance's summed loss, positions and bytes (for paired comparisons of models)."""
    instances, eos = heldout.for_tokenizer(tokenizer)
    masked = masked_input_ids(eos, tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scorer = LogProbScorer(model, masked, resolve_precision(precision, device), log=lambda m: None)
    lengths = np.array([len(x) for x in instances])
    sums = np.zeros(len(instances))
    counts = np.zeros(len(instances), dtype=np.int64)
    with progress(show_progress, int(lengths.sum()), "eval loss", unit="tok") as advance:
        for part in plan_parts(lengths, 1 << 62):
            for batch in plan_batches(part, lengths, batch_tokens):
                sums[batch], counts[batch] = scorer.score([instances[i] for i in batch])
                advance(int(lengths[batch].sum()))
    model.train(was_training)
    nbytes = heldout.scored_bytes(tokenizer)
    summary = loss_summary(-sums, counts, nbytes)
    if per_instance:
        summary["per_instance"] = {"nats": (-sums).tolist(), "tokens": counts.tolist(), "bytes": nbytes.tolist()}
    return summary


def ngram_loss(model, heldout: HeldOut, tokenizer, eos_id: int) -> dict:
    """Held-out loss of an n-gram model (`miniplm.data.ngram.fit`, on instances in `tokenizer`'s ids): the
    level a model trained on those instances must beat."""
    instances, _ = heldout.for_tokenizer(tokenizer)
    return ngram.heldout_level(model, instances, masked_id_array(eos_id, tokenizer), heldout.scored_bytes(tokenizer))


def _checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every kept checkpoint of a training run, oldest first (final/ when none is kept:
    it is a copy of the last)."""
    points = [(int(p.name.split("-")[1]), p) for p in sorted((run / "checkpoints").glob("step-*[0-9]"))]
    manifest = read_manifest(run)
    if not points and (run / "final").is_dir() and manifest is not None:
        points = [(int(manifest["steps"]), run / "final")]
    return points


def evaluate_loss(config: EvalLossConfig, log=print) -> dict:
    quiet_transformers()
    if config.threads:
        torch.set_num_threads(config.threads)
    target = Path(config.model)
    if not target.is_dir():
        raise FileNotFoundError(f"model: {target} is not a directory (a model directory or a `miniplm train` run)")
    is_run = is_training_run(target)
    points = _checkpoints(target) if is_run else [(None, target)]
    if not points:
        raise ValueError(f"{target} holds no checkpoints yet; train it first")
    heldout = HeldOut(PackedCorpus(config.corpus), config.split, config.max_instances)
    curve = {}
    if is_run:
        curve = {row["step"]: row for row in map(json.loads, (target / "metrics.jsonl").read_text().splitlines())}
    device = resolve_device(config.device)
    teacher = _teacher_parameters(target) if is_run else 0
    rows = []
    for step, directory in points:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, use_safetensors=True).to(device)
        tokenizer = AutoTokenizer.from_pretrained(directory if (directory / "tokenizer_config.json").is_file()
                                                  else heldout.corpus.path / "tokenizer")
        row = {"checkpoint": str(directory), "step": step}
        row.update(heldout_loss(model, tokenizer, heldout, config.precision, config.batch_tokens, config.progress))
        if is_run:
            tokens = curve.get(step, {}).get("tokens")
            params = sum(p.numel() for p in model.parameters())
            row.update(tokens=tokens, parameters=params,
                       flops=float(training_flops(params, tokens, teacher)) if tokens is not None else None)
        log(f"eval loss: {directory}: {describe(row)} ({row['tokens']:,} positions, {row['bytes']:,} bytes of "
            f"{config.corpus}/{config.split})")
        rows.append(row)
    result = {"corpus": config.corpus, "split": config.split, "points": rows}
    output = config.output or (str(target / "eval_loss.json") if is_run else None)
    if output:
        write_json_atomic(Path(output), result)
    return result


def describe(summary: dict) -> str:
    """'4.1234 +- 0.0081 nats/token, 1.5012 bits/byte' for a loss summary."""
    return (f"{summary['loss_per_token']:.4f} +- {half_width(summary):.4f} nats/token, "
            f"{summary['bits_per_byte']:.4f} bits/byte")


def is_training_run(path: Path) -> bool:
    """A `miniplm train` output (finished, or with the plan of one under way), not a bare model directory."""
    manifest = read_manifest(path)
    if manifest is not None:
        return manifest.get("stage") == "train"
    return read_plan(path) is not None and (path / "checkpoints").is_dir()


def _teacher_parameters(run: Path) -> int:
    """The online teacher's parameter count of a Vanilla KD run (0 otherwise), from its manifest."""
    return int(((read_manifest(run) or {}).get("teacher") or {}).get("parameters", 0))

