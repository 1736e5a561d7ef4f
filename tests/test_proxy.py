"""`miniplm proxy`: teacher labels on a fraction of the pool, a predictor for the rest, active rounds at the cut."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import save_tiny_llama
from miniplm.core.config import ConfigError, load_config
from miniplm.scoring.proxy import MIN_LABELS, ProxyConfig, proxy
from miniplm.scoring.score import ScoreConfig, read_scores, score
from miniplm.selection.select import SelectConfig, select

EAGER = {"precision": "bf16", "compile": False, "progress": False, "threads": 1}  # the same bits in any batch


@pytest.fixture(scope="module")
def scored(tmp_path_factory, prepared_corpus, tokenizer_dir, tiny_model_dir):
    """The reference scored with features, and the teacher's exact scores of the whole pool."""
    root = tmp_path_factory.mktemp("proxy")
    teacher = save_tiny_llama(root / "teacher-model", tokenizer_dir, seed=3, layers=3)
    for name, model, features in (("reference", tiny_model_dir, True), ("teacher", teacher, False)):
        score(load_config(ScoreConfig, None, {"model": str(model), "corpus": str(prepared_corpus),
                                              "output": str(root / name), "features": features, **EAGER}),
              log=lambda m: None)
    return root, teacher


def proxy_config(root, corpus, teacher, **kw) -> ProxyConfig:
    settings = {"corpus": str(corpus), "reference": str(root / "reference"), "output": str(root / "proxy"),
                "progress": False, "teacher": {"model": str(teacher), "batch_tokens": 512, **EAGER}, **kw}
    return load_config(ProxyConfig, None, settings)


