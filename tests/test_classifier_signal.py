"""The classifier signal: a hashed n-gram logistic regression that keeps the pool's target-like text."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from miniplm.core.config import ConfigError, load_config
from miniplm.data.prepare import PrepareConfig, prepare
from miniplm.selection.select import SelectConfig, select

COOKING = ["Whisk the flour and butter, then bake the dough in a hot oven until golden.",
           "Simmer the onions with garlic and pepper; season the sauce with salt before serving.",
           "Knead the bread dough, let it rise, and bake the loaf for forty minutes."]
SPORTS = ["The striker scored twice before half time and the keeper saved a penalty.",
          "Our team won the match after a late goal; the coach praised the defence.",
          "The referee showed a red card and the crowd cheered the final whistle."]


def documents(sentences: list[str], kind: str, n: int, rng: np.random.Generator) -> list[dict]:
    return [{"text": " ".join(rng.choice(sentences, size=3)), "id": f"{kind}-{i}", "domain": "web", "kind": kind}
            for i in range(n)]


@pytest.fixture(scope="module")
def pool(tmp_path_factory, tokenizer_dir):
    """One domain, half cooking and half sports documents, each a packed instance of its own (max_len 64)."""
    tmp = tmp_path_factory.mktemp("classifier")
    rng = np.random.default_rng(0)
    write_jsonl(tmp / "raw" / "web.jsonl",
                documents(COOKING, "cooking", 60, rng) + documents(SPORTS, "sports", 60, rng))
    write_jsonl(tmp / "target" / "recipes.jsonl", documents(COOKING, "target", 40, rng))
    prepare(load_config(PrepareConfig, None, {"inputs": [str(tmp / "raw")], "output": str(tmp / "corpus"),
                                              "tokenizer": str(tokenizer_dir), "max_len": 64, "progress": False,
                                              "splits": {"ref": {"fraction": 0.1}, "heldout": {"fraction": 0.1}}}),
            log=lambda m: None)
    return tmp


def run(pool, name: str, **options):
    logs: list[str] = []
    config = load_config(SelectConfig, None, {"corpus": str(pool / "corpus"), "selector": "classifier",
                                              "teacher": None, "reference": None, "output": str(pool / name),
                                              "report": False, "progress": False, **options})
    manifest = select(config, log=logs.append).manifest
    return manifest, pq.read_table(pool / name / "instances.parquet").to_pylist(), logs


def is_cooking(pool, rows) -> list[bool]:
    from miniplm.data.shards import PackedCorpus

    corpus = PackedCorpus(pool / "corpus")
    split, tokenizer = corpus.split("train"), corpus.load_tokenizer()
    return ["oven" in (text := tokenizer.decode(split[r["instance_id"]].tolist())) or "dough" in text
            or "sauce" in text for r in rows]


def test_the_classifier_keeps_the_target_like_half(pool):
    manifest, rows, logs = run(pool, "sel", target=str(pool / "target" / "*.jsonl"), alpha=0.5)
    cooking = np.array(is_cooking(pool, rows))
    kept = np.array([r["selected"] for r in rows])
    keys = np.array([r["key"] for r in rows])
    assert 0.3 < cooking.mean() < 0.7
    assert (kept == cooking).mean() > 0.95  # the kept half is the cooking half
    assert np.mean(keys[cooking]) > np.mean(keys[~cooking]) + 1  # log-odds: target-like text far above
    facts = manifest["classifier"]
    # half the pool's negatives are cooking too, so target and pool are separable only in part
    assert facts["target_documents"] == 40 and facts["pool_negatives"] == 40 and 0.5 < facts["holdout_accuracy"]
    assert facts["fit_seconds"] >= 0 and any(m.startswith("classifier: target") for m in logs)
    # the same config and seed: the same keys
    assert [r["key"] for r in run(pool, "again", target=str(pool / "target" / "*.jsonl"), alpha=0.5)[1]] == list(keys)


def test_the_classifier_works_within_domains_and_from_a_split(pool):
    manifest, rows, _ = run(pool, "by-domain", target="ref", domain_quota="proportional")
    assert manifest["classifier"]["target"] == "ref" and manifest["kept"] == len(rows) // 2


@pytest.mark.parametrize("target, message", [
    (None, "needs --target"), ("heldout", "'heldout' is an evaluation split"), ("train", "'train' is the pool"),
    ("nowhere/*.jsonl", "matched no readable files")])
def test_a_target_the_classifier_may_not_learn_from_is_refused(pool, target, message):
    with pytest.raises((ConfigError, FileNotFoundError), match=message):
        run(pool, "refused", **({"target": target} if target else {}))
