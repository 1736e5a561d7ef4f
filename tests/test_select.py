import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import write_scores
from miniplm.core.config import ConfigError, load_config
from miniplm.data.shards import PackedCorpus
from miniplm.selection import select as sel
from miniplm.selection.select import SelectConfig, select


@pytest.fixture
def setting(prepared_corpus, tmp_path):
    corpus = PackedCorpus(prepared_corpus)
    n = len(corpus.split("train"))
    rng = np.random.default_rng(0)
    teacher = np.round(rng.normal(-3, 1, size=n), 1)  # rounded: many ties
    reference = np.round(rng.normal(-5, 1, size=n), 1)
    t = write_scores(tmp_path / "teacher", prepared_corpus, teacher)
    f = write_scores(tmp_path / "ref", prepared_corpus, reference)
    domains = np.array(corpus.split("train").table.column("domain").to_pylist())
    lengths = corpus.split("train").table.column("n_tokens").to_numpy()
    return dict(corpus=prepared_corpus, teacher=t, ref=f, t=teacher, f=reference, n=n, domains=domains,
                lengths=lengths, tmp=tmp_path)


def run(s, name="sel", **kw):
    cfg = load_config(SelectConfig, None, {"corpus": str(s["corpus"]), "teacher": str(s["teacher"]),
                                           "reference": str(s["ref"]), "output": str(s["tmp"] / name),
                                           "report": False, "progress": False, **kw})
    manifest = select(cfg, log=lambda m: None).manifest
    rows = pq.read_table(s["tmp"] / name / "instances.parquet").to_pydict()
    return manifest, rows


def top_ids(keys, k):
    order = np.lexsort((np.arange(len(keys)), -keys))
    return set(order[:k].tolist())


def kept(rows):
    return {i for i, s in zip(rows["instance_id"], rows["selected"]) if s}


def test_difference_sampling_keeps_the_top_alpha_by_r_in_corpus_order(setting):
    s = setting
    manifest, rows = run(s)
    r = s["t"] - s["f"]
    assert kept(rows) == top_ids(r, math.floor(0.5 * s["n"]))
    assert manifest["kept"] == math.floor(0.5 * s["n"])
    assert rows["instance_id"] == list(range(s["n"]))  # written in original corpus order
    assert np.allclose(rows["key"], r)
    assert sum(d["kept"] for d in manifest["domains"].values()) == manifest["kept"]


def test_streaming_in_small_chunks_equals_one_chunk(setting, monkeypatch):
    _, whole = run(setting, "whole", alpha=0.3)
    monkeypatch.setattr(sel, "CHUNK", 7)
    _, chunked = run(setting, "chunked", alpha=0.3)
    assert whole == chunked


