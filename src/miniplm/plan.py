"""`miniplm compare --plan`: the grid a compare config expands into and how long it will take, before anything
trains.

The token counts come from the config (and from the prepared corpus once it exists); the speeds from a short
probe on this machine: a few training steps of each student size and of the reference on random token ids,
and forward passes of the teacher and of the reference as the scorer runs them. Estimates, said so: they
leave out evaluation and the start-up of each stage.
"""

from __future__ import annotations

import contextlib
import time

import torch

from miniplm.core.models import load_causal_lm, resolve_precision
from miniplm.core.tokenizer import load_tokenizer
from miniplm.data.shards import PackedCorpus
from miniplm.pipeline import Pipeline, RunConfig
from miniplm.scoring.scorer import LogProbScorer
from miniplm.training.presets import PRESETS, build_config

PROBE_SECONDS = 3.0  # per measured model: enough for a steady rate, short beside any real run


def _batch(vocab: int, batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def _timed(step, seconds: float) -> float:
    """Seconds per call of `step`, after one warm-up call, over at least `seconds` (and at least 2 calls)."""
    step()
    calls, started = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - started < seconds:
        step()
        calls += 1
    return (time.perf_counter() - started) / calls


def _autocast(precision: str):
    dtype = resolve_precision(precision, torch.device("cpu"))
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def train_speed(model_spec: str, vocab: int, batch: int, length: int, precision: str, seconds: float) -> float:
    """Training tokens/s of a preset (forward, backward, AdamW step, the trainer's autocast) on random ids."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config(model_spec, vocab, length, None, None))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = _batch(vocab, batch, length)

    def step():
        with _autocast(precision):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return batch * length / _timed(step, seconds)


def score_speed(model, vocab: int, length: int, precision: str, seconds: float, rows: int = 8) -> float:
    """Scoring tokens/s of `miniplm score`'s scorer (eager: compiling would take longer than the probe)."""
    scorer = LogProbScorer(model, {0}, resolve_precision(precision, torch.device("cpu")), log=lambda m: None)
    instances = list(_batch(vocab, rows, length).numpy())
    return rows * length / _timed(lambda: scorer.score(instances), seconds)


def _reference_tokens(config: RunConfig, corpus: PackedCorpus | None) -> int | None:
    """Tokens the reference trains on: its budget, or its epochs over D_ref once the corpus is prepared."""
    r, length = config.reference, config.prepare.max_len + 1
    if r.max_steps is not None:
        return r.max_steps * r.batch_size * length
    if r.max_tokens is not None:
        return r.max_tokens
    if corpus is None:
        return None
    return int(r.epochs * corpus.split("ref").table.column("n_tokens").to_numpy().sum())


def plan(config: RunConfig, probe_seconds: float | None = None, log=print) -> dict:
    """The compare grid, its token counts, the measured speeds and the estimated wall time."""
    from transformers import AutoModelForCausalLM

    probe_seconds = PROBE_SECONDS if probe_seconds is None else probe_seconds
    pipeline = Pipeline(config, echo=log)
    c, run = config.compare, pipeline.config
    length = config.prepare.max_len + 1
    corpus = PackedCorpus(pipeline.corpus) if (pipeline.corpus / "manifest.json").is_file() else None
    vocab = len(corpus.load_tokenizer() if corpus is not None else load_tokenizer(config.prepare.tokenizer))
    pool_instances = config.score.max_instances or (len(corpus.split("train")) if corpus else None)
    pool_tokens = None if pool_instances is None else pool_instances * length  # at most: instances may be shorter
    student_tokens = c.tokens or (pool_tokens // 2 if pool_tokens else None)
    sizes = [c.student] + ([c.second_size] if c.second_size else [])
    per_size = len(run.students) // len(sizes)
    speeds, seconds = {}, {}
    for recipe in sizes:
        if recipe.model not in PRESETS:
            continue
        student_vocab = config.tokenizers[recipe.tokenizer].vocab_size if recipe.tokenizer in config.tokenizers \
            else len(load_tokenizer(recipe.tokenizer)) if recipe.tokenizer else vocab
        speeds[f"train {recipe.model}"] = train_speed(recipe.model, student_vocab, config.train.batch_size, length,
                                                      config.train.precision, probe_seconds)
        if student_tokens:
            seconds[f"students {recipe.model} ({per_size} x {student_tokens:,} tokens)"] = \
                per_size * student_tokens / speeds[f"train {recipe.model}"]
    reference_tokens = _reference_tokens(config, corpus)
    if config.reference.model in PRESETS:
        speeds["train reference"] = train_speed(config.reference.model, vocab, config.reference.batch_size, length,
                                                config.reference.precision, probe_seconds)
        torch.manual_seed(0)
        reference = AutoModelForCausalLM.from_config(build_config(config.reference.model, vocab, length, None, None))
        speeds["score reference"] = score_speed(reference, vocab, length, config.score.precision, probe_seconds)
        if reference_tokens:
            seconds[f"reference training ({reference_tokens:,} tokens)"] = reference_tokens / speeds["train reference"]
        if pool_tokens:
            seconds[f"reference pass ({pool_tokens:,} pool tokens at most)"] = pool_tokens / speeds["score reference"]
    speeds["score teacher"] = score_speed(load_causal_lm(config.teacher), vocab, length, config.score.precision,
                                          probe_seconds)
    if pool_tokens:
        seconds[f"teacher pass ({pool_tokens:,} pool tokens at most)"] = pool_tokens / speeds["score teacher"]
    result = {"signals": list(c.signals), "controls": sorted(set(run.selections) - set(c.signals)),
              "seeds": c.seeds, "sizes": [r.model for r in sizes], "students": len(run.students),
              "pool_tokens": pool_tokens, "tokens_per_student": student_tokens, "reference_tokens": reference_tokens,
              "speeds": {k: round(v, 1) for k, v in speeds.items()},
              "seconds": {k: round(v) for k, v in seconds.items()}, "total_seconds": round(sum(seconds.values()))}
    log(render_plan(result))
    return result


def render_plan(plan: dict) -> str:
    lines = [f"grid: {len(plan['signals'])} signals ({', '.join(plan['signals'])}) + controls "
             f"({', '.join(plan['controls'])}) + no-KD, x {len(plan['seeds'])} seeds x {len(plan['sizes'])} "
             f"size(s) ({', '.join(plan['sizes'])}) = {plan['students']} students",
             f"tokens: pool {_count(plan['pool_tokens'])} (scored by the teacher and the reference), "
             f"{_count(plan['tokens_per_student'])} per student, reference training {_count(plan['reference_tokens'])}",
             "measured on this machine (tokens/s): " + ", ".join(f"{k} {v:,.0f}" for k, v in plan["speeds"].items())]
    lines += [f"  {what}: {_duration(s)}" for what, s in plan["seconds"].items()]
    lines.append(f"estimated: {_duration(plan['total_seconds'])} (evaluations and stage start-ups not counted; "
                 f"token counts are upper bounds until the corpus is prepared)")
    return "\n".join(lines)


def _count(n: int | None) -> str:
    return "unknown until prepare" if n is None else f"{n:,}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"