def test_active_rounds_spend_the_budget_and_exact_rows_equal_a_plain_score(scored, prepared_corpus):
    root, teacher = scored
    config = proxy_config(root, prepared_corpus, teacher, label_fraction=0.5, first_fraction=0.4, rounds=3)
    manifest = proxy(config, log=lambda m: None).manifest
    table = read_scores(root / "proxy")
    n = table.num_rows
    assert pq.read_table(root / "proxy" / "parts" / "part-000000.parquet").column("exact").to_numpy().sum() \
        == manifest["exact_rows"] == round(0.5 * n)
    budget = round(0.5 * n)
    first = round(0.4 * budget)
    step, extra = divmod(budget - first, 3)
    assert [r["labelled"] for r in manifest["summary"]["rounds"]] == [first] + [step + 1] * extra + [step] * (3 - extra)
    exact = read_scores(root / "teacher").column("logp_sum").to_numpy()
    mine = pq.read_table(root / "proxy" / "parts" / "part-000000.parquet").to_pydict()
    labelled = np.array(mine["exact"])
    assert np.array_equal(np.array(mine["logp_sum"])[labelled], exact[labelled])  # bit for bit
    assert np.isfinite(np.array(mine["logp_sum"])).all()  # every other row predicted
    # the active rounds label instances nearest the cut: closer to it than the random first sample was
    predictions = pq.read_table(root / "proxy" / "predictions.parquet").to_pydict()
    r = np.where(labelled, np.array(predictions["exact"]), np.array(predictions["predicted"])) \
        - np.array(predictions["reference"])
    cut = np.sort(r)[::-1][n // 2 - 1]
    rounds_of = np.array(predictions["round"])
    assert np.median(np.abs(r[rounds_of > 0] - cut)) < np.median(np.abs(r[rounds_of == 0] - cut))
    again = proxy(config, log=lambda m: None)
    assert not again.ran


def test_a_proxy_of_the_whole_pool_selects_exactly_as_the_exact_scores(scored, prepared_corpus):
    root, teacher = scored
    config = dataclasses.replace(proxy_config(root, prepared_corpus, teacher, label_fraction=1.0),
                                 output=str(root / "proxy-all"))
    proxy(config, log=lambda m: None)
    kept = []
    for name, source in (("exact", root / "teacher"), ("proxied", root / "proxy-all")):
        select(load_config(SelectConfig, None, {"corpus": str(prepared_corpus), "teacher": str(source),
                                                "reference": str(root / "reference"), "progress": False,
                                                "output": str(root / f"select-{name}"), "report": False}),
               log=lambda m: None)
        kept.append(pq.read_table(root / f"select-{name}" / "instances.parquet").column("selected").to_pylist())
    assert kept[0] == kept[1] and 0 < sum(kept[0]) < len(kept[0])


@pytest.mark.parametrize("key, value", [("label_fraction", 0.0), ("label_fraction", 1.5), ("first_fraction", 0.0),
                                        ("alpha", 2.0), ("rounds", -1)])
def test_out_of_range_settings_are_refused(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config(ProxyConfig, None, {key: value})


def test_bad_inputs_are_refused_with_the_fix(scored, prepared_corpus, tmp_path):
    root, teacher = scored
    with pytest.raises(ValueError, match="--features true"):
        proxy(dataclasses.replace(proxy_config(root, prepared_corpus, teacher), reference=str(root / "teacher"),
                                  output=str(tmp_path / "a")), log=lambda m: None)
    with pytest.raises(ValueError, match=f"the {MIN_LABELS} the predictor needs"):
        proxy(dataclasses.replace(proxy_config(root, prepared_corpus, teacher, label_fraction=0.05),
                                  output=str(tmp_path / "b")), log=lambda m: None)
    with pytest.raises(ValueError, match="same pool"):
        proxy(dataclasses.replace(proxy_config(root, prepared_corpus, teacher), split="heldout",
                                  output=str(tmp_path / "c")), log=lambda m: None)


def test_instances_without_features_are_counted_and_left_unpredicted(scored, prepared_corpus, tmp_path):
    import shutil

    import pyarrow as pa

    root, teacher = scored
    reference = tmp_path / "reference"
    shutil.copytree(root / "reference", reference)
    part = sorted((reference / "parts").glob("part-*.parquet"))[0]
    table = pq.read_table(part)
    hidden = table.column("hidden").to_pylist()
    hidden[0] = [float("nan")] * len(hidden[0])
    table = table.set_column(table.schema.get_field_index("hidden"), "hidden",
                             pa.array(hidden, type=table.schema.field("hidden").type))
    pq.write_table(table, part)
    config = dataclasses.replace(proxy_config(root, prepared_corpus, teacher, label_fraction=0.5, first_fraction=1.0),
                                 reference=str(reference), output=str(tmp_path / "proxy"))
    manifest = proxy(config, log=lambda m: None).manifest
    assert manifest["summary"]["nan_features"] == 1
    rows = pq.read_table(tmp_path / "proxy" / "parts" / "part-000000.parquet").to_pydict()
    broken = int(table.column("instance_id")[0].as_py())
    assert rows["exact"][broken] or np.isnan(rows["logp_sum"][broken])


def test_an_interrupted_proxy_reuses_its_finished_label_rounds(scored, prepared_corpus, tmp_path):
    root, teacher = scored
    config = dataclasses.replace(proxy_config(root, prepared_corpus, teacher, label_fraction=0.6, rounds=2),
                                 output=str(tmp_path / "proxy"))
    proxy(config, log=lambda m: None)
    out = tmp_path / "proxy"
    table = pq.read_table(out / "parts" / "part-000000.parquet")
    created = {d.name: (d / "manifest.json").read_text() for d in (out / "labels").iterdir() if d.is_dir()}
    # as a kill during the last round leaves it: no manifest, no table, the last round's scores unfinished
    for path in (out / "manifest.json", out / "parts" / "part-000000.parquet", out / "labels" / "round-02" /
                 "manifest.json"):
        path.unlink()
    logs = []
    proxy(config, log=logs.append)
    assert pq.read_table(out / "parts" / "part-000000.parquet").equals(table)
    for name in ("round-00", "round-01"):  # finished rounds are not scored again
        assert (out / "labels" / name / "manifest.json").read_text() == created[name]
    assert (out / "labels" / "round-02" / "manifest.json").read_text() != created["round-02"]
