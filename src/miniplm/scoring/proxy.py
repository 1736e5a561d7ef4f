"""`miniplm proxy`: the teacher labels a fraction of the pool, a cheap predictor ranks the rest.

The teacher's forward pass is MiniPLM's whole offline cost. The reference scores every instance anyway; with
`score --features` it also keeps, per instance, its mean final hidden state and quantiles of its per-token
log-probs. From those (with length and domain) a predictor learns the teacher's mean log-prob on a labelled
sample and predicts it, hence r = teacher - reference, for the rest.

Difference Sampling keeps a top fraction, so only the order near the cut matters. The labels are spent in
rounds: a seeded random sample stratified by domain first (`first_fraction` of the budget), then `rounds`
rounds that each label the unlabelled instances whose predicted r is nearest the current cut, in units of the
predictor's cross-validated error (per domain where the selection cuts per domain), until the budget is spent.

Each round's labels are an ordinary `miniplm score` job over that round's instances (`labels/round-NN`), so
torchrun, Ray and resume work as for any scoring run, and the exact rows are bit for bit those of a plain
`score` of the same instances. The output has the layout of a score run (parts/ with instance_id, n_scored,
logp_sum, plus `exact`), so `miniplm select --teacher <proxy output>` reads it like an exact one; exact rows
keep the teacher's own score, predicted rows get the predicted mean log-prob times their scored positions.

Output directory: plan.json, labels/round-NN.npy (the ids each round labels) and labels/round-NN/ (their
score run), parts/part-000000.parquet (the table select reads), predictions.parquet (per instance: the
predicted and, where labelled, the exact mean log-prob, the round that labelled it, the cross-validated
prediction of labelled rows), report.md and scatter.png, manifest.json.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from miniplm.core import distributed
from miniplm.core.apportion import largest_remainder
from miniplm.core.config import ConfigError, Progress, option
from miniplm.core.flops import forward_flops
from miniplm.core.hashing import uniform_hash
from miniplm.core.manifest import read_manifest, update_plan, write_json_atomic
from miniplm.core.stage import Stage, StageResult, execute
from miniplm.core.tokenizer import source_fingerprint
from miniplm.data.shards import PackedCorpus, atomic_write
from miniplm.scoring.score import SCORE_SCHEMA, Score, ScoreConfig, read_scores

PROXY_SCHEMA = SCORE_SCHEMA.append(pa.field("exact", pa.bool_()))
MIN_LABELS = 50  # the predictor's cross-validation needs this many labelled instances with finite features
FOLDS = 5


@dataclass
class ProxyConfig(Progress):
    corpus: str = option("out/corpus", "the `miniplm prepare` output the pool belongs to")
    split: str = option("train", "the pool's split")
    reference: str = option("out/scores/reference", "the reference's `miniplm score --features true` output (the "
                            "features every instance gets from the pass it needs anyway)")
    output: str = option("out/scores/proxy", "output directory: a score table `select --teacher` reads",
                         hashed=False)
    label_fraction: float = option(0.1, "fraction of the pool the teacher labels, in (0, 1] (1: every instance, "
                                   "the exact scores)")
    first_fraction: float = option(0.5, "share of the label budget drawn at random (stratified by domain) before "
                                   "the active rounds, in (0, 1] (1: no active rounds)")
    rounds: int = option(4, "active rounds that spend the rest of the budget on instances nearest the cut")
    alpha: float = option(0.5, "the selection's fraction: the cut the active rounds aim at")
    domain_quota: Literal["none", "proportional"] = option(
        "none", "where the selection cuts: once over the pool (none) or inside each domain (proportional)")
    predictor: Literal["ridge", "boosting"] = option(
        "ridge", "ridge: scikit-learn's RidgeCV on standardised features (fast, smooth); boosting: its "
        "HistGradientBoostingRegressor")
    hidden: bool = option(True, "use the reference's pooled hidden state as features (false: its log-prob "
                          "statistics, length and domain only)")
    seed: int = option(10, "seed of the random first sample and of the cross-validation folds")
    max_instances: int | None = option(None, "the pool: the first N instances of the split (null: the instances "
                                       "the reference scored)")
    exact_teacher: str | None = option(None, "an exact teacher score run of the same pool, for the report only: "
                                       "precision and recall of the kept set against the exact selection")
    teacher: ScoreConfig = field(default_factory=ScoreConfig, metadata={
        "help": "the teacher's scoring jobs (`miniplm score` settings: model, batch_tokens, executor, ...; "
                "corpus, split, output and instances are set by the proxy)"})

    def validate(self) -> None:
        for name in ("label_fraction", "first_fraction", "alpha"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ConfigError(f"{name}: must be in (0, 1], got {value}")
        if self.rounds < 0:
            raise ConfigError(f"rounds: must be >= 0, got {self.rounds}")


@dataclass
class Pool:
    """The pool's per-instance facts: ids 0..n-1, domains, scored positions, the reference's features."""

    n_scored: np.ndarray
    domain: np.ndarray  # int codes
    domain_names: list[str]
    reference: np.ndarray  # mean log p_ref
    features: np.ndarray  # [n, f] float64, NaN rows where the reference gave none
    tokens: np.ndarray  # tokens per instance (what a teacher label costs)

    @property
    def n(self) -> int:
        return len(self.n_scored)


def load_pool(config: ProxyConfig, corpus: PackedCorpus) -> Pool:
    """Join the corpus split and the reference's features, refusing another corpus or a run without features."""
    manifest = read_manifest(config.reference)
    if manifest is None or manifest.get("stage") != "score":
        raise FileNotFoundError(f"reference: no finished `miniplm score` run at {config.reference}")
    if not manifest.get("features"):
        raise ValueError(f"reference: {config.reference} was scored without features; rerun `miniplm score` on it "
                         f"with --features true (the same scores, plus what the proxy predicts from)")
    scored = manifest["corpus"]
    if scored["key"] != corpus.key or scored["split"] != config.split:
        raise ValueError(f"reference: {config.reference} scored {scored['path']}/{scored['split']} (key "
                         f"{scored['key']}), not {corpus.path}/{config.split} (key {corpus.key}): features and "
                         f"labels must come from the same pool; score this corpus with the reference again")
    table = corpus.split(config.split).table
    rows = read_scores(config.reference)
    ids = rows.column("instance_id").to_numpy()
    n = min(len(ids) if config.max_instances is None else config.max_instances, table.num_rows)
    if len(ids) < n or not np.array_equal(ids[:n], np.arange(n)):
        raise ValueError(f"reference: {config.reference} covers {len(ids):,} instances, not the first {n:,} of "
                         f"{corpus.path}/{config.split}; score the whole pool, or set max_instances")
    rows = rows.slice(0, n)
    n_scored = rows.column("n_scored").to_numpy().astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        reference = rows.column("logp_sum").to_numpy() / n_scored
    encoded = table.column("domain").slice(0, n).combine_chunks().dictionary_encode()
    codes = encoded.indices.to_numpy().astype(np.int64)
    names = encoded.dictionary.to_pylist()
    quantiles = np.array(rows.column("logp_quantiles").to_pylist(), dtype=np.float64)
    columns = [reference[:, None], quantiles, np.log(np.maximum(n_scored, 1))[:, None], np.eye(len(names))[codes]]
    if config.hidden:
        columns.append(np.array(rows.column("hidden").to_pylist(), dtype=np.float64))
    tokens = table.column("n_tokens").slice(0, n).to_numpy().astype(np.int64)
    return Pool(n_scored, codes, names, reference, np.hstack(columns), tokens)


