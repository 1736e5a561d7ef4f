"""`miniplm select`: Difference Sampling and the other selectors, exact at any scale.

The teacher's and the reference's scoring runs are joined on instance_id into on-disk arrays (numpy
memmaps in `<output>.partial/work`, so RAM stays flat), a key is computed per instance, and the exact top
of the ranking (key descending, ties by instance_id) is found by a streaming radix select
(`miniplm.selection.topk`). Selectors and their keys, with per-token mean log-probs t (teacher), f (ref):
    difference   r = t - f                  the paper: hard for the small model, likely for the teacher
    teacher-ppl  t                          keep the lowest teacher loss
    ref-ppl      f (low), -f (high), -|f - median f| (middle)   perplexity pruning with the small model
    random       a seeded uniform per instance
    classifier   log-odds of a linear classifier on hashed n-grams: target text against the pool (no model)
With `temperature`, the key becomes key / temperature + Gumbel noise (seeded per instance): Gumbel-top-k,
i.e. sampling without replacement with probability proportional to exp(key / temperature).
Output: `instances.parquet` (every instance of the split, in corpus order: instance_id, domain, n_tokens,
teacher_logp, ref_logp, key, selected) and `manifest.json` (inputs, the cut, per-domain counts).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from miniplm.core.apportion import largest_remainder
from miniplm.core.config import ConfigError, Progress, option, require_at_least_one, to_dict
from miniplm.core.hashing import uniform_hash
from miniplm.core.manifest import part_path, read_manifest, read_plan
from miniplm.core.stage import Stage, StageResult, execute
from miniplm.data import ngram
from miniplm.data.shards import PackedCorpus
from miniplm.selection.classifier import check_target, classifier_keys
from miniplm.selection.report import write_report
from miniplm.selection.topk import Cut, exact_top
from miniplm.selection.unigram import unigram_keys

CHUNK = 1 << 20
NEEDS = {"difference": ("teacher", "reference"), "teacher-ppl": ("teacher",), "ref-ppl": ("reference",),
         "random": (), "classifier": (), "unigram": ()}

ROW_SCHEMA = pa.schema([("instance_id", pa.int64()), ("domain", pa.string()), ("n_tokens", pa.int32()),
                        ("teacher_logp", pa.float64()), ("ref_logp", pa.float64()), ("key", pa.float64()),
                        ("selected", pa.bool_())])


@dataclass
class SelectConfig(Progress):
    corpus: str = option("out/corpus", "the `miniplm prepare` output the scores belong to")
    split: str = option("train", "the scored split")
    teacher: str | None = option("out/scores/teacher", "the teacher's `miniplm score` output")
    reference: str | None = option("out/scores/ref", "the reference model's `miniplm score` output")
    output: str = option("out/selection", "output directory", hashed=False)
    selector: Literal["difference", "teacher-ppl", "ref-ppl", "random", "classifier", "unigram"] = option(
        "difference", "difference (MiniPLM), teacher-ppl, ref-ppl, random, classifier (log-odds of a hashed "
        "n-gram logistic regression: --target against the pool; no model), or unigram (mean log-prob under its "
        "domain's add-one unigram model of the pool: most typical first; no model)")
    ref_band: Literal["low", "middle", "high"] = option(
        "middle", "ref-ppl: keep the lowest, the middle or the highest reference losses")
    alpha: float = option(0.5, "fraction of instances to keep, in (0, 1] (ignored with budget_tokens)")
    budget_tokens: int | None = option(None, "keep instances up to this many tokens instead of a fraction")
    temperature: float | None = option(None, "Gumbel-top-k sampling at this temperature instead of a hard cut")
    domain_quota: str | dict[str, float] = option(
        "none", "none (one global cut), proportional (each domain keeps its share of the corpus), "
        "from:<selection dir> (copy that selection's per-domain mix), or a mapping {domain: share}")
    target: str | None = option(
        None, "classifier: the text to keep more of: a split of the corpus (e.g. ref) or files/globs as prepare "
        "reads them; never the pool or an evaluation split", hashed="when-set")
    classifier_ngrams: int = option(2, "classifier: word n-grams of 1..N words", hashed="when-set")
    classifier_features: int = option(1 << 20, "classifier: hashed feature dimensions", hashed="when-set")
    classifier_sample: int = option(10000, "classifier: at most this many target documents, and as many pool "
                                    "instances drawn as negatives", hashed="when-set")
    seed: int = option(10, "seed of the random selector, of Gumbel noise and of the classifier's negatives")
    max_instances: int | None = option(
        None, "select among the first N instances of the split only (what `miniplm score --max-instances N` "
        "scored; for quick runs)")
    report: bool = option(True, "write the selection report (markdown + PNG) into the output", hashed=False)
    diagnostic_splits: list[str] | None = option(
        None, "held-out splits for the n-gram diagnostic: unigram and bigram models fitted on the kept data and on "
        "the whole pool, scored on these splits (null: every non-empty split but the selected one and ref; "
        "[]: none)")
    diagnostic_max_instances: int | None = option(1000, "the diagnostic's first N instances of each split")

    def validate(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ConfigError(f"alpha: must be in (0, 1], got {self.alpha}")
        require_at_least_one(self, "max_instances", "classifier_ngrams")
        if self.classifier_features < 2 or self.classifier_sample < 2:
            raise ConfigError("classifier_features and classifier_sample: must be at least 2")
        if self.budget_tokens is not None and self.budget_tokens < 1:
            raise ConfigError(f"budget_tokens: must be a positive number of tokens, got {self.budget_tokens}")
        if self.temperature is not None and not self.temperature > 0:
            raise ConfigError(f"temperature: must be positive, got {self.temperature}")
        if isinstance(self.domain_quota, str) and self.domain_quota not in ("none", "proportional") \
                and not self.domain_quota.startswith("from:"):
            raise ConfigError(f"domain_quota: use none, proportional, from:<dir> or a mapping, "
                              f"got {self.domain_quota!r}")
        if isinstance(self.domain_quota, dict) and (not self.domain_quota or min(self.domain_quota.values()) < 0):
            raise ConfigError("domain_quota: a mapping needs at least one domain and no negative share")


EDGE_DOMAIN_SHARE = 0.10  # a domain this large a share of the pool's tokens, with no teacher edge, is warned of


def teacher_edge(arrays: ScoreArrays, log) -> dict[str, dict]:
    """Per domain, the teacher's edge over the reference on the pool: token-weighted mean of (mean log p_teacher
    - mean log p_ref), and the domain's share of the pool's tokens. Where the edge is not positive, r ranks that
    domain by what the reference finds easy rather than by what the teacher knows better: select warns when such
    a domain holds more than EDGE_DOMAIN_SHARE of the pool."""
    sums = np.zeros(len(arrays.domain_names))
    tokens = np.zeros(len(arrays.domain_names))
    for s in arrays.chunks():
        gap = arrays.teacher[s] - arrays.reference[s]
        ok = np.isfinite(gap)
        codes, weights = arrays.domain_codes[s][ok], arrays.n_tokens[s][ok].astype(np.float64)
        sums += np.bincount(codes, weights=gap[ok] * weights, minlength=len(sums))
        tokens += np.bincount(codes, weights=weights, minlength=len(tokens))
    out = {}
    for d, name in enumerate(arrays.domain_names):
        edge = float(sums[d] / tokens[d]) if tokens[d] else None
        share = float(tokens[d] / max(tokens.sum(), 1))
        out[name] = {"edge": edge, "token_share": share}
        if edge is not None and edge <= 0 and share > EDGE_DOMAIN_SHARE:
            log(f"select: warning: in domain '{name}' ({share:.0%} of the pool's tokens) the teacher has no edge "
                f"over the reference (mean log p_teacher - mean log p_ref = {edge:+.3f} nats/token): r there ranks "
                f"by what the reference finds easy, not by what the teacher knows better (consider a teacher "
                f"adapted to this data, or a random draw within this domain)")
    return out


class ScoreArrays:
    """Per-instance columns of one split, on disk: mean log-probs joined from the scoring runs."""

    def __init__(self, corpus: PackedCorpus, split: str, work: Path, max_instances: int | None = None):
        table = corpus.split(split).table
        if max_instances is not None:
            table = table.slice(0, max_instances)
        self.n = table.num_rows
        self.subset = max_instances is not None
        ids = table.column("instance_id").to_numpy()
        if not np.array_equal(ids, np.arange(self.n)):
            raise ValueError(f"{corpus.path}/{split}: instance ids are not 0..N-1; the corpus is damaged")
        self.n_tokens = table.column("n_tokens").to_numpy().astype(np.int64)
        encoded = table.column("domain").combine_chunks().dictionary_encode()
        self.domain_names: list[str] = encoded.dictionary.to_pylist()
        self.domain_codes = encoded.indices.to_numpy().astype(np.int32)
        self.work = work
        self.teacher: np.ndarray | None = None
        self.reference: np.ndarray | None = None
        self.classifier: np.ndarray | None = None
        self.unigram: np.ndarray | None = None

    def load(self, name: str, run_dir: str, corpus: PackedCorpus, split: str) -> None:
        """Join one scoring run, refusing runs of another corpus, unfinished runs and missing rows."""
        run = Path(run_dir)
        manifest = read_manifest(run)
        if manifest is None or manifest.get("stage") not in ("score", "proxy"):  # a proxy table reads alike
            plan = read_plan(run)
            if plan is not None and "parts" in plan:
                parts = plan["parts"]
                missing = [p for p in range(parts) if not part_path(run, p).is_file()]
                raise ValueError(f"{name} scores at {run} are unfinished: {len(missing)} of {parts} parts are "
                                 f"missing (parts {missing[:10]}{'...' if len(missing) > 10 else ''}); rerun the "
                                 f"same `miniplm score` command to finish them")
            raise FileNotFoundError(f"no {name} scores at {run} (no score manifest.json); run `miniplm score`")
        scored = manifest["corpus"]
        if scored["key"] != corpus.key or scored["split"] != split:
            raise ValueError(f"{name} scores at {run} belong to corpus {scored['path']} (key {scored['key']}, split "
                             f"{scored['split']}), not to {corpus.path} (key {corpus.key}, split {split}): the "
                             f"corpus was re-prepared or the path is wrong; score it again")
        values = np.lib.format.open_memmap(self.work / f"{name}.npy", mode="w+", dtype=np.float64, shape=(self.n,))
        values[:] = np.nan
        seen = np.zeros(self.n, dtype=bool)
        parts = sorted((run / "parts").glob("part-*.parquet"))
        for part in parts:
            t = pq.read_table(part)
            ids = t.column("instance_id").to_numpy()
            n = t.column("n_scored").to_numpy()
            s = t.column("logp_sum").to_numpy()
            inside = ids < self.n
            if not inside.all() and not self.subset:
                raise ValueError(f"{part}: instance ids beyond the {self.n} instances of {corpus.path}/{split}")
            ids, n, s = ids[inside], n[inside], s[inside]
            with np.errstate(divide="ignore", invalid="ignore"):
                values[ids] = np.where(n > 0, s / np.maximum(n, 1), np.nan)
            seen[ids] = True
        if not seen.all():
            missing = np.flatnonzero(~seen)
            raise ValueError(f"{name} scores at {run} cover {int(seen.sum()):,} of {self.n:,} instances of "
                             f"{corpus.path}/{split}: {len(missing):,} are missing (e.g. ids "
                             f"{missing[:5].tolist()}); score the whole split, or select among the scored "
                             f"instances with --max-instances")
        values.flush()
        setattr(self, name, values)

    def chunks(self) -> Iterator[slice]:
        for start in range(0, self.n, CHUNK):
            yield slice(start, min(start + CHUNK, self.n))


def _keys(config: SelectConfig, arrays: ScoreArrays, s: slice, median: float | None) -> np.ndarray:
    ids = np.arange(s.start, s.stop, dtype=np.int64)
    t = arrays.teacher[s] if arrays.teacher is not None else None
    f = arrays.reference[s] if arrays.reference is not None else None
    if config.selector == "difference":
        key = t - f
    elif config.selector == "teacher-ppl":
        key = t.copy()
    elif config.selector == "ref-ppl":
        key = {"low": f, "high": -f, "middle": -np.abs(f - (median if median is not None else 0.0))}[config.ref_band]
    elif config.selector == "classifier":
        key = arrays.classifier[s].copy()
    elif config.selector == "unigram":
        key = arrays.unigram[s].copy()
    else:
        key = uniform_hash(config.seed, ids)
    if config.temperature is not None:
        with np.errstate(divide="ignore"):
            gumbel = -np.log(-np.log(uniform_hash(config.seed + 1, ids)))
        key = key / config.temperature + gumbel
    return np.asarray(key, dtype=np.float64)


def _domain_targets(total: int, shares: dict[int, float], caps: dict[int, int]) -> dict[int, int]:
    """Integer targets summing to `total`, proportional to `shares`, none above what its domain holds."""
    domains = sorted(shares)
    out = dict(zip(domains, (int(k) for k in largest_remainder(total, [shares[d] for d in domains]))))
    for d, k in out.items():
        if k > caps[d]:
            raise ValueError(f"domain quota asks {k:,} for a domain that has only {caps[d]:,} to give; lower "
                             f"alpha/budget_tokens or that domain's share")
    return out


class Select(Stage):
    name = "select"
    config = SelectConfig

    def inputs(self, config: SelectConfig, log) -> dict:
        corpus = PackedCorpus(config.corpus)
        for name in diagnostic_splits(config, corpus):
            corpus.split(name)  # an unknown split is refused before any work, listing the ones that exist
        runs = _score_runs(config)
        for name in NEEDS[config.selector]:
            if runs[name] is None:
                raise ConfigError(f"selector {config.selector} needs {name} scores: set --{name}")
        quota = None
        if isinstance(config.domain_quota, str) and config.domain_quota.startswith("from:"):
            source = read_manifest(config.domain_quota[5:])
            if source is None or source.get("stage") != "select":
                raise FileNotFoundError(f"domain_quota: {config.domain_quota[5:]} is not a `miniplm select` output")
            quota = source["key"]
        target = {}
        if config.selector == "classifier":
            target = {"target": check_target(config.target, corpus, config.split, diagnostic_splits(config, corpus))}
        return {"corpus": corpus.key, "domain_quota": quota,
                "scores": {name: (read_manifest(runs[name]) or {}).get("key") for name in NEEDS[config.selector]},
                **target}

    def run(self, config: SelectConfig, out: Path, inputs: dict, log) -> dict:
        corpus = PackedCorpus(config.corpus)
        needs = NEEDS[config.selector]
        runs = _score_runs(config)
        quota_source = read_manifest(config.domain_quota[5:]) if inputs["domain_quota"] else None
        work = out / "work"
        work.mkdir()
        arrays = ScoreArrays(corpus, config.split, work, config.max_instances)
        for name in needs:
            arrays.load(name, runs[name], corpus, config.split)
        signal = {}
        if config.selector == "classifier":
            arrays.classifier, signal["classifier"] = classifier_keys(
                config.target, corpus, config.split, arrays.n, work / "classifier.npy", config.classifier_ngrams,
                config.classifier_features, config.classifier_sample, config.seed, log)

        if config.selector == "unigram":
            arrays.unigram, signal["unigram"] = unigram_keys(corpus, config.split, arrays.n, arrays.domain_codes,
                                                  len(arrays.domain_names), work / "unigram.npy")

        median = None
        if config.selector == "ref-ppl" and config.ref_band == "middle":
            finite = int(np.isfinite(arrays.reference).sum())
            cut = exact_top(_stream(arrays, lambda s: arrays.reference[s]), (finite + 1) // 2)
            median = _key_of(cut) if cut is not None else 0.0
        by_tokens = config.budget_tokens is not None

        def keys_of(s: slice) -> np.ndarray:
            return _keys(config, arrays, s, median)

        valid = np.zeros(len(arrays.domain_names), dtype=np.int64)
        valid_tokens = np.zeros(len(arrays.domain_names), dtype=np.int64)
        invalid = 0
        for s in arrays.chunks():
            ok = np.isfinite(keys_of(s))
            invalid += int((~ok).sum())
            codes = arrays.domain_codes[s][ok]
            valid += np.bincount(codes, minlength=len(valid))
            valid_tokens += np.bincount(codes, weights=arrays.n_tokens[s][ok], minlength=len(valid)).astype(np.int64)
        if invalid:
            log(f"select: {invalid:,} instances have NaN or infinite scores (no scored position, or a model "
                f"overflow): excluded from selection")
        total_available = int(valid_tokens.sum() if by_tokens else valid.sum())
        if by_tokens and config.budget_tokens > total_available:
            raise ValueError(f"budget_tokens {config.budget_tokens:,} exceeds the {total_available:,} tokens of "
                             f"{corpus.path}/{config.split} that can be selected")
        target = config.budget_tokens if by_tokens else math.floor(config.alpha * int(valid.sum()))

        cuts: dict[int | None, Cut | None] = {}
        if config.domain_quota == "none":
            cuts[None] = exact_top(_stream(arrays, keys_of, None, by_tokens), target, by_weight=by_tokens)
        else:
            caps = {d: int((valid_tokens if by_tokens else valid)[d]) for d in range(len(valid))}
            if config.domain_quota == "proportional":
                shares = {d: float(c) for d, c in caps.items()}
            elif isinstance(config.domain_quota, dict):
                unknown = set(config.domain_quota) - set(arrays.domain_names)
                if unknown:
                    raise ValueError(f"domain_quota names domains the corpus does not have: {sorted(unknown)}; "
                                     f"it has {arrays.domain_names}")
                shares = {d: float(config.domain_quota.get(name, 0.0)) for d, name in enumerate(arrays.domain_names)}
            else:
                mix = quota_source["domains"]
                field = "kept_tokens" if by_tokens else "kept"
                shares = {d: float(mix.get(name, {}).get(field, 0)) for d, name in enumerate(arrays.domain_names)}
            for d, k in _domain_targets(target, shares, caps).items():
                cuts[d] = exact_top(_stream(arrays, keys_of, d, by_tokens), k, by_weight=by_tokens)

        domains = _write_rows(out / "instances.parquet", arrays, config, median, cuts)
        if arrays.teacher is not None and arrays.reference is not None:
            signal["teacher_edge"] = teacher_edge(arrays, log)
        kept = sum(v["kept"] for v in domains.values())
        facts = dict(
            corpus={"path": str(corpus.path), "key": corpus.key, "split": config.split},
            scores={name: {"path": runs[name], "key": inputs["scores"][name]} for name in needs},
            instances=arrays.n,
            invalid_scores=invalid,
            target=({"budget_tokens": config.budget_tokens} if by_tokens
                    else {"alpha": config.alpha, "instances": target}),
            kept=kept,
            kept_tokens=sum(v["kept_tokens"] for v in domains.values()),
            cuts={("all" if d is None else arrays.domain_names[d]): (None if c is None else
                  {"key": _key_of(c), "instance_id": int(np.iinfo(np.int64).max - c.rid), "passes": c.passes})
                  for d, c in cuts.items()},
            median_ref_logp=median,
            domains=domains,
            **signal,
        )
        for path in work.iterdir():
            path.unlink()
        work.rmdir()
        splits = diagnostic_splits(config, corpus)
        if splits:
            selected = pq.read_table(out / "instances.parquet", columns=["instance_id", "selected"])
            ids = selected.column("instance_id").to_numpy()
            facts["ngram_diagnostic"] = ngram.diagnostic(
                corpus, config.split, {"pool": ids, "kept": ids[selected.column("selected").to_numpy()]}, splits,
                config.diagnostic_max_instances)
        if config.report:
            # written into the staged directory, which becomes config.output: name the final place
            report = write_report(out, {**facts, "config": to_dict(config)})
            log(f"select: report in {Path(config.output) / report.name} (figures in {Path(config.output) / 'report'})")
        return facts

    def summary(self, manifest: dict) -> str:
        c = manifest["config"]
        return (f"selected {manifest['kept']:,} of {manifest['instances']:,} instances ({manifest['kept_tokens']:,} "
                f"tokens) of {c['corpus']}/{c['split']} with {c['selector']} into {manifest['output']}")


def diagnostic_splits(config: SelectConfig, corpus: PackedCorpus) -> list[str]:
    if config.diagnostic_splits is not None:
        return config.diagnostic_splits
    return [name for name, facts in corpus.manifest["splits"].items()
            if name not in (config.split, "ref") and facts.get("instances")]


def _score_runs(config: SelectConfig) -> dict[str, str | None]:
    return {"teacher": config.teacher, "reference": config.reference}


def select(config: SelectConfig, force: bool = False, log=print) -> StageResult:
    """Select (or reuse an up-to-date selection)."""
    return execute(Select(), config, force, log)


def _stream(arrays: ScoreArrays, keys_of, domain: int | None = None, by_tokens: bool = False):
    """A re-iterable stream of (ids, finite keys, weights), optionally of one domain only."""

    def stream():
        for s in arrays.chunks():
            keys = keys_of(s)
            ids = np.arange(s.start, s.stop, dtype=np.int64)
            ok = np.isfinite(keys)
            if domain is not None:
                ok &= arrays.domain_codes[s] == domain
            weights = arrays.n_tokens[s] if by_tokens else np.ones(len(ids), dtype=np.int64)
            yield ids[ok], keys[ok], weights[ok]

    return stream


def _key_of(cut: Cut) -> float:
    """The float key at the cut (inverse of topk.sortable)."""
    u = np.uint64(cut.ukey)
    bits = u ^ np.uint64(1 << 63) if u >> np.uint64(63) else ~u
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


def _write_rows(path: Path, arrays: ScoreArrays, config: SelectConfig, median, cuts) -> dict:
    """Every instance in corpus order with its scores, key and selected flag; per-domain counts."""
    names = arrays.domain_names
    counts = {n: {"instances": 0, "tokens": 0, "kept": 0, "kept_tokens": 0} for n in names}
    with pq.ParquetWriter(path, ROW_SCHEMA) as writer:
        for s in arrays.chunks():
            ids = np.arange(s.start, s.stop, dtype=np.int64)
            keys = _keys(config, arrays, s, median)
            codes = arrays.domain_codes[s]
            chosen = np.zeros(len(ids), dtype=bool)
            finite = np.isfinite(keys)
            for d, cut in cuts.items():
                if cut is None:
                    continue
                scope = finite if d is None else finite & (codes == d)
                chosen |= scope & cut.selects(ids, np.where(finite, keys, 0.0))
            tokens = arrays.n_tokens[s]
            for d in range(len(names)):
                here = codes == d
                c = counts[names[d]]
                c["instances"] += int(here.sum())
                c["tokens"] += int(tokens[here].sum())
                c["kept"] += int((here & chosen).sum())
                c["kept_tokens"] += int(tokens[here & chosen].sum())
            writer.write_table(pa.table({
                "instance_id": ids,
                "domain": pa.DictionaryArray.from_arrays(codes, names).cast(pa.string()),
                "n_tokens": tokens.astype(np.int32),
                "teacher_logp": arrays.teacher[s] if arrays.teacher is not None else np.full(len(ids), np.nan),
                "ref_logp": arrays.reference[s] if arrays.reference is not None else np.full(len(ids), np.nan),
                "key": keys,
                "selected": chosen,
            }, schema=ROW_SCHEMA))
    return counts
