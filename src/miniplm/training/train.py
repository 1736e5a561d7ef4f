"""`miniplm train`: pre-train a causal LM on packed instances, resumable onto the identical loss curve.

The loop is nanoGPT-sized on purpose: instances are read in stored order (no shuffling, as the paper),
right-padded into batches of `batch_size` sequences, and trained with the paper's recipe: AdamW betas
(0.9, 0.98), eps 1e-6, weight decay 0.01, grad clip 1.0, linear warmup then cosine decay to 0.1x lr. The
loss mask is the scoring one: a position is trained unless its input token is EOS or pad.

Checkpoints (`<output>/checkpoints/step-NNNNNNN/`) hold the model in HF format (safetensors, loadable by
`AutoModelForCausalLM.from_pretrained`), and `trainer.pt` with the optimizer, scheduler, RNG state and
data position (tensors and numbers only: loaded with `weights_only=True`). A checkpoint is written under a
temporary name and renamed when complete; `metrics.jsonl` is cut back to the checkpoint on resume, so a
killed run restarted with the same command continues on exactly the curve it would have followed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoConfig, AutoModelForCausalLM

from miniplm.core import distributed, stop
from miniplm.core.config import Compute, ConfigError, option, require_at_least_one
from miniplm.core.flops import training_flops
from miniplm.core.models import (
    load_causal_lm,
    quiet_transformers,
    resolve_device,
    resolve_precision,
    weights_description,
)
from miniplm.core.progress import progress
from miniplm.core.stage import Stage, StageResult, execute
from miniplm.core.tokenizer import load_tokenizer, source_fingerprint
from miniplm.core.tokens import masked_input_ids, vocab_fingerprint
from miniplm.data.shards import PackedCorpus, PackedSplit
from miniplm.evaluation.loss import HeldOut, heldout_loss
from miniplm.training.presets import FAMILIES, PRESETS, SIZES, build_config


@dataclass
class TrainConfig(Compute):
    corpus: str = option("out/corpus", "a `miniplm prepare` (or `miniplm export --format tokens`) output")
    split: str = option("train", "split to train on (ref: D_ref, for the reference model)")
    output: str = option("out/train", "run directory: checkpoints, metrics.jsonl, final/", hashed=False)
    model: str = option("qwen2-mini", f"a preset <family>-<size> (families {', '.join(FAMILIES)}; sizes "
                        f"{', '.join(SIZES)}) or a transformers config.json path")
    lr: float | None = option(None, "peak learning rate (null: the preset's)")
    batch_size: int = option(8, "sequences per optimizer step")
    max_steps: int | None = option(None, "optimizer steps (null: from max_tokens or epochs)")
    max_tokens: int | None = option(None, "stop after this many training tokens (null: epochs)")
    epochs: float = option(1.0, "passes over the split when neither max_steps nor max_tokens is set")
    warmup_steps: int = option(100, "linear warmup steps (the paper: 2,000 of 100K); a FLOP-matched KD run scales "
                               "them by its step cut, so its schedule has the shape of the run it is matched to")
    warmup_fraction: float | None = option(None, "warmup as a fraction of the run's steps (overrides warmup_steps)")
    min_lr_ratio: float = option(0.1, "cosine decays to this fraction of lr")
    weight_decay: float = option(0.01, "AdamW weight decay")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.98, "AdamW beta2")
    eps: float = option(1e-6, "AdamW epsilon")
    grad_clip: float = option(1.0, "gradient norm clip")
    seed: int = option(10, "seed of the initial weights (the paper's) and of the shuffled order")
    order: Literal["stored", "shuffled"] = option(
        "stored", "instance order: stored (the paper's) or shuffled with `seed`, anew each epoch")
    validation_fraction: float = option(0.0, "hold out every (1/f)-th instance of the split as a validation "
                                        "slice, never trained on (0: none; the reference uses one)")
    validate_every: int = option(0, "validation loss every N steps into validation.jsonl (0: ten times a run)")
    patience: int = option(0, "stop after N validations without a new best (0: train every step); with a "
                           "validation slice, final/ is the best validated model")
    save_every: int = option(100, "checkpoint every N steps (and at the end)", hashed=False)
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep", hashed=False)
    log_every: int = option(10, "log every N steps", hashed=False)
    kd: Literal["none", "vanilla"] = option("none", "vanilla: online token-level KD from the teacher (a baseline)")
    teacher: str = option("smollm2", "the KD teacher: local directory, hub id, .gguf file, or 'smollm2'")
    kd_lambda: float = option(0.5, "KD loss = (1 - lambda) * CE + lambda * CE(teacher probs, student log-probs)")
    kd_temperature: float = option(1.0, "softmax temperature of both distributions in the KD term")
    match_flops: bool = option(False, "KD: cut the steps to T * 3Ns / (3Ns + Nt), the paper's equal-FLOPs rule")
    eval_every: int = option(0, "held-out loss every N steps and at the end, into eval.jsonl with tokens and "
                             "FLOPs: the points of a scaling curve (0: never)")
    eval_corpus: str | None = option(None, "corpus holding eval_split (null: the training corpus; a corpus in "
                                     "another tokenizer is re-tokenized for the model)")
    eval_split: str = option("heldout_hq", "the corpus split evaluated by eval_every")
    eval_max_instances: int | None = option(256, "evaluate the first N instances of eval_split (null: all)")

    def validate(self) -> None:
        super().validate()
        require_at_least_one(self, "batch_size", "save_every", "log_every", "keep_checkpoints", "max_steps",
                             "max_tokens", "eval_max_instances")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every: must be 0 (never) or positive, got {self.eval_every}")
        if self.epochs <= 0:
            raise ConfigError(f"epochs: must be positive, got {self.epochs}")
        if not 0 <= self.kd_lambda <= 1:
            raise ConfigError(f"kd_lambda: must be in [0, 1], got {self.kd_lambda}")
        if self.kd_temperature <= 0:
            raise ConfigError(f"kd_temperature: must be positive, got {self.kd_temperature}")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"warmup_fraction: must be in [0, 1), got {self.warmup_fraction}")
        if not 0 <= self.validation_fraction <= 0.5:
            raise ConfigError(f"validation_fraction: must be in [0, 0.5], got {self.validation_fraction}")
        if self.validate_every < 0 or self.patience < 0:
            raise ConfigError("validate_every and patience: must be 0 or positive")
        if self.patience and not self.validation_fraction:
            raise ConfigError("patience: early stopping needs a validation slice; set validation_fraction (e.g. 0.05)")


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup to `peak`, then cosine decay to min_ratio * peak at `total` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def split_validation(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) instance indices: every round(1/fraction)-th instance validates."""
    indices = np.arange(n)
    if not fraction:
        return indices, indices[:0]
    every = max(2, round(1 / fraction))
    validating = indices % every == every - 1
    return indices[~validating], indices[validating]