def fit_predict(config: ProxyConfig, x: np.ndarray, y: np.ndarray, x_all: np.ndarray):
    """Fit on (x, y); return (predictions for x_all, cross-validated predictions for x)."""
    try:
        from sklearn.ensemble import HistGradientBoostingRegressor
        from sklearn.linear_model import RidgeCV
        from sklearn.model_selection import KFold, cross_val_predict
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise ImportError("miniplm proxy needs scikit-learn: pip install 'miniplm[proxy]'") from None
    if config.predictor == "ridge":
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 4, 15)))
    else:
        model = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, random_state=config.seed)
    folds = KFold(FOLDS, shuffle=True, random_state=config.seed)
    held_out = cross_val_predict(model, x, y, cv=folds)
    model.fit(x, y)
    return model.predict(x_all), held_out


def quotas(pool: Pool, alpha: float, per_domain: bool) -> dict[int | None, int]:
    """How many instances the selection keeps: overall, or per domain (the pool's shares, as `select`)."""
    if not per_domain:
        return {None: math.floor(alpha * pool.n)}
    shares = largest_remainder(math.floor(alpha * pool.n), np.bincount(pool.domain, minlength=len(pool.domain_names)))
    return {d: int(k) for d, k in enumerate(shares)}


def stratified_sample(pool: Pool, count: int, seed: int) -> np.ndarray:
    """`count` instances drawn without replacement, each domain its share (largest remainder), seeded."""
    take = largest_remainder(count, np.bincount(pool.domain, minlength=len(pool.domain_names)))
    order = np.argsort(uniform_hash(seed, np.arange(pool.n)), kind="stable")
    chosen = [order[pool.domain[order] == d][: take[d]] for d in range(len(take))]
    return np.sort(np.concatenate(chosen))


