"""`miniplm score`: log p of every instance of a packed split under one model, resumable, on any executor.

Output directory:
    plan.json                the run's key and its parts (written first; a different key wipes the dir)
    parts/part-NNNNNN.parquet  instance_id, n_scored, logp_sum (float64) for the instances of one part;
                             with --features also hidden (the mean final hidden state over the scored
                             positions, float16) and logp_quantiles (float32, at LOGP_QUANTILES)
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
import torch

from miniplm.core import distributed, stop
from miniplm.core.config import Compute, ConfigError, option, require_at_least_one
from miniplm.core.hashing import file_sha256
from miniplm.core.manifest import open_parts, part_path, read_manifest, update_plan
from miniplm.core.models import (
    context_length,
    load_causal_lm,
    resolve_device,
    resolve_precision,
    weights_description,
)
from miniplm.core.progress import progress
from miniplm.core.stage import Stage, StageResult, execute
from miniplm.core.tokenizer import DEFAULT_TOKENIZER, load_tokenizer, source_fingerprint
from miniplm.core.tokens import masked_input_ids, vocab_fingerprint
from miniplm.data.shards import PackedCorpus, PackedSplit, atomic_write
from miniplm.scoring.plan import padding_fraction, plan_batches, plan_parts
from miniplm.scoring.scorer import LOGP_QUANTILES, LogProbScorer

SCORE_SCHEMA = pa.schema([("instance_id", pa.int64()), ("n_scored", pa.int32()), ("logp_sum", pa.float64())])


def feature_schema(hidden_size: int) -> pa.Schema:
    return SCORE_SCHEMA.append(pa.field("hidden", pa.list_(pa.float16(), hidden_size))).append(
        pa.field("logp_quantiles", pa.list_(pa.float32(), len(LOGP_QUANTILES))))


@dataclass
class ScoreConfig(Compute):
    model: str = option(DEFAULT_TOKENIZER, "causal LM: local directory, hub id, .gguf file, or 'smollm2'")
    corpus: str = option("out/corpus", "a `miniplm prepare` output directory")
    split: str = option("train", "which split of the corpus to score")
    output: str = option("out/scores/teacher", "output directory", hashed=False)
    tokenizer: str | None = option(None, "the model's tokenizer if it is not next to the model (null: the model's)")
    trust_remote_code: bool = option(False, "allow the model's own code from its directory or hub repo to run",
                                     hashed=False)
    batch_tokens: int = option(16384, "padded tokens per forward pass (rows x padded width)", hashed=False)
    head_chunk_tokens: int | None = option(
        None, "positions per output-layer chunk, bounding the [tokens, vocab] logits (null: 256 on CPU, "
        "where small chunks stay in cache, 4096 on GPU)", hashed=False)
    compile: bool = option(
        True, "torch.compile the output layer's log-softmax and each decoder layer (one compilation for all "
        "layers, ~6 s at start on a CPU; +2-3% end to end on a 2-core CPU, not yet measured on a GPU); falls "
        "back to eager, with a message, where compiling fails: no C++ compiler on a CPU, no Triton on a GPU",
        hashed=False)
    part_tokens: int = option(1 << 18, "tokens per output part: the unit of resume and of work across workers")
    max_instances: int | None = option(None, "score only the first N instances of the split (quick runs)")
    instances: str | None = option(None, "score only the instance ids listed in this .npy file (sorted, distinct; "
                                   "what `miniplm proxy` gives the teacher to label)", hashed="when-set")
    features: bool = option(False, "also store, per instance, the mean final hidden state (fp16) and quantiles "
                            "of the per-token log-probs: what `miniplm proxy` predicts the teacher from (store "
                            "them when scoring the reference)", hashed="when-set")
    executor: Literal["local", "ray"] = option("local", "local (one process, or each torchrun rank) or ray",
                                               hashed=False)
    ray_address: str | None = option(None, "existing Ray cluster address (null: start a local Ray)", hashed=False)
    ray_actors: int | None = option(None, "scorer actors (null: one per GPU, else one per 2 CPUs)", hashed=False)

    def validate(self) -> None:
        super().validate()
        require_at_least_one(self, "batch_tokens", "head_chunk_tokens", "part_tokens", "max_instances", "ray_actors")


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


def build_scorer(config: ScoreConfig, corpus: PackedCorpus, local_rank: int = 0, log=print):
    """Load the model, check it against the corpus, and wrap it in a LogProbScorer."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device, local_rank)
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
    scorer = LogProbScorer(model, masked_input_ids(corpus.eos_id, model_tokenizer),
                           resolve_precision(config.precision, device), config.head_chunk_tokens, log,
                           compile=config.compile)
    return scorer, model, context_length(model)