def test_other_selectors(setting):
    s = setting
    k = math.floor(0.4 * s["n"])
    assert kept(run(s, "tp", selector="teacher-ppl", alpha=0.4)[1]) == top_ids(s["t"], k)
    assert kept(run(s, "low", selector="ref-ppl", ref_band="low", alpha=0.4)[1]) == top_ids(s["f"], k)
    assert kept(run(s, "high", selector="ref-ppl", ref_band="high", alpha=0.4)[1]) == top_ids(-s["f"], k)
    manifest, rows = run(s, "mid", selector="ref-ppl", ref_band="middle", alpha=0.4)
    median = np.sort(s["f"])[::-1][(s["n"] + 1) // 2 - 1]
    assert manifest["median_ref_logp"] == pytest.approx(median)
    assert kept(rows) == top_ids(-np.abs(s["f"] - median), k)
    r1, r2, r3 = (kept(run(s, name, selector="random", alpha=0.4, seed=seed)[1])
                  for name, seed in [("r1", 1), ("r2", 1), ("r3", 2)])
    assert r1 == r2 != r3 and len(r1) == k


def test_gumbel_top_k(setting):
    s = setting
    k = math.floor(0.5 * s["n"])
    cold = kept(run(s, "cold", temperature=1e-6)[1])
    hard = kept(run(s, "hard")[1])
    assert len(cold) == k and len(cold ^ hard) <= 0.1 * k  # ~ the hard cut (ties now broken by noise)
    warm1, warm2 = kept(run(s, "w1", temperature=5.0)[1]), kept(run(s, "w2", temperature=5.0)[1])
    assert warm1 == warm2 and len(warm1) == k and warm1 != hard


def test_token_budget(setting):
    s = setting
    budget = int(s["lengths"].sum() // 3)
    manifest, rows = run(s, "budget", budget_tokens=budget)
    r = s["t"] - s["f"]
    order = np.lexsort((np.arange(s["n"]), -r))
    take = int(np.searchsorted(np.cumsum(s["lengths"][order]), budget, side="right"))
    assert kept(rows) == set(order[:take].tolist())
    assert manifest["kept_tokens"] <= budget
    with pytest.raises(ValueError, match="exceeds the .* tokens"):
        run(s, "toobig", budget_tokens=int(s["lengths"].sum()) + 1)


def test_domain_quotas(setting):
    s = setting
    manifest, rows = run(s, "prop", domain_quota="proportional")
    for name, c in manifest["domains"].items():
        assert abs(c["kept"] - 0.5 * c["instances"]) <= 1
        d_ids = np.flatnonzero(s["domains"] == name)
        r = (s["t"] - s["f"])[d_ids]
        assert {i for i in kept(rows) if s["domains"][i] == name} == set(d_ids[list(top_ids(r, c["kept"]))].tolist())
    diff, _ = run(s, "diff")
    copied, _ = run(s, "copied", selector="random", domain_quota=f"from:{s['tmp'] / 'diff'}")
    assert {d: c["kept"] for d, c in copied["domains"].items()} == {d: c["kept"] for d, c in diff["domains"].items()}
    explicit, _ = run(s, "explicit", domain_quota={"news": 1.0, "books": 0.0}, alpha=0.2)
    assert explicit["domains"]["books"]["kept"] == 0 and explicit["domains"]["news"]["kept"] == explicit["kept"]
    with pytest.raises(ValueError, match="domains the corpus does not have"):
        run(s, "bad", domain_quota={"poetry": 1.0})
    with pytest.raises(ValueError, match="has only"):
        run(s, "over", domain_quota={"news": 1.0}, alpha=0.9)


def test_nan_and_inf_scores_are_counted_and_excluded(setting):
    s = setting
    t = s["t"].copy()
    t[[0, 5]] = np.nan
    t[7] = np.inf
    n_scored = np.full(s["n"], 10)
    n_scored[9] = 0  # an instance with no scored position
    write_scores(s["tmp"] / "t-nan", s["corpus"], t, n_scored=n_scored)
    manifest, rows = run(s, "nan", teacher=str(s["tmp"] / "t-nan"))
    assert manifest["invalid_scores"] == 4
    assert not {0, 5, 7, 9} & kept(rows)
    assert manifest["kept"] == math.floor(0.5 * (s["n"] - 4))


def test_refuses_missing_foreign_and_unfinished_scores(setting):
    s = setting
    write_scores(s["tmp"] / "partial", s["corpus"], s["t"], ids=np.arange(s["n"] - 3))
    with pytest.raises(ValueError, match=r"cover .* instances .*: 3 are missing"):
        run(s, "x", teacher=str(s["tmp"] / "partial"))
    write_scores(s["tmp"] / "foreign", s["corpus"], s["t"], key="0123456789abcdef")
    with pytest.raises(ValueError, match="belong to corpus .* not to"):
        run(s, "x", reference=str(s["tmp"] / "foreign"))
    unfinished = s["tmp"] / "unfinished"
    (unfinished / "parts").mkdir(parents=True)
    (unfinished / "plan.json").write_text(json.dumps({"key": "k", "parts": 4}))
    (unfinished / "parts" / "part-000001.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=r"unfinished: 3 of 4 parts are missing \(parts \[0, 2, 3\]"):
        run(s, "x", teacher=str(unfinished))


@pytest.mark.parametrize("override, message", [({"alpha": 0.0}, "alpha: must be in"), ({"alpha": 1.5}, "alpha"),
                                               ({"budget_tokens": -5}, "budget_tokens"),
                                               ({"temperature": 0.0}, "temperature"),
                                               ({"domain_quota": "weird"}, "domain_quota")])
def test_config_refuses_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SelectConfig, None, override)


def test_end_to_end_with_real_models_and_the_report(prepared_corpus, tiny_model_dir, tokenizer_dir, tmp_path,
                                                     capsys):
    from conftest import save_tiny_llama
    from miniplm.cli import main
    from miniplm.scoring.score import ScoreConfig, score

    ref_model = save_tiny_llama(tmp_path / "ref-model", tokenizer_dir, seed=3, layers=1)
    for name, model in [("teacher", tiny_model_dir), ("ref", ref_model)]:
        score(load_config(ScoreConfig, None, {"model": str(model), "corpus": str(prepared_corpus),
                                              "output": str(tmp_path / name), "progress": False}), log=lambda m: None)
    code = main(["select", "--corpus", str(prepared_corpus), "--teacher", str(tmp_path / "teacher"),
                 "--reference", str(tmp_path / "ref"), "--output", str(tmp_path / "sel"), "--progress", "false"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"select: report in {tmp_path / 'sel' / 'report.md'}" in printed and ".partial" not in printed
    report = (tmp_path / "sel" / "report.md").read_text()
    for figure in ("key_histogram.png", "teacher_vs_reference.png", "domains.png"):
        assert (tmp_path / "sel" / "report" / figure).stat().st_size > 5000
        assert f"report/{figure}" in report
    assert report.count("```text") == 6 and "| news |" in report and "top 1% edge" in report
    manifest = json.loads((tmp_path / "sel" / "manifest.json").read_text())
    rows = pq.read_table(tmp_path / "sel" / "instances.parquet")
    assert rows.num_rows == manifest["instances"] and sum(rows.column("selected").to_pylist()) == manifest["kept"]
    assert not (tmp_path / "sel" / "work").exists()


def test_max_instances_selects_among_a_scored_prefix(setting):
    s = setting
    m = s["n"] // 2
    write_scores(s["tmp"] / "t-prefix", s["corpus"], s["t"], ids=np.arange(m))
    manifest, rows = run(s, "prefix", teacher=str(s["tmp"] / "t-prefix"), max_instances=m)
    assert manifest["instances"] == m and len(rows["instance_id"]) == m
    assert kept(rows) == top_ids((s["t"] - s["f"])[:m], m // 2)


def test_ngram_diagnostic_sees_a_selection_move_toward_a_domain(tokenizer_dir, tmp_path):
    from conftest import SENTENCES, write_jsonl
    from miniplm.data import ngram
    from miniplm.data.prepare import PrepareConfig, prepare

    records = [{"text": " ".join(str((i * 7 + k) % 100) for k in range(40)), "domain": "digits", "id": f"d{i}"}
               for i in range(80)]
    records += [{"text": " ".join(SENTENCES[(i + k) % 5] for k in range(4)), "domain": "words", "id": f"w{i}"}
                for i in range(80)]
    write_jsonl(tmp_path / "raw" / "mix.jsonl", records)
    prepare(load_config(PrepareConfig, None, {
        "inputs": [str(tmp_path / "raw")], "output": str(tmp_path / "corpus"), "tokenizer": str(tokenizer_dir),
        "max_len": 64, "progress": False, "splits": {"digits_heldout": {"fraction": 0.2, "domains": ["digits"]}}}),
        log=lambda m: None)
    corpus = PackedCorpus(tmp_path / "corpus")
    domains = np.array(corpus.split("train").table.column("domain").to_pylist())
    teacher = np.where(domains == "digits", -1.0, -3.0)  # the teacher finds the digits far likelier
    s = dict(corpus=tmp_path / "corpus", tmp=tmp_path,
             teacher=write_scores(tmp_path / "t", tmp_path / "corpus", teacher),
             ref=write_scores(tmp_path / "r", tmp_path / "corpus", np.full(len(domains), -4.0)))
    manifest, rows = run(s, alpha=0.4)
    found = manifest["ngram_diagnostic"]
    assert list(found) == ["digits_heldout"]  # the default: every split but the selected one and ref
    levels = found["digits_heldout"]
    for level in ("unigram", "bigram"):
        assert levels["kept"][level]["loss_per_token"] < levels["pool"][level]["loss_per_token"] - 0.1
    # recomputed from the kept instances directly
    split = corpus.split("train")
    kept = [split[i] for i in np.flatnonzero(rows["selected"])]
    heldout = [corpus.split("digits_heldout")[i] for i in range(len(corpus.split("digits_heldout")))]
    masked = np.array([corpus.eos_id])
    nats, counts = ngram.instance_losses(ngram.fit(2, kept, len(corpus.load_tokenizer()), masked), heldout, masked)
    assert levels["kept"]["bigram"]["loss_per_token"] == pytest.approx(nats.sum() / counts.sum(), rel=1e-12)
    with pytest.raises(ValueError, match="has no split 'nope'; it has: "):
        run(s, name="bad", diagnostic_splits=["nope"])


def test_a_domain_where_the_teacher_has_no_edge_is_warned_of(setting):
    """The teacher's edge per domain (token-weighted teacher - reference mean log-prob on the pool) is in the
    manifest; a domain holding over 10% of the pool's tokens where it is not positive gets a warning."""
    s = setting
    names, counts = np.unique(s["domains"], return_counts=True)
    big = names[np.argmax(counts)]
    teacher = np.where(s["domains"] == big, s["f"] - 0.5, s["t"])  # worse than the reference in the big domain
    write_scores(s["tmp"] / "t-flat", s["corpus"], teacher)
    logs = []
    cfg = load_config(SelectConfig, None, {"corpus": str(s["corpus"]), "teacher": str(s["tmp"] / "t-flat"),
                                           "reference": str(s["ref"]), "output": str(s["tmp"] / "edge"),
                                           "report": False, "progress": False})
    edge = select(cfg, log=logs.append).manifest["teacher_edge"]
    mask = s["domains"] == big
    expected = np.average((teacher - s["f"])[mask], weights=s["lengths"][mask])
    assert edge[big]["edge"] == pytest.approx(expected) and edge[big]["edge"] < 0
    assert edge[big]["token_share"] == pytest.approx(s["lengths"][mask].sum() / s["lengths"].sum())
    warned = [m for m in logs if "has no edge" in m]
    assert len(warned) == 1 and f"domain '{big}'" in warned[0]
    # the setting's own scores: the teacher ahead everywhere, no warning
    logs.clear()
    manifest = select(load_config(SelectConfig, None, {"corpus": str(s["corpus"]), "teacher": str(s["teacher"]),
                                                       "reference": str(s["ref"]), "output": str(s["tmp"] / "ok"),
                                                       "report": False, "progress": False}), log=logs.append).manifest
    assert all(v["edge"] > 0 for v in manifest["teacher_edge"].values()) and not [m for m in logs if "edge" in m]


def test_the_unigram_selector_ranks_by_the_domains_own_unigram_model(setting):
    """Keys recomputed through the n-gram levels' own unigram (`data.ngram.fit(1, ...)`, per domain): equal
    to the selector's; the kept half is the top half of each domain by that key."""
    from miniplm.core.tokens import masked_id_array, scored_targets
    from miniplm.data import ngram

    s = setting
    manifest, rows = run(s, "unigram", selector="unigram", domain_quota="proportional")
    corpus = PackedCorpus(s["corpus"])
    tokenizer = corpus.load_tokenizer()
    masked = masked_id_array(corpus.eos_id, tokenizer)
    split = corpus.split("train")
    instances = [np.asarray(split[i]) for i in range(s["n"])]
    expected = np.full(s["n"], np.nan)
    for domain in set(s["domains"]):
        ids = np.flatnonzero(s["domains"] == domain)
        model = ngram.fit(1, [instances[i] for i in ids], len(tokenizer), masked)
        nats, counts = ngram.instance_losses(model, [instances[i] for i in ids], masked)
        expected[ids] = -nats / counts
    assert np.allclose(rows["key"], expected, rtol=0, atol=1e-12)
    assert manifest["unigram"]["fit_tokens"] == sum(len(scored_targets(x, masked)[1]) for x in instances)
    for domain in set(s["domains"]):
        ids = np.flatnonzero(s["domains"] == domain)
        k = manifest["domains"][domain]["kept"]
        assert kept(rows) & set(ids.tolist()) == {int(ids[i]) for i in top_ids(expected[ids], k)}