@dataclass
class Labels:
    """The teacher's mean log-prob of the labelled instances, and the round that labelled each."""

    value: np.ndarray  # NaN where unlabelled
    round: np.ndarray  # -1 where unlabelled

    @property
    def labelled(self) -> np.ndarray:
        return self.round >= 0


def active_labels(config: ProxyConfig, pool: Pool, label: Callable[[int, np.ndarray], np.ndarray],
                  log=print) -> tuple[Labels, np.ndarray, np.ndarray, list[dict]]:
    """Spend the label budget: a stratified random sample, then rounds nearest the cut. `label(round, ids)`
    returns the teacher's mean log-prob of those ids. Returns the labels, the predicted teacher mean log-prob
    of every instance, the cross-validated predictions of the labelled ones, and one record per round."""
    budget = min(pool.n, round(config.label_fraction * pool.n))
    first = budget if budget == pool.n else max(1, round(config.first_fraction * budget))
    usable = np.isfinite(pool.features).all(1)
    labels = Labels(np.full(pool.n, np.nan), np.full(pool.n, -1))
    if budget < pool.n and min(first, int(usable.sum())) < MIN_LABELS:  # refused before any teacher time is spent
        _too_few(min(first, int(usable.sum())))
    schedule = [first] + _split(budget - first, config.rounds)
    records, cut_quota = [], quotas(pool, config.alpha, config.domain_quota == "proportional")
    predicted, held_out = np.full(pool.n, np.nan), np.full(pool.n, np.nan)
    for k, size in enumerate(schedule):
        if k == 0:
            ids = stratified_sample(pool, size, config.seed)
        else:
            ids = _nearest_cut(pool, labels, predicted, held_out, cut_quota, size, usable)
        started = time.time()
        labels.value[ids], labels.round[ids] = label(k, ids), k
        seconds = time.time() - started
        fit_rows = labels.labelled & usable & np.isfinite(labels.value)
        if budget < pool.n and fit_rows.sum() < MIN_LABELS:
            _too_few(int(fit_rows.sum()))
        fit_started = time.time()
        if budget < pool.n:
            predicted = np.full(pool.n, np.nan)
            predicted[usable], cv = fit_predict(config, pool.features[fit_rows], labels.value[fit_rows],
                                                pool.features[usable])
            held_out = np.full(pool.n, np.nan)
            held_out[fit_rows] = cv
        records.append({"round": k, "labelled": int(len(ids)), "labelled_tokens": int(pool.tokens[ids].sum()),
                        "label_seconds": round(seconds, 2), "fit_seconds": round(time.time() - fit_started, 2),
                        "cv_rmse": _rmse(held_out, labels.value)})
        log(f"proxy: round {k}: {len(ids):,} instances labelled ({int(labels.labelled.sum()):,} of {budget:,}), "
            f"cross-validated RMSE {records[-1]['cv_rmse']:.4f} nats/token")
    return labels, predicted, held_out, records