def score_part(scorer, split: PackedSplit, job: ScoreJob, part: int, on_batch=None) -> pa.Table:
    """Score one part of the plan and return its rows sorted by instance_id; `on_batch(tokens)` after each
    batch (a progress bar's advance)."""
    indices = job.parts[part]
    columns: list[list[np.ndarray]] = []
    ids = []
    for batch in plan_batches(indices, job.lengths, job.config.batch_tokens):
        instances = [split[int(job.instance_ids[i])] for i in batch]
        result = scorer.score_with_features(instances) if job.config.features else scorer.score(instances)
        ids.append(job.instance_ids[batch])
        columns.append(list(result))
        if on_batch is not None:
            on_batch(int(job.lengths[batch].sum()))
    ids_ = np.concatenate(ids)
    order = np.argsort(ids_, kind="stable")
    sums, counts, *features = (np.concatenate(parts)[order] for parts in zip(*columns))
    data = {"instance_id": ids_[order], "n_scored": counts.astype(np.int32), "logp_sum": sums}
    if not features:
        return pa.table(data, schema=SCORE_SCHEMA)
    hidden, quantiles = features
    data["hidden"] = pa.FixedSizeListArray.from_arrays(pa.array(hidden.astype(np.float16).ravel()), hidden.shape[1])
    data["logp_quantiles"] = pa.FixedSizeListArray.from_arrays(pa.array(quantiles.ravel()), quantiles.shape[1])
    return pa.table(data, schema=feature_schema(hidden.shape[1]))


def write_part(job: ScoreJob, part: int, table: pa.Table) -> None:
    atomic_write(job.part_path(part), lambda p: pq.write_table(table, p))


def read_scores(output: str | Path) -> pa.Table:
    """All rows of a finished scoring run, sorted by instance_id."""
    output = Path(output)
    manifest = read_manifest(output)
    if manifest is None or manifest.get("stage") not in ("score", "proxy"):  # a proxy table has the same rows
        raise FileNotFoundError(f"{output} holds no finished scoring run (no score manifest.json)")
    parts = sorted((output / "parts").glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else SCORE_SCHEMA.empty_table()
    return table.sort_by("instance_id")


def _plan(config: ScoreConfig, corpus: PackedCorpus, output: Path) -> ScoreJob:
    split = corpus.split(config.split)
    count = len(split) if config.max_instances is None else min(config.max_instances, len(split))
    lengths = split.table.column("n_tokens").to_numpy()[:count].astype(np.int64)
    instance_ids = split.table.column("instance_id").to_numpy()[:count]
    if config.instances is not None:
        wanted = subset_ids(config.instances, count, f"{corpus.path}/{config.split}")
        lengths, instance_ids = lengths[wanted], instance_ids[wanted]
    return ScoreJob(config, output, lengths, instance_ids, plan_parts(lengths, config.part_tokens))


def subset_ids(path: str | Path, count: int, where: str) -> np.ndarray:
    """The instance ids of an `instances` file, checked: integers, sorted, distinct, within the split."""
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"instances: {path} is not a .npy array of instance ids ({exc})") from None
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"instances: {path} holds a {ids.dtype} array of shape {ids.shape}, not a list of ids")
    if len(ids) and (ids[0] < 0 or ids[-1] >= count or np.any(np.diff(ids) <= 0)):
        raise ValueError(f"instances: {path} must list distinct ids in increasing order within the {count:,} "
                         f"instances of {where}")
    return ids.astype(np.int64)


