"""The selection report: what was kept, what was dropped, and why, as markdown with PNG figures.

Everything streams over `instances.parquet`, so the report of a billion-instance selection needs no more
memory than a small one: histograms use a min/max pass then a counting pass, the scatter plot a seeded
sample of at most 20,000 points, and the decoded samples are found by the same exact selection as the
cut itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from matplotlib.figure import Figure  # no pyplot: no global backend, no window

from miniplm.core.hashing import uniform_hash
from miniplm.data.shards import PackedCorpus
from miniplm.selection.topk import exact_top

SCATTER_POINTS = 20_000
SAMPLE_CHARS = 500
MEANING = {
    "difference": "r = mean log p_teacher - mean log p_ref. High r: hard for the small model but likely for "
                  "the teacher (kept, 'hard but learnable'); low r with both losses low: common easy text "
                  "(down-sampled); r < 0: the teacher dislikes it more than the small model (noise, dropped).",
    "teacher-ppl": "key = mean log p_teacher: the text the teacher finds likeliest is kept.",
    "ref-ppl": "key from the reference model's mean log-prob (low, middle or high loss band kept).",
    "random": "key = a seeded uniform number per instance.",
    "classifier": "key = log-odds of a logistic regression on hashed word n-grams trained to tell the target's "
                  "text from a random sample of the pool: the most target-like text is kept.",
    "unigram": "key = mean log p of the instance's tokens under its domain's add-one unigram model of the pool: "
               "the most typical text of each domain is kept (no model).",
}


def _batches(path: Path, columns: list[str]):
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1 << 20, columns=columns):
        yield {c: batch.column(c).to_numpy(zero_copy_only=False) for c in columns}


def _histogram(path: Path, column: str, bins: int = 100):
    low, high = math.inf, -math.inf
    for b in _batches(path, [column]):
        v = b[column][np.isfinite(b[column])]
        if len(v):
            low, high = min(low, float(v.min())), max(high, float(v.max()))
    if low > high:
        return None
    if low == high:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    kept = np.zeros(bins, dtype=np.int64)
    dropped = np.zeros(bins, dtype=np.int64)
    for b in _batches(path, [column, "selected"]):
        ok = np.isfinite(b[column])
        kept += np.histogram(b[column][ok & b["selected"]], edges)[0]
        dropped += np.histogram(b[column][ok & ~b["selected"]], edges)[0]
    return edges, kept, dropped


def _ranked_instance(path: Path, rank_fraction: float, from_top: bool) -> int | None:
    """The instance at a rank (a fraction of the valid instances) from the top or the bottom of the keys."""
    def stream():
        for b in _batches(path, ["instance_id", "key"]):
            ok = np.isfinite(b["key"])
            keys = b["key"][ok] if from_top else -b["key"][ok]
            yield b["instance_id"][ok], keys, np.ones(int(ok.sum()), dtype=np.int64)
    total = sum(len(ids) for ids, _, _ in stream())
    if total == 0:
        return None
    cut = exact_top(stream, max(1, math.ceil(rank_fraction * total)))
    return int(np.iinfo(np.int64).max - cut.rid)


def _row(path: Path, index: int) -> dict:
    """Row `index` of a parquet file, reading only the row group that holds it."""
    pf = pq.ParquetFile(path)
    start = 0
    for group in range(pf.num_row_groups):
        size = pf.metadata.row_group(group).num_rows
        if index < start + size:
            return pf.read_row_group(group).slice(index - start, 1).to_pylist()[0]
        start += size
    raise IndexError(f"{path} has no row {index}")


def ngram_diagnostic_table(found: dict, title: str = "## N-gram diagnostic") -> list[str]:
    """Markdown: held-out loss of n-gram models fitted on the pool and on the kept data, per split."""
    lines = [title, "",
             "Unigram and bigram models fitted on the kept instances and on the whole pool, scored on held-out "
             "splits (nats/token, bits/byte): what the selection does to the data's statistics before any student "
             "trains. A kept-minus-pool difference near a student's gain means the gain could be domain matching.",
             "", "| split | model | pool | kept | kept - pool | kept bits/byte |", "|---|---|---|---|---|---|"]
    for split, fitted in found.items():
        for level in fitted["pool"]:
            pool, kept = fitted["pool"][level]["loss_per_token"], fitted["kept"][level]["loss_per_token"]
            lines.append(f"| {split} | {level} | {pool:.4f} | {kept:.4f} | {kept - pool:+.4f} | "
                         f"{fitted['kept'][level]['bits_per_byte']:.4f} |")
    return [*lines, ""]


def write_report(selection_dir: str | Path, manifest: dict) -> Path:
    """The report of the selection in `selection_dir`, whose manifest (or the facts it will hold) is `manifest`."""
    out = Path(selection_dir)
    rows = out / "instances.parquet"
    selector = manifest["config"]["selector"]
    figures = out / "report"
    figures.mkdir(exist_ok=True)
    lines = [f"# Selection report: {selector}", "", MEANING[selector], ""]
    lines += [f"- corpus: `{manifest['corpus']['path']}` split `{manifest['corpus']['split']}`, "
              f"{manifest['instances']:,} instances",
              f"- target: {manifest['target']}; kept {manifest['kept']:,} instances, "
              f"{manifest['kept_tokens']:,} tokens",
              f"- instances with NaN/inf scores (excluded): {manifest['invalid_scores']:,}",
              f"- cut(s): {manifest['cuts']}", ""]
    if manifest.get("classifier"):
        c = manifest["classifier"]
        accuracy = "n/a" if c["holdout_accuracy"] is None else f"{c['holdout_accuracy']:.3f}"
        lines += [f"- classifier: target `{c['target']}` ({c['target_documents']:,} documents) against "
                  f"{c['pool_negatives']:,} pool instances, word 1..{c['ngrams']}-grams hashed into "
                  f"{c['features']:,} features; held-out accuracy {accuracy}; cost: fit {c['fit_seconds']} s, "
                  f"pool scored in {c['score_seconds']} s", ""]
    lines += _key_distribution(rows, manifest, figures)
    lines += _teacher_vs_reference(rows, manifest["instances"], figures)
    lines += _domains(manifest["domains"], figures)
    if manifest.get("ngram_diagnostic"):
        lines += ngram_diagnostic_table(manifest["ngram_diagnostic"])
    lines += _samples(rows, PackedCorpus(manifest["corpus"]["path"]), manifest["corpus"]["split"])
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _key_distribution(rows: Path, manifest: dict, figures: Path) -> list[str]:
    hist = _histogram(rows, "key")
    if hist is None:
        return []
    config = manifest["config"]
    edges, kept, dropped = hist
    centers = (edges[:-1] + edges[1:]) / 2
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.bar(centers, dropped, width=np.diff(edges), color="#bbbbbb", label="dropped")
    ax1.bar(centers, kept, width=np.diff(edges), bottom=dropped, color="#1f77b4", label="kept")
    cdf = np.cumsum(kept + dropped) / max(int((kept + dropped).sum()), 1)
    ax2.plot(edges[1:], cdf, color="black")
    for cut in manifest["cuts"].values():
        if cut is not None and config["selector"] != "random" and config.get("temperature") is None:
            for ax in (ax1, ax2):
                ax.axvline(cut["key"], color="red", linestyle="--", linewidth=1)
    ax1.set(title="key distribution (red: the cut)", xlabel="key", ylabel="instances")
    ax2.set(title="cumulative distribution", xlabel="key", ylabel="fraction of instances")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(figures / "key_histogram.png", dpi=110)
    return ["## Key distribution", "", "![key histogram and CDF](report/key_histogram.png)", ""]


def _teacher_vs_reference(rows: Path, n: int, figures: Path) -> list[str]:
    share = min(1.0, SCATTER_POINTS / max(n, 1))
    pts = {"t": [], "f": [], "s": []}
    for b in _batches(rows, ["instance_id", "teacher_logp", "ref_logp", "selected"]):
        pick = uniform_hash(12345, b["instance_id"]) < share
        pts["t"].append(-b["teacher_logp"][pick])
        pts["f"].append(-b["ref_logp"][pick])
        pts["s"].append(b["selected"][pick])
    t, f, s = (np.concatenate(pts[k]) for k in "tfs")
    if not (np.isfinite(t).any() and np.isfinite(f).any()):
        return []
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    ax.scatter(f[~s], t[~s], s=4, alpha=0.4, color="#bbbbbb", label="dropped")
    ax.scatter(f[s], t[s], s=4, alpha=0.5, color="#1f77b4", label="kept")
    finite = np.isfinite(t) & np.isfinite(f)
    lim = [min(t[finite].min(), f[finite].min()), max(t[finite].max(), f[finite].max())]
    ax.plot(lim, lim, color="black", linewidth=0.8, label="equal loss (r = 0)")
    ax.set(xlabel="reference loss (nats/token)", ylabel="teacher loss (nats/token)",
           title=f"teacher vs reference ({len(t):,} instances)")
    ax.legend(markerscale=3)
    fig.tight_layout()
    fig.savefig(figures / "teacher_vs_reference.png", dpi=110)
    return ["## Teacher vs reference loss", "", "![teacher vs reference](report/teacher_vs_reference.png)", ""]


def _domains(domains: dict, figures: Path) -> list[str]:
    names = sorted(domains)
    total_tokens = sum(d["tokens"] for d in domains.values()) or 1
    kept_tokens = sum(d["kept_tokens"] for d in domains.values()) or 1
    before = [domains[d]["tokens"] / total_tokens for d in names]
    after = [domains[d]["kept_tokens"] / kept_tokens for d in names]
    fig = Figure(figsize=(max(6, len(names) * 1.1), 4))
    ax = fig.subplots()
    x = np.arange(len(names))
    ax.bar(x - 0.2, before, 0.4, label="corpus", color="#bbbbbb")
    ax.bar(x + 0.2, after, 0.4, label="selected", color="#1f77b4")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylabel="share of tokens", title="domain mix before and after selection")
    ax.legend()
    fig.tight_layout()
    fig.savefig(figures / "domains.png", dpi=110)
    lines = ["## Domains", "", "![domain mix](report/domains.png)", "",
             "| domain | instances | kept | kept fraction | tokens | kept tokens | share before | share after |",
             "|---|---|---|---|---|---|---|---|"]
    for d, b_, a_ in zip(names, before, after):
        c = domains[d]
        lines.append(f"| {d} | {c['instances']:,} | {c['kept']:,} | {c['kept'] / max(c['instances'], 1):.1%} | "
                     f"{c['tokens']:,} | {c['kept_tokens']:,} | {b_:.1%} | {a_:.1%} |")
    return [*lines, ""]


def _samples(rows: Path, corpus: PackedCorpus, split_name: str) -> list[str]:
    """Decoded instances from the top, the bottom and the 1%/10% edges of the ranking."""
    split = corpus.split(split_name)
    tokenizer = corpus.load_tokenizer()
    lines = ["## Samples", ""]
    for label, fraction, top in [("top (rank 1)", 0.0, True), ("top 1% edge", 0.01, True),
                                 ("top 10% edge", 0.10, True), ("bottom 10% edge", 0.10, False),
                                 ("bottom 1% edge", 0.01, False), ("bottom (last rank)", 0.0, False)]:
        instance = _ranked_instance(rows, fraction, top)
        if instance is None:
            continue
        row = _row(rows, instance)
        text = tokenizer.decode(split[instance].tolist())[:SAMPLE_CHARS].replace("```", "'''")
        lines += [f"### {label}: instance {instance} ({row['domain']}), key {row['key']:.3f}, teacher loss "
                  f"{-row['teacher_logp']:.3f}, reference loss {-row['ref_logp']:.3f}, "
                  f"{'kept' if row['selected'] else 'dropped'}", "", "```text", text, "```", ""]
    return lines