def _split(total: int, parts: int) -> list[int]:
    """`total` labels over `parts` rounds as evenly as they go; no empty round."""
    sizes = [total // parts + (1 if i < total % parts else 0) for i in range(max(parts, 0))]
    return [size for size in sizes if size > 0]


def _too_few(labelled: int) -> None:
    raise ValueError(f"label_fraction: {labelled} labelled instances with features, fewer than the {MIN_LABELS} "
                     f"the predictor needs; raise label_fraction or first_fraction")


def _rmse(predicted: np.ndarray, actual: np.ndarray) -> float:
    ok = np.isfinite(predicted) & np.isfinite(actual)
    return float(np.sqrt(np.mean((predicted[ok] - actual[ok]) ** 2))) if ok.any() else float("nan")


def combined_r(pool: Pool, labels: Labels, predicted: np.ndarray) -> np.ndarray:
    """r with the exact teacher score wherever it exists, the predicted one elsewhere."""
    teacher = np.where(labels.labelled, labels.value, predicted)
    return teacher - pool.reference


def _nearest_cut(pool: Pool, labels: Labels, predicted: np.ndarray, held_out: np.ndarray,
                 cut_quota: dict[int | None, int], size: int, usable: np.ndarray) -> np.ndarray:
    """The `size` unlabelled instances whose predicted r lies nearest the cut, in units of the predictor's
    cross-validated error (of their domain, where the cut is per domain)."""
    r = combined_r(pool, labels, predicted)
    distance = np.full(pool.n, np.inf)
    for d, keep in cut_quota.items():
        inside = np.ones(pool.n, bool) if d is None else pool.domain == d
        finite = inside & np.isfinite(r)
        if keep == 0 or not finite.any():
            continue
        cut = np.sort(r[finite])[::-1][min(keep, int(finite.sum())) - 1]
        errors = (held_out - labels.value)[inside & np.isfinite(held_out)]
        sigma = float(np.std(errors)) if len(errors) > 1 else 1.0
        candidates = finite & ~labels.labelled & usable
        distance[candidates] = np.abs(r[candidates] - cut) / max(sigma, 1e-9)
    order = np.argsort(distance, kind="stable")
    return np.sort(order[: min(size, int(np.isfinite(distance).sum()))])


def kept(r: np.ndarray, pool: Pool, cut_quota: dict[int | None, int]) -> np.ndarray:
    """The selection's kept set by r (top per quota; ties broken by instance id)."""
    chosen = np.zeros(pool.n, bool)
    for d, keep in cut_quota.items():
        inside = np.flatnonzero((np.ones(pool.n, bool) if d is None else pool.domain == d) & np.isfinite(r))
        chosen[inside[np.argsort(-r[inside], kind="stable")[:keep]]] = True
    return chosen


class Proxy(Stage):
    name = "proxy"
    config = ProxyConfig
    in_place = True  # each round's labels are a resumable score run

    def inputs(self, config: ProxyConfig, log) -> dict:
        corpus = PackedCorpus(config.corpus)
        reference = read_manifest(config.reference) or {}
        return {"corpus": corpus.key, "reference": reference.get("key"),
                "teacher": source_fingerprint(config.teacher.model)}

    def _teacher(self, config: ProxyConfig, out: Path, k: int) -> ScoreConfig:
        return dataclasses.replace(config.teacher, corpus=config.corpus, split=config.split, max_instances=None,
                                   features=False, output=str(out / "labels" / f"round-{k:02d}"),
                                   instances=str(out / "labels" / f"round-{k:02d}.npy"), progress=config.progress)

    def run(self, config: ProxyConfig, out: Path, inputs: dict, log) -> dict:
        # under torchrun every rank runs the rounds (the same deterministic choices) and shares each label job
        rank = distributed.rank_world()[0]
        corpus = PackedCorpus(config.corpus)
        pool = load_pool(config, corpus)
        (out / "labels").mkdir(exist_ok=True)
        teacher_runs: list[dict] = []
        exact_sums = np.full(pool.n, np.nan)

        def label(k: int, ids: np.ndarray) -> np.ndarray:
            if rank == 0:
                atomic_write(out / "labels" / f"round-{k:02d}.npy", lambda p: _save_ids(p, ids))
            distributed.barrier()
            result = execute(Score(), self._teacher(config, out, k), log=log)
            teacher_runs.append(result.manifest)
            rows = read_scores(result.output)
            labelled, sums = rows.column("instance_id").to_numpy(), rows.column("logp_sum").to_numpy()
            exact_sums[labelled] = sums
            return (sums / rows.column("n_scored").to_numpy())[np.searchsorted(labelled, ids)]

        missing = int((~np.isfinite(pool.features).all(1)).sum())
        if missing:
            log(f"proxy: {missing:,} instances have no finite reference features (NaN or inf): left out of the "
                f"fit and unpredicted, so select drops them unless the teacher labels them")
        if rank == 0:
            update_plan(out, pool=pool.n)
        labels, predicted, held_out, records = active_labels(config, pool, label, log)
        if rank != 0:
            return {}
        for record, run in zip(records, teacher_runs):  # a resumed round's time is its score run's, not ~0
            record["label_seconds"] = run["wall_seconds"]
        teacher_logp = np.where(labels.labelled, exact_sums, predicted * pool.n_scored)
        table = pa.table({"instance_id": np.arange(pool.n, dtype=np.int64), "n_scored": pool.n_scored.astype(np.int32),
                          "logp_sum": teacher_logp, "exact": labels.labelled}, schema=PROXY_SCHEMA)
        (out / "parts").mkdir(exist_ok=True)
        atomic_write(out / "parts" / "part-000000.parquet", lambda p: pq.write_table(table, p))
        pq.write_table(pa.table({"instance_id": np.arange(pool.n), "domain": np.array(pool.domain_names)[pool.domain],
                                 "predicted": predicted, "exact": labels.value, "round": labels.round,
                                 "cross_validated": held_out, "reference": pool.reference}),
                       out / "predictions.parquet")
        facts = self._facts(config, pool, labels, predicted, held_out, records, teacher_runs, corpus)
        write_json_atomic(out / "summary.json", facts["summary"])
        _write_report(out, config, facts, pool, labels, held_out)
        return facts

    def _facts(self, config, pool, labels, predicted, held_out, records, teacher_runs, corpus) -> dict:
        reference = read_manifest(config.reference)
        teacher = teacher_runs[-1]["model"]
        labelled_tokens = int(pool.tokens[labels.labelled].sum())
        label_seconds = sum(r["label_seconds"] for r in records)
        # the exact pass estimated at the label jobs' scoring throughput (model loading left out)
        throughput = sum(r["throughput"]["tokens_this_run"] for r in teacher_runs) / max(
            sum(r["throughput"]["scoring_seconds"] for r in teacher_runs), 1e-9)
        pool_tokens = int(pool.tokens.sum())
        summary = {
            "pool": pool.n, "labelled": int(labels.labelled.sum()), "label_fraction": config.label_fraction,
            "nan_features": int((~np.isfinite(pool.features).all(1)).sum()),
            "cross_validated": agreement(held_out, labels.value),
            "rounds": records,
            "cost": {"reference": {"tokens": reference["tokens_scored"], "seconds": reference["wall_seconds"],
                                   "flops": forward_flops(reference["model"]["parameters"],
                                                          reference["tokens_scored"])},
                     "teacher_labels": {"tokens": labelled_tokens, "seconds": round(label_seconds, 2),
                                        "flops": forward_flops(teacher["parameters"], labelled_tokens)},
                     "predictor_seconds": round(sum(r["fit_seconds"] for r in records), 2),
                     "exact_teacher_estimate": {"tokens": pool_tokens,
                                                "seconds": round(pool_tokens / max(throughput, 1e-9), 1),
                                                "flops": forward_flops(teacher["parameters"], pool_tokens)}},
        }
        if config.exact_teacher:
            summary["against_exact"] = against_exact(config, pool, labels, predicted, read_scores(config.exact_teacher))
        return {"corpus": {"path": str(corpus.path), "key": corpus.key, "split": config.split,
                           "tokenizer_fingerprint": corpus.manifest["tokenizer"]["fingerprint"],
                           "max_len": corpus.manifest["max_len"]},
                "model": teacher, "instances": pool.n, "exact_rows": int(labels.labelled.sum()),
                "tokens_scored": int(pool.n_scored.sum()), "parts": 1, "summary": summary}

    def intact(self, output: Path, manifest: dict) -> bool:
        return (output / "parts" / "part-000000.parquet").is_file()

    def summary(self, manifest: dict) -> str:
        s = manifest["summary"]
        return (f"proxy: the teacher labelled {s['labelled']:,} of {s['pool']:,} instances "
                f"({s['cost']['teacher_labels']['tokens']:,} tokens); cross-validated Spearman "
                f"{s['cross_validated']['spearman']:.3f}; table for `select --teacher` in {manifest['output']}")


def _save_ids(path: Path, ids: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a handle: np.save would append ".npy" to the temporary name
        np.save(fh, ids.astype(np.int64))


def agreement(predicted: np.ndarray, actual: np.ndarray) -> dict:
    from scipy.stats import spearmanr

    ok = np.isfinite(predicted) & np.isfinite(actual)
    if ok.sum() < 3:
        return {"rows": int(ok.sum()), "spearman": float("nan"), "rmse": float("nan")}
    return {"rows": int(ok.sum()), "spearman": float(spearmanr(predicted[ok], actual[ok])[0]),
            "rmse": _rmse(predicted, actual)}


def against_exact(config: ProxyConfig, pool: Pool, labels: Labels, predicted: np.ndarray, exact: pa.Table) -> dict:
    """The kept set's precision and recall against the selection exact teacher scores make."""
    if exact.num_rows < pool.n or not np.array_equal(exact.column("instance_id").to_numpy()[: pool.n],
                                                      np.arange(pool.n)):
        raise ValueError(f"exact_teacher: {config.exact_teacher} does not cover the {pool.n:,} instances of the pool")
    sums = exact.column("logp_sum").to_numpy()[: pool.n]
    teacher = sums / np.maximum(exact.column("n_scored").to_numpy()[: pool.n], 1)
    cut_quota = quotas(pool, config.alpha, config.domain_quota == "proportional")
    truth = kept(teacher - pool.reference, pool, cut_quota)
    mine = kept(combined_r(pool, labels, predicted), pool, cut_quota)
    both = int((truth & mine).sum())
    return {"precision": both / max(int(mine.sum()), 1), "recall": both / max(int(truth.sum()), 1),
            "unlabelled_spearman": agreement(np.where(labels.labelled, np.nan, predicted), teacher)["spearman"]}


def _write_report(out: Path, config: ProxyConfig, facts: dict, pool: Pool, labels: Labels,
                  held_out: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = facts["summary"]
    ok = np.isfinite(held_out) & np.isfinite(labels.value)
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.scatter(labels.value[ok], held_out[ok], s=4, alpha=0.5)
    low, high = (float(np.min(labels.value[ok])), float(np.max(labels.value[ok]))) if ok.any() else (0.0, 1.0)
    axis.plot([low, high], [low, high], color="grey", linewidth=1)
    axis.set_xlabel("teacher mean log-prob (exact)")
    axis.set_ylabel("predicted (cross-validated)")
    axis.set_title(f"{config.predictor}: Spearman {s['cross_validated']['spearman']:.3f}")
    figure.tight_layout()
    figure.savefig(out / "scatter.png", dpi=100)
    plt.close(figure)
    cost = s["cost"]
    offline = cost["reference"]["seconds"] + cost["teacher_labels"]["seconds"] + cost["predictor_seconds"]
    lines = [f"# Proxy scoring of {config.corpus}/{config.split}", "",
             f"The teacher labelled {s['labelled']:,} of {s['pool']:,} instances ({config.label_fraction:.0%}; "
             f"{s['rounds'][0]['labelled']:,} at random, then {len(s['rounds']) - 1} active rounds near the cut); "
             f"predictor: {config.predictor}" + (" with the reference's hidden states" if config.hidden else "")
             + f"; instances without features: {s['nan_features']:,} (left unpredicted: select drops them).", "",
             f"Cross-validated on the labelled rows ({s['cross_validated']['rows']:,}): Spearman "
             f"{s['cross_validated']['spearman']:.3f}, RMSE {s['cross_validated']['rmse']:.4f} nats/token "
             "(![scatter](scatter.png)).", "", "| round | labelled | tokens | teacher s | fit s | CV RMSE |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['labelled']:,} | {r['labelled_tokens']:,} | {r['label_seconds']} | "
              f"{r['fit_seconds']} | {r['cv_rmse']:.4f} |" for r in s["rounds"]]
    lines += ["", "| offline cost | tokens | FLOPs | seconds |", "|---|---|---|---|",
              f"| reference pass (with features) | {cost['reference']['tokens']:,} | {cost['reference']['flops']:.3g} "
              f"| {cost['reference']['seconds']} |",
              f"| teacher labels | {cost['teacher_labels']['tokens']:,} | {cost['teacher_labels']['flops']:.3g} | "
              f"{cost['teacher_labels']['seconds']} |", f"| predictor | - | - | {cost['predictor_seconds']} |",
              f"| **proxy in all** | | | {offline:.1f} |",
              f"| exact teacher pass (estimated at the label jobs' scoring throughput) | "
              f"{cost['exact_teacher_estimate']['tokens']:,} | {cost['exact_teacher_estimate']['flops']:.3g} | "
              f"{cost['exact_teacher_estimate']['seconds']} |", ""]
    if "against_exact" in s:
        a = s["against_exact"]
        lines += [f"Against the exact selection (alpha {config.alpha}, {config.domain_quota} quota): precision "
                  f"{a['precision']:.3f}, recall {a['recall']:.3f}; Spearman of the predictions on the unlabelled "
                  f"rows {a['unlabelled_spearman']:.3f}.", ""]
    (out / "report.md").write_text("\n".join(lines))


def proxy(config: ProxyConfig, force: bool = False, log=print) -> StageResult:
    return execute(Proxy(), config, force, log)