class Score(Stage):
    name = "score"
    config = ScoreConfig
    in_place = True  # parts survive a kill

    def inputs(self, config: ScoreConfig, log) -> dict:
        inputs = {"corpus": PackedCorpus(config.corpus).key, "model": source_fingerprint(config.model),
                  "tokenizer": source_fingerprint(config.tokenizer) if config.tokenizer else None}
        if config.instances:
            inputs["instances"] = file_sha256(config.instances)
        return inputs

    def intact(self, output: Path, manifest: dict) -> bool:
        return len(list((output / "parts").glob("part-*.parquet"))) == manifest["parts"]

    def run(self, config: ScoreConfig, output: Path, inputs: dict, log) -> dict:
        rank, world, local_rank = distributed.rank_world()
        corpus = PackedCorpus(config.corpus)
        split = corpus.split(config.split)
        job = _plan(config, corpus, output)
        lengths = job.lengths
        if rank == 0:
            open_parts(output)
            update_plan(output, parts=len(job.parts), instances=int(len(lengths)))
        distributed.barrier()
        todo = [p for p in range(len(job.parts)) if not job.done(p)]
        if rank == 0:
            if len(todo) < len(job.parts):
                log(f"score: resuming {output}: {len(job.parts) - len(todo)} of {len(job.parts)} parts already done")
        scorer, model, context = build_scorer(config, corpus, local_rank, log)
        longest = int(lengths.max()) if len(lengths) else 0
        if context is not None and longest - 1 > context:
            raise ValueError(f"instances of {config.corpus}/{config.split} hold up to {longest - 1} positions but "
                             f"model '{config.model}' has a context of {context}; re-run `miniplm prepare` with "
                             f"max_len <= {context}")
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
        if rank != 0:
            return {}
        tokens_this_run = int(sum(lengths[job.parts[p]].sum() for p in todo))
        missing = [p for p in range(len(job.parts)) if not job.done(p)]
        if missing:
            raise RuntimeError(f"{len(missing)} parts of {output} are missing after the run: {missing[:10]}")
        rows = read_scores_parts(job)
        return dict(
            model={"spec": config.model, "fingerprint": inputs["model"], "weights": weights_description(config.model),
                   "class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
                   "context": context, "chunked_head": scorer.chunked_head},
            precision={"setting": config.precision, "autocast": str(scorer.autocast_dtype),
                       "log_softmax": "float32", "sum": "float64"},
            corpus={"path": str(corpus.path), "key": corpus.key, "split": config.split,
                    "tokenizer_fingerprint": corpus.manifest["tokenizer"]["fingerprint"],
                    "max_len": corpus.manifest["max_len"]},
            masked_input_ids=sorted(int(i) for i in scorer.masked_input_ids.tolist()),
            features={"hidden": "mean final hidden state over the scored positions (after the final norm), "
                                "float16", "hidden_size": int(model.get_output_embeddings().weight.shape[1]),
                      "logp_quantiles": list(LOGP_QUANTILES)} if config.features else None,
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
        )

    def summary(self, manifest: dict) -> str:
        c = manifest["config"]
        return (f"scored {manifest['instances']:,} instances ({manifest['tokens_scored']:,} positions) of "
                f"{c['corpus']}/{c['split']} with {c['model']} into {manifest['output']} in "
                f"{manifest['wall_seconds']:.1f} s")


def score(config: ScoreConfig, force: bool = False, log=print) -> StageResult:
    """Score every instance (resuming a killed run, or reusing an up-to-date one)."""
    return execute(Score(), config, force, log)


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
            write_part(job, part, score_part(scorer, split, job, part, on_batch=advance))
            stop.check()


class _RayPartScorer:
    """A Ray actor: loads the model once, then scores and writes whole parts."""

    def __init__(self, job: ScoreJob, threads: int):
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
        import ray  # optional, heavy: the ray extra, imported only for --executor ray
    except ImportError:
        raise ImportError("--executor ray needs Ray Data: pip install 'miniplm[ray]'") from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=job.config.ray_address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        stop.reclaim()  # ray.init replaces the SIGTERM handler with one that exits
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
                stop.check()  # the actors' parts in flight are abandoned when Ray shuts down
    finally:
        if started_here:
            ray.shutdown()