class Batches:
    """`batch_size` instances per step, cycling over epochs, in stored order or shuffled anew each epoch (a
    permutation seeded by (seed, epoch)); position = instances consumed, so a resumed run reads on exactly."""

    def __init__(self, split: PackedSplit, indices: np.ndarray, batch_size: int, pad_id: int, shuffled: bool,
                 seed: int):
        self.split, self.indices, self.batch_size, self.pad_id = split, indices, batch_size, pad_id
        self.shuffled, self.seed = shuffled, seed
        self.validating = len(indices) < len(split)  # some instances are held out as a validation slice
        self._orders: dict[int, np.ndarray] = {}

    def index(self, position: int) -> int:
        """The split index of the instance read at `position`."""
        epoch, k = divmod(position, len(self.indices))
        if not self.shuffled:
            return int(self.indices[k])
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))}
        return int(self.indices[self._orders[epoch][k]])

    def get(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        instances = [self.split[self.index(position + i)].astype(np.int64) for i in range(self.batch_size)]
        width = max(len(x) for x in instances)
        tokens = torch.full((len(instances), width), self.pad_id, dtype=torch.long)
        real = torch.zeros((len(instances), width), dtype=torch.bool)
        for i, x in enumerate(instances):
            tokens[i, : len(x)] = torch.from_numpy(x)
            real[i, : len(x)] = True
        return tokens, real


def masked_loss(logits: torch.Tensor, tokens: torch.Tensor, real: torch.Tensor, masked_ids: torch.Tensor,
                teacher_logits: torch.Tensor | None = None, kd_lambda: float = 0.0, temperature: float = 1.0):
    """(sum, count) of the per-position loss over positions whose input is real and not EOS/pad, in fp32:
    next-token cross-entropy, mixed with the KD term CE(softmax(teacher / T), log_softmax(student / T))
    when teacher logits are given. Sums, not means, so that ranks can share one global mean; both are
    tensors, so that no step waits on the device.

    Masked positions get the label -100 (ignored) rather than being gathered out: the logits are used in
    place, with no [positions, vocab] copy of the kept rows and no scatter back in the backward pass."""
    keep = real[:, 1:] & ~torch.isin(tokens[:, :-1], masked_ids)
    labels = torch.where(keep, tokens[:, 1:], -100)
    labels = torch.cat([labels, labels.new_full((len(labels), 1), -100)], dim=1)  # the last position predicts nothing
    student = logits.float().flatten(0, 1)
    loss = torch.nn.functional.cross_entropy(student, labels.flatten(), ignore_index=-100, reduction="sum")
    if teacher_logits is not None and kd_lambda > 0:
        weight = (labels.flatten() != -100).float()
        teacher = teacher_logits.float().flatten(0, 1)[:, : student.shape[-1]]
        soft = torch.softmax(teacher / temperature, dim=-1)
        kd = -((soft * torch.log_softmax(student / temperature, dim=-1)).sum(-1) * weight).sum()
        loss = (1 - kd_lambda) * loss + kd_lambda * kd
    return loss, keep.sum()


def flop_matched_steps(steps: int, n_student: int, n_teacher: int) -> int:
    """The paper's equal-FLOPs rule for online KD: T * 3Ns / (3Ns + Nt) (the teacher's forward is Nt/3Ns of a
    student step's cost)."""
    return max(1, math.floor(steps * 3 * n_student / (3 * n_student + n_teacher)))


def planned_steps(config: TrainConfig, split: PackedSplit) -> int:
    if config.max_steps is not None:
        return config.max_steps
    training, _ = split_validation(len(split), config.validation_fraction)
    lengths = split.table.column("n_tokens").to_numpy()[training]
    per_step = float(lengths.mean()) * config.batch_size
    tokens = config.max_tokens if config.max_tokens is not None else config.epochs * float(lengths.sum())
    return max(1, math.ceil(tokens / per_step))


def build_model(config: TrainConfig, corpus: PackedCorpus, tokenizer):
    max_len = corpus.manifest["max_len"]
    if config.model in PRESETS:
        model_config = build_config(config.model, len(tokenizer), max_len + 1, corpus.eos_id, tokenizer.pad_token_id)
    else:
        path = Path(config.model)
        if not path.exists():
            raise FileNotFoundError(f"model: {config.model!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
        model_config = AutoConfig.from_pretrained(path)
    torch.manual_seed(config.seed)
    return AutoModelForCausalLM.from_config(model_config)


def _load_teacher(config: TrainConfig, corpus: PackedCorpus, tokenizer, device):
    """The KD teacher, refused unless its tokenizer is the corpus's (token-level KD needs one vocabulary)."""
    teacher_tokenizer = load_tokenizer(config.teacher, trust_remote_code=False)
    if vocab_fingerprint(teacher_tokenizer) != vocab_fingerprint(tokenizer):
        raise ValueError(f"--kd vanilla needs one vocabulary: teacher '{config.teacher}' has a "
                         f"{len(teacher_tokenizer):,}-token tokenizer that differs from the {len(tokenizer):,}-token "
                         f"tokenizer of {corpus.path}; use SeqKD or MiniPLM for a student of another family")
    return load_causal_lm(config.teacher, device=device)


def planned_warmup(config: TrainConfig, total_steps: int, unmatched_steps: int) -> int:
    """The run's warmup: a fraction of its steps, or warmup_steps scaled by a FLOP-matched cut."""
    if config.warmup_fraction is not None:
        return round(config.warmup_fraction * total_steps)
    return max(1, round(config.warmup_steps * total_steps / unmatched_steps)) if config.warmup_steps else 0


def _latest_checkpoint(output: Path) -> Path | None:
    checkpoints = sorted((output / "checkpoints").glob("step-*[0-9]"))
    return checkpoints[-1] if checkpoints else None


class Train(Stage):
    name = "train"
    config = TrainConfig
    in_place = True  # checkpoints survive a kill

    def inputs(self, config: TrainConfig, log) -> dict:
        return {"corpus": PackedCorpus(config.corpus).key,
                "teacher": source_fingerprint(config.teacher) if config.kd == "vanilla" else None}

    def run(self, config: TrainConfig, output: Path, inputs: dict, log) -> dict:
        quiet_transformers()
        if config.threads:
            torch.set_num_threads(config.threads)
        rank, world, local_rank = distributed.rank_world()
        if config.batch_size % world:
            raise ConfigError(f"batch_size: {config.batch_size} sequences do not split evenly over {world} ranks")
        corpus = PackedCorpus(config.corpus)
        split = corpus.split(config.split)
        if len(split) == 0:
            raise ValueError(f"{config.corpus}/{config.split} has no instances to train on")
        tokenizer = corpus.load_tokenizer()
        device = resolve_device(config.device, local_rank)
        model = build_model(config, corpus, tokenizer).to(device)
        total_steps = unmatched = planned_steps(config, split)
        n_params = sum(p.numel() for p in model.parameters())
        teacher = _load_teacher(config, corpus, tokenizer, device) if config.kd == "vanilla" else None
        n_teacher = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
        if teacher is not None and config.match_flops:
            total_steps = flop_matched_steps(unmatched, n_params, n_teacher)
            log(f"train: --match-flops: {unmatched} steps -> {total_steps} (student {n_params / 1e6:.1f}M, teacher "
                f"{n_teacher / 1e6:.1f}M: the teacher's forward costs the difference)")
        warmup = planned_warmup(config, total_steps, unmatched)
        if warmup >= total_steps:
            log(f"train: warning: warmup ({warmup} steps) is not shorter than the run ({total_steps} steps): it "
                f"ends before the learning rate peaks; lower warmup_steps or set warmup_fraction")
        peak_lr = config.lr if config.lr is not None else PRESETS.get(config.model, SIZES["mini"]).lr
        optimizer = _optimizer(model, config, peak_lr)
        training, validating = split_validation(len(split), config.validation_fraction)
        step, position, tokens_seen = 0, 0, 0
        checkpoint = _latest_checkpoint(output)
        if checkpoint is not None:
            step, position, tokens_seen = _load_checkpoint(checkpoint, model, optimizer, device)
            log(f"train: resuming {output} from step {step}")
        heldout = validation = None
        if config.eval_every and rank == 0:
            eval_corpus = PackedCorpus(config.eval_corpus) if config.eval_corpus else corpus
            heldout = HeldOut(eval_corpus, config.eval_split, config.eval_max_instances)
        if config.validation_fraction and not len(validating):
            log(f"train: warning: {config.corpus}/{config.split} has too few instances ({len(split)}) for a "
                f"validation slice of {config.validation_fraction}; training without one")
        if len(validating) and rank == 0:
            validation = HeldOut(corpus, config.split, indices=validating)
        if rank == 0:
            for log_file in ("metrics.jsonl", "eval.jsonl", VALIDATION_FILE):
                _truncate_log(output / log_file, step)
        distributed.barrier()
        log(f"train: {type(model).__name__} {n_params / 1e6:.1f}M parameters, {total_steps} steps of "
            f"{config.batch_size} sequences on {config.corpus}/{config.split} ({len(training):,} instances"
            + (f", {len(validating):,} more validating" if len(validating) else "") + f", {config.order} order), "
            f"warmup {warmup}, autocast {resolve_precision(config.precision, device)}, {world} rank(s)")
        batches = Batches(split, training, config.batch_size, corpus.eos_id, config.order == "shuffled", config.seed)
        loop = _Loop(config, output, model, teacher, optimizer, tokenizer, heldout, validation, n_params, n_teacher,
                     masked_input_ids(corpus.eos_id, tokenizer), batches)
        step, tokens_seen = loop.run(step, total_steps, position, tokens_seen, peak_lr, warmup)
        if rank != 0:
            return {}  # rank 0 writes the model and the manifest
        final = output / "final"
        if final.exists():
            shutil.rmtree(final)
        best = _best_validation(output)
        source = output / BEST if best else _latest_checkpoint(output)
        shutil.copytree(source, final, ignore=shutil.ignore_patterns("trainer.pt"))
        curve = _read_rows(output / "metrics.jsonl")
        trained_tokens = int(split.table.column("n_tokens").to_numpy()[training].sum())
        epochs = tokens_seen / max(trained_tokens, 1)
        if epochs > 1.001:
            log(f"train: the run read its {trained_tokens:,} training tokens {epochs:.2f} times (repeated data)")
        return dict(status="done", corpus={"path": str(corpus.path), "key": corpus.key, "split": config.split},
                    model={"class": type(model).__name__, "parameters": n_params, "final": "final"},
                    teacher={"spec": config.teacher, "weights": weights_description(config.teacher),
                             "parameters": n_teacher} if teacher is not None else None,
                    steps=step, planned_steps=total_steps, warmup_steps=warmup, tokens=tokens_seen,
                    epochs=round(epochs, 4), final_loss=curve[-1]["loss"] if curve else None,
                    validation={"instances": len(validating), "best": best, "stopped_early": step < total_steps}
                    if len(validating) else None)

    def summary(self, manifest: dict) -> str:
        return (f"trained {manifest['model']['class']} ({manifest['model']['parameters'] / 1e6:.1f}M) for "
                f"{manifest['steps']} steps, {manifest['tokens']:,} tokens, final loss {manifest['final_loss']}; "
                f"model in {manifest['output']}/final")


def train(config: TrainConfig, force: bool = False, log=print) -> StageResult:
    """Train (resuming a killed run onto the same curve), or reuse a finished run; `force` trains anew."""
    return execute(Train(), config, force, log)


def _optimizer(model, config: TrainConfig, peak_lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=peak_lr, betas=(config.beta1, config.beta2), eps=config.eps, fused=True)


@dataclass
class _Loop:
    """The training loop and what it needs, so that the loop reads as the steps it takes."""

    config: TrainConfig
    output: Path
    model: torch.nn.Module
    teacher: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    tokenizer: object
    heldout: HeldOut | None
    validation: HeldOut | None  # rank 0's; the other ranks only join its verdict
    n_params: int
    n_teacher: int
    masked: set[int]
    batches: Batches

    def run(self, step: int, total_steps: int, position: int, tokens_seen: int, peak_lr: float,
            warmup: int) -> tuple[int, int]:
        """Train from `step` to `total_steps` (or an early stop); returns the steps taken and tokens seen."""
        config, model, teacher, optimizer, output = self.config, self.model, self.teacher, self.optimizer, self.output
        rank, world, _ = distributed.rank_world()
        device = next(model.parameters()).device
        ddp_model = model
        if world > 1:
            ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        masked_ids = torch.tensor(sorted(self.masked), device=device)
        dtype = resolve_precision(config.precision, device)
        autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else (
            lambda: torch.autocast(device.type, enabled=False))
        model.train()
        validate_every = self.config.validate_every or max(1, total_steps // 10)
        window_start, window_tokens = time.time(), 0
        metrics = open(output / "metrics.jsonl", "a", encoding="utf-8") if rank == 0 else None
        with progress(config.progress and rank == 0, total_steps, "train", unit="steps", done=step) as advance:
            while step < total_steps:
                lr = lr_at(step, total_steps, peak_lr, warmup, config.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                tokens, real = self.batches.get(position)  # the global batch; each rank trains on its rows
                batch_tokens = int(real.sum())
                tokens, real = tokens[rank::world].to(device), real[rank::world].to(device)
                with autocast():
                    logits = ddp_model(input_ids=tokens, use_cache=False).logits
                    teacher_logits = None
                    if teacher is not None:
                        with torch.no_grad():  # the teacher is frozen, in eval mode
                            teacher_logits = teacher(input_ids=tokens, use_cache=False).logits
                loss_sum, count = masked_loss(logits, tokens, real, masked_ids, teacher_logits, config.kd_lambda,
                                              config.kd_temperature)
                total = distributed.all_reduce_sum(count).clamp(min=1)
                optimizer.zero_grad(set_to_none=True)
                # DDP averages gradients over ranks: scaling by world makes them those of the global mean
                (loss_sum * world / total).backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                loss = distributed.all_reduce_sum(loss_sum.detach()) / total  # read (a device sync) when logged
                step += 1
                position += config.batch_size
                tokens_seen += batch_tokens
                window_tokens += batch_tokens
                advance(1)
                if metrics is not None and (step % config.log_every == 0 or step == total_steps):
                    elapsed = time.time() - window_start
                    row = {"step": step, "loss": round(loss.item(), 6), "lr": lr,
                           "grad_norm": round(float(grad_norm), 6), "tokens": tokens_seen,
                           "tokens_per_second": round(window_tokens / max(elapsed, 1e-9), 1)}
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                    window_start, window_tokens = time.time(), 0
                if self.heldout is not None and (step % config.eval_every == 0 or step == total_steps):
                    _log_eval(output / "eval.jsonl", model, self.tokenizer, self.heldout, config.precision, step,
                              tokens_seen, self.n_params, self.n_teacher)
                early_stop = False
                if self.batches.validating:
                    if step % validate_every == 0 or step == total_steps:
                        early_stop = self._validate(step, tokens_seen, device)
                signalled = _stop_requested(device, world)
                if step % config.save_every == 0 or step == total_steps or early_stop or signalled:
                    if rank == 0:
                        _save_checkpoint(output, step, position, tokens_seen, model, optimizer, self.tokenizer,
                                         config.keep_checkpoints)
                    distributed.barrier()
                if signalled:  # the step is saved: a rerun resumes from it onto the same curve
                    raise stop.Stopped(stop.requested() or signal.SIGTERM)
                if early_stop:
                    break
        if metrics is not None:
            metrics.close()
        return step, tokens_seen

    def _validate(self, step: int, tokens: int, device) -> bool:
        """Validation loss into validation.jsonl (rank 0), the best model into best/; True when `patience`
        validations in a row found no new best (every rank gets the same answer)."""
        patience_over = torch.zeros((), device=device)
        if self.validation is not None:
            path = self.output / VALIDATION_FILE
            rows = _read_rows(path)
            result = heldout_loss(self.model, self.tokenizer, self.validation, self.config.precision)
            losses = [r["loss_per_token"] for r in rows]
            improved = not rows or result["loss_per_token"] < min(losses)
            since = 0 if improved else len(rows) - int(np.argmin(losses))
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, "tokens": tokens, "loss_per_token": result["loss_per_token"],
                                     "bits_per_byte": result["bits_per_byte"]}) + "\n")
            if improved:
                _save_model(self.output / BEST, self.model, self.tokenizer)
            patience_over += bool(self.config.patience) and since >= self.config.patience
        return bool(distributed.all_reduce_sum(patience_over) > 0)


def _stop_requested(device, world: int) -> bool:
    """Whether any rank was asked to stop: every rank then stops after the same step."""
    if world == 1:
        return stop.requested() is not None
    return bool(distributed.all_reduce_sum(torch.tensor(float(stop.requested() is not None), device=device)) > 0)


def _save_checkpoint(output: Path, step: int, position: int, tokens: int, model, optimizer, tokenizer,
                     keep: int) -> None:
    root = output / "checkpoints"
    target = root / f"step-{step:07d}"
    tmp = root / f"step-{step:07d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    state = {"step": step, "position": position, "tokens": tokens, "optimizer": optimizer.state_dict(),
             "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(state, tmp / "trainer.pt")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    for old in sorted(root.glob("step-*[0-9]"))[:-keep]:
        shutil.rmtree(old)


def _load_checkpoint(path: Path, model, optimizer, device) -> tuple[int, int, int]:
    weights = load_file(path / "model.safetensors", device=str(device))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:  # tied embeddings are stored once; anything else is damage
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    state = torch.load(path / "trainer.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"].cpu())
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"]), int(state["position"]), int(state["tokens"])


def _log_eval(path: Path, model, tokenizer, heldout, precision: str, step: int, tokens: int, n_params: int,
              n_teacher: int) -> None:
    result = heldout_loss(model, tokenizer, heldout, precision)
    row = {"step": step, "tokens": tokens, "flops": float(training_flops(n_params, tokens, n_teacher)),
           **{key: round(result[key], 6) for key in ("loss_per_token", "loss_per_instance", "bits_per_byte")},
           "loss_per_token_ci95": [round(v, 6) for v in result.get("loss_per_token_ci95", [])]}
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


VALIDATION_FILE, BEST = "validation.jsonl", "best"


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def _best_validation(output: Path) -> dict | None:
    """The validation row of the best model (the one in best/), None without validation."""
    rows = _read_rows(output / VALIDATION_FILE)
    return min(rows, key=lambda r: r["loss_per_token"]) if rows else None


def _save_model(target: Path, model, tokenizer) -> None:
    """Write a loadable model directory whole: under a temporary name, then renamed over `target`."""
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _truncate_log(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
