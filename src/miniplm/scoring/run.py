"""`miniplm score`: log p of every instance of a packed split under one model, resumable, on any executor.

Output directory:
    plan.json                the run's key and its parts (written first; a different key wipes the dir)
    parts/part-NNNNNN.parquet  instance_id, n_scored, logp_sum (float64) for the instances of one part
    manifest.json            written when every part is on disk: model identity and hash, precision,
                             corpus key and split, counts, throughput, versions
A part is written under a temporary name and renamed when complete, so after `kill -9` the same command
scores only the parts that are missing and the result has every row exactly once.

Executors share `score_part`: the local one (also each rank under torchrun, which takes parts
rank, rank + world_size, ...) and Ray Data (`map_batches` over part ids with an actor pool of scorers).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from miniplm import distributed
from miniplm.config import ConfigError, config_hash, option, require_at_least_one, to_dict
from miniplm.data.shards import PackedCorpus, PackedSplit, atomic_write
from miniplm.manifest import (
    is_up_to_date,
    manifest_key,
    new_manifest,
    open_resumable,
    part_path,
    read_manifest,
    write_json_atomic,
)
from miniplm.progress import progress
from miniplm.scoring.plan import padding_fraction, plan_batches, plan_parts
from miniplm.tokenizer import DEFAULT_TOKENIZER, source_fingerprint

SCORE_SCHEMA = pa.schema([("instance_id", pa.int64()), ("n_scored", pa.int32()), ("logp_sum", pa.float64())])
FORMAT_VERSION = 1


@dataclass
class ScoreConfig:
    model: str = option(DEFAULT_TOKENIZER, "causal LM: local directory, hub id, .gguf file, or 'smollm2'")
    corpus: str = option("out/corpus", "a `miniplm prepare` output directory")
    split: str = option("train", "which split of the corpus to score")
    output: str = option("out/scores/teacher", "output directory")
    tokenizer: str | None = option(None, "the model's tokenizer if it is not next to the model (null: the model's)")
    trust_remote_code: bool = option(False, "allow the model's own code from its directory or hub repo to run")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "autocast dtype of the matmuls (auto: bf16 where the CPU/GPU supports it, else fp16/fp32); "
        "log-softmax is fp32 and sums fp64 in every case")
    device: str = option("auto", "auto (cuda when available), cpu, cuda, cuda:N")
    batch_tokens: int = option(16384, "padded tokens per forward pass (rows x padded width)")
    head_chunk_tokens: int | None = option(
        None, "positions per output-layer chunk, bounding the [tokens, vocab] logits (null: 256 on CPU, "
        "where small chunks stay in cache, 4096 on GPU)")
    compile: bool = option(
        True, "torch.compile the output layer's log-softmax and each decoder layer (one compilation for all "
        "layers, ~6 s at start on a CPU; +2-3% end to end on a 2-core CPU, not yet measured on a GPU); falls "
        "back to eager, with a message, where compiling fails: no C++ compiler on a CPU, no Triton on a GPU")
    part_tokens: int = option(1 << 18, "tokens per output part: the unit of resume and of work across workers")
    max_instances: int | None = option(None, "score only the first N instances of the split (quick runs)")
    threads: int | None = option(None, "torch CPU threads (null: torch's default)")
    executor: Literal["local", "ray"] = option("local", "local (one process, or each torchrun rank) or ray")
    ray_address: str | None = option(None, "existing Ray cluster address (null: start a local Ray)")
    ray_actors: int | None = option(None, "scorer actors (null: one per GPU, else one per 2 CPUs)")
    progress: bool = option(True, "show a progress bar")

    # fields that change how the work runs, not the scores (beyond float tolerance) or their layout
    NOT_HASHED = ("output", "batch_tokens", "head_chunk_tokens", "compile", "threads", "executor", "ray_address",
                  "ray_actors", "progress", "device", "trust_remote_code")

    def validate(self) -> None:
        require_at_least_one(self, "batch_tokens", "head_chunk_tokens", "part_tokens", "max_instances", "threads",
                             "ray_actors")


@dataclass
class ScoreJob:
    """What every worker needs: the corpus split, the plan, and where to write."""

    config: ScoreConfig
    output: Path
    lengths: np.ndarray
    instance_ids: np.ndarray
    parts: list[np.ndarray]

    def part_path(self, part: int) -> Path:
        return part_path(self.output, part)

    def done(self, part: int) -> bool:
        return self.part_path(part).is_file()


def vocab_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return manifest_key(vocab)


def _device(config: ScoreConfig, local_rank: int):
    import torch

    if config.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def build_scorer(config: ScoreConfig, corpus: PackedCorpus, local_rank: int = 0, log=print):
    """Load the model, check it against the corpus, and wrap it in a LogProbScorer."""
    import torch

    from miniplm.models import context_length, load_causal_lm, resolve_precision
    from miniplm.scoring.scorer import LogProbScorer
    from miniplm.tokenizer import load_tokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    device = _device(config, local_rank)
    model_tokenizer = load_tokenizer(config.tokenizer or config.model, trust_remote_code=config.trust_remote_code)
    corpus_tokenizer = corpus.load_tokenizer()
    if vocab_fingerprint(model_tokenizer) != vocab_fingerprint(corpus_tokenizer):
        raise ValueError(
            f"tokenizer mismatch: model '{config.model}' uses {type(model_tokenizer).__name__} with "
            f"{len(model_tokenizer):,} tokens, but corpus {corpus.path} was packed with "
            f"'{corpus.manifest['tokenizer']['spec']}' ({len(corpus_tokenizer):,} tokens). Score with a model of "
            f"the corpus's tokenizer, or re-run `miniplm prepare --tokenizer {config.tokenizer or config.model}`"
        )
    model = load_causal_lm(config.model, trust_remote_code=config.trust_remote_code, device=device)
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(corpus_tokenizer):
        raise ValueError(f"vocabulary mismatch: model '{config.model}' has {rows:,} embedding rows but the "
                         f"corpus tokenizer has {len(corpus_tokenizer):,} tokens")
    masked = {corpus.eos_id}
    if model_tokenizer.pad_token_id is not None:
        masked.add(int(model_tokenizer.pad_token_id))
    scorer = LogProbScorer(model, masked, resolve_precision(config.precision, device), config.head_chunk_tokens, log,
                           compile=config.compile)
    return scorer, model, context_length(model)


def score_part(scorer, split: PackedSplit, job: ScoreJob, part: int) -> pa.Table:
    """Score one part of the plan and return its rows sorted by instance_id."""
    indices = job.parts[part]
    ids, n_scored, logp = [], [], []
    for batch in plan_batches(indices, job.lengths, job.config.batch_tokens):
        sums, counts = scorer.score([split[int(i)] for i in batch])
        ids.append(job.instance_ids[batch])
        logp.append(sums)
        n_scored.append(counts)
    ids_, n_, logp_ = np.concatenate(ids), np.concatenate(n_scored), np.concatenate(logp)
    order = np.argsort(ids_, kind="stable")
    return pa.table({"instance_id": ids_[order], "n_scored": n_[order].astype(np.int32), "logp_sum": logp_[order]},
                    schema=SCORE_SCHEMA)


def write_part(job: ScoreJob, part: int, table: pa.Table) -> None:
    atomic_write(job.part_path(part), lambda p: pq.write_table(table, p))


def read_scores(output: str | Path) -> pa.Table:
    """All rows of a finished scoring run, sorted by instance_id."""
    output = Path(output)
    manifest = read_manifest(output)
    if manifest is None or manifest.get("stage") != "score":
        raise FileNotFoundError(f"{output} holds no finished scoring run (no score manifest.json)")
    parts = sorted((output / "parts").glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else SCORE_SCHEMA.empty_table()
    return table.sort_by("instance_id")


def score(config: ScoreConfig, force: bool = False, log=print) -> dict:
    """Run (or resume, or skip) a scoring run and return its manifest."""
    started = time.time()
    rank, world, local_rank = distributed.rank_world()
    corpus = PackedCorpus(config.corpus)
    split = corpus.split(config.split)
    table = split.table
    count = len(split) if config.max_instances is None else min(config.max_instances, len(split))
    lengths = table.column("n_tokens").to_numpy()[:count].astype(np.int64)
    instance_ids = table.column("instance_id").to_numpy()[:count]
    cfg_hash = config_hash(config, exclude=ScoreConfig.NOT_HASHED)
    key = manifest_key(FORMAT_VERSION, cfg_hash, corpus.key, source_fingerprint(config.model),
                       source_fingerprint(config.tokenizer) if config.tokenizer else None)
    output = Path(config.output)
    plan_size = len(plan_parts(lengths, config.part_tokens))
    intact = len(list((output / "parts").glob("part-*.parquet"))) == plan_size
    if not force and is_up_to_date(output, key) and not intact and rank == 0:
        log(f"score: {output} is missing part files (deleted or damaged since it finished): scoring them again")
    if not force and is_up_to_date(output, key) and intact:
        if rank == 0:
            log(f"score: {output} is up to date (key {key}); pass --force to redo it")
        return read_manifest(output)
    job = ScoreJob(config, output, lengths, instance_ids, plan_parts(lengths, config.part_tokens))

    distributed.init(_device(config, local_rank))
    if rank == 0:
        open_resumable(output, key, len(job.parts), "score", force, log, instances=int(len(lengths)))
    distributed.barrier()

    scorer, model, context = build_scorer(config, corpus, local_rank, log if rank == 0 else (lambda m: None))
    longest = int(lengths.max()) if len(lengths) else 0
    if context is not None and longest - 1 > context:
        raise ValueError(f"instances of {config.corpus}/{config.split} hold up to {longest - 1} positions but "
                         f"model '{config.model}' has a context of {context}; re-run `miniplm prepare` with "
                         f"max_len <= {context}")
    todo = [p for p in range(len(job.parts)) if not job.done(p)]
    scoring_started = time.time()
    if config.executor == "ray":
        if world > 1:
            raise ConfigError("executor: use either torchrun or --executor ray, not both")
        _run_ray(job, todo, log)
    else:
        mine = [p for p in todo if p % world == rank]
        _run_local(scorer, split, job, mine, show=config.progress and rank == 0)
    distributed.barrier()
    scoring_seconds = time.time() - scoring_started
    tokens_this_run = int(sum(lengths[job.parts[p]].sum() for p in todo))

    manifest = None
    if rank == 0:
        missing = [p for p in range(len(job.parts)) if not job.done(p)]
        if missing:
            raise RuntimeError(f"{len(missing)} parts of {output} are missing after the run: {missing[:10]}")
        rows = read_scores_parts(job)
        manifest = new_manifest(
            "score", key, to_dict(config),
            config_hash=cfg_hash,
            format_version=FORMAT_VERSION,
            model={"spec": config.model, "fingerprint": source_fingerprint(config.model),
                   "class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
                   "context": context, "chunked_head": scorer.chunked_head},
            precision={"setting": config.precision, "autocast": str(scorer.autocast_dtype),
                       "log_softmax": "float32", "sum": "float64"},
            corpus={"path": str(corpus.path), "key": corpus.key, "split": config.split,
                    "tokenizer_fingerprint": corpus.manifest["tokenizer"]["fingerprint"],
                    "max_len": corpus.manifest["max_len"]},
            masked_input_ids=sorted(int(i) for i in scorer.masked_input_ids.tolist()),
            instances=rows.num_rows,
            tokens_scored=int(pc.sum(rows.column("n_scored")).as_py() or 0),
            parts=len(job.parts),
            padding_fraction=round(float(np.mean([padding_fraction(plan_batches(p, lengths, config.batch_tokens),
                                                                   lengths) for p in job.parts] or [0.0])), 5),
            throughput={"tokens_this_run": tokens_this_run, "scoring_seconds": round(scoring_seconds, 2),
                        "tokens_per_second": round(tokens_this_run / max(scoring_seconds, 1e-9), 1),
                        "resumed_parts": len(job.parts) - len(todo)},
            world_size=world,
            executor=config.executor,
            wall_seconds=round(time.time() - started, 2),
        )
        write_json_atomic(output / "manifest.json", manifest)
    distributed.barrier()
    distributed.finish()
    return manifest if manifest is not None else read_manifest(output)


def read_scores_parts(job: ScoreJob) -> pa.Table:
    tables = [pq.read_table(job.part_path(p)) for p in range(len(job.parts))]
    rows = pa.concat_tables(tables) if tables else SCORE_SCHEMA.empty_table()
    ids = rows.column("instance_id").to_numpy()
    if len(np.unique(ids)) != len(ids) or len(ids) != len(job.lengths):
        raise RuntimeError(f"{job.output}: parts hold {len(ids)} rows ({len(np.unique(ids))} distinct) for "
                           f"{len(job.lengths)} instances; delete the directory and score again")
    return rows


def _run_local(scorer, split: PackedSplit, job: ScoreJob, parts: list[int], show: bool) -> None:
    total = int(sum(job.lengths[job.parts[p]].sum() for p in parts))
    with progress(show, total, "score") as advance:
        for part in parts:
            write_part(job, part, score_part(scorer, split, job, part))
            advance(int(job.lengths[job.parts[part]].sum()))


class _RayPartScorer:
    """A Ray actor: loads the model once, then scores and writes whole parts."""

    def __init__(self, job: ScoreJob, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        corpus = PackedCorpus(job.config.corpus)
        self.job = job
        self.split = corpus.split(job.config.split)
        self.scorer, _, _ = build_scorer(job.config, corpus, 0, log=lambda m: None)

    def __call__(self, batch: dict) -> dict:
        tokens = []
        for part in batch["part"]:
            part = int(part)
            write_part(self.job, part, score_part(self.scorer, self.split, self.job, part))
            tokens.append(int(self.job.lengths[self.job.parts[part]].sum()))
        return {"part": batch["part"], "tokens": np.array(tokens, dtype=np.int64)}


def _run_ray(job: ScoreJob, todo: list[int], log) -> None:
    try:
        import ray
    except ImportError:
        raise ImportError("--executor ray needs Ray Data: pip install 'miniplm[ray]'") from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=job.config.ray_address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    try:
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
        actors = job.config.ray_actors or (gpus or max(1, int(cpus) // 2))
        # leave CPU for Ray Data's own read tasks: actors that ask for every CPU stall the pipeline
        cpus_per_actor = cpus / (actors + 1)
        log(f"score: Ray with {cpus:g} CPUs and {gpus} GPUs: {actors} scorer actors")
        if not todo:
            return
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        results = ray.data.from_items([{"part": p} for p in todo]).map_batches(
            _RayPartScorer,
            fn_constructor_kwargs={"job": job, "threads": max(1, int(cpus_per_actor + 0.5))},
            batch_size=1,
            concurrency=actors,
            num_cpus=cpus_per_actor,
            num_gpus=1 if gpus else 0,
        )
        total = int(sum(job.lengths[job.parts[p]].sum() for p in todo))
        with progress(job.config.progress, total, "score (ray)") as advance:
            for row in results.iter_rows():
                advance(int(row["tokens"]))
    finally:
        if started_here:
            ray.shutdown()
