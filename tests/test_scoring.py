import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import save_other_tokenizer, save_tiny_llama, write_gguf_of_unknown_architecture
from miniplm.core.config import load_config
from miniplm.data.shards import PackedCorpus
from miniplm.scoring.plan import padded_width, padding_fraction, plan_batches, plan_parts
from miniplm.scoring.score import ScoreConfig, read_scores, score


def cfg(model, corpus, output, **kw) -> ScoreConfig:
    base = {"model": str(model), "corpus": str(corpus), "output": str(output), "precision": "fp32",
            "progress": False, "threads": 1}
    base.update(kw)
    return load_config(ScoreConfig, None, base)


def run(model, corpus, output, **kw):
    return score(cfg(model, corpus, output, **kw), log=lambda m: None).manifest


def test_logprobs_equal_the_models_own_loss(tiny_model_dir, prepared_corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    manifest = run(tiny_model_dir, prepared_corpus, tmp_path / "s")
    rows = read_scores(tmp_path / "s").to_pylist()
    split = PackedCorpus(prepared_corpus).split("train")
    eos = PackedCorpus(prepared_corpus).eos_id
    assert manifest["instances"] == len(rows) == len(split) > 50
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for row in rows[:40]:
        x = torch.tensor(split[row["instance_id"]].astype(np.int64))[None]
        labels = x.clone()
        labels[:, 1:][x[:, :-1] == eos] = -100  # positions whose input token is EOS are not scored
        labels[:, 0] = -100
        with torch.no_grad():
            loss = model(input_ids=x, labels=labels).loss.item()
        n = int((labels[:, 1:] != -100).sum())
        assert row["n_scored"] == n
        assert abs(row["logp_sum"] / n - (-loss)) < 1e-4


def test_scores_do_not_depend_on_batch_size_or_order(tiny_model_dir, prepared_corpus, tmp_path):
    run(tiny_model_dir, prepared_corpus, tmp_path / "a", batch_tokens=64)
    a = read_scores(tmp_path / "a")
    run(tiny_model_dir, prepared_corpus, tmp_path / "b", batch_tokens=4096, part_tokens=700, head_chunk_tokens=7)
    b = read_scores(tmp_path / "b")
    assert a.column("instance_id").to_pylist() == b.column("instance_id").to_pylist()
    assert a.column("n_scored").to_pylist() == b.column("n_scored").to_pylist()
    diff = np.abs(a.column("logp_sum").to_numpy() - b.column("logp_sum").to_numpy())
    per_token = diff / a.column("n_scored").to_numpy()
    assert per_token.max() < 1e-4


def test_bf16_scores_do_not_depend_on_batch_size(tiny_model_dir, prepared_corpus, tmp_path):
    """Each instance is computed at one padded width, whatever the batch. Eager on a CPU: the same bits in
    bf16 (where a width change alone moves a score by up to ~1e-3 nats/token). Compiled: inductor's kernels
    for this model's tiny widths (32) give a row other rounding by its place in the batch (~1e-8 nats/token;
    SmolLM2-135M's compiled layers gave the same bits at any place, checked by hand)."""
    for compile in (False, True):
        tables = []
        for batch_tokens, part_tokens in [(64, 1 << 18), (4096, 700)]:
            output = tmp_path / f"{compile}-{batch_tokens}"
            run(tiny_model_dir, prepared_corpus, output, precision="bf16", batch_tokens=batch_tokens,
                part_tokens=part_tokens, compile=compile)
            tables.append(read_scores(output))
        a, b = (t.column("logp_sum").to_numpy() for t in tables)
        if compile:
            assert np.abs(a - b).max() / tables[0].column("n_scored").to_numpy().min() < 1e-6
        else:
            assert np.array_equal(a, b)



def model_hidden_size(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["hidden_size"]


def test_features_are_the_models_hidden_states_and_logprob_quantiles(tiny_model_dir, prepared_corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    from miniplm.scoring.scorer import LOGP_QUANTILES

    manifest = run(tiny_model_dir, prepared_corpus, tmp_path / "f", features=True)
    rows = read_scores(tmp_path / "f").to_pylist()
    assert manifest["features"]["hidden_size"] == len(rows[0]["hidden"]) == model_hidden_size(tiny_model_dir)
    run(tiny_model_dir, prepared_corpus, tmp_path / "plain")
    plain = read_scores(tmp_path / "plain")  # features change no score
    assert plain.column("logp_sum").to_pylist() == [r["logp_sum"] for r in rows]
    split = PackedCorpus(prepared_corpus).split("train")
    eos = PackedCorpus(prepared_corpus).eos_id
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for row in rows[:20]:
        x = torch.tensor(split[row["instance_id"]].astype(np.int64))[None]
        with torch.no_grad():
            out = model(input_ids=x[:, :-1], output_hidden_states=True)
        scored = x[0, :-1] != eos
        logp = torch.log_softmax(out.logits[0].double(), -1).gather(1, x[0, 1:, None])[:, 0][scored]
        hidden = out.hidden_states[-1][0][scored].mean(0)  # the last entry is after the final norm
        assert np.allclose(row["hidden"], hidden.numpy(), atol=2e-3)  # fp16 storage
        assert np.allclose(row["logp_quantiles"], np.quantile(logp.numpy(), LOGP_QUANTILES), atol=1e-4)


def test_features_do_not_depend_on_batching_and_survive_a_resume(tiny_model_dir, prepared_corpus, tmp_path):
    tables = []
    for batch_tokens, part_tokens in [(64, 1 << 18), (4096, 700)]:
        output = tmp_path / f"b{batch_tokens}"
        run(tiny_model_dir, prepared_corpus, output, precision="bf16", batch_tokens=batch_tokens,
            part_tokens=part_tokens, features=True, compile=False)  # compiled: see the bf16 test above
        tables.append(read_scores(output))
    assert tables[0].column("hidden").to_pylist() == tables[1].column("hidden").to_pylist()
    assert tables[0].column("logp_quantiles").to_pylist() == tables[1].column("logp_quantiles").to_pylist()
    # a run killed with parts missing rescored only those: the same rows, features included
    output = tmp_path / "b4096"
    manifest = json.loads((output / "manifest.json").read_text())
    (output / "manifest.json").unlink()
    parts = sorted((output / "parts").glob("part-*.parquet"))
    assert len(parts) > 2
    parts[1].unlink()
    resumed = run(tiny_model_dir, prepared_corpus, output, precision="bf16", batch_tokens=4096, part_tokens=700,
                  features=True, compile=False)
    assert resumed["throughput"]["resumed_parts"] == len(parts) - 1 and resumed["key"] == manifest["key"]
    assert read_scores(output).equals(tables[1])

def test_plan_sorts_by_length_and_keeps_padding_low():
    lengths = np.random.default_rng(0).integers(2, 1025, size=5000)
    parts = plan_parts(lengths, part_tokens=100_000)
    flat = np.concatenate(parts)
    assert sorted(flat.tolist()) == list(range(5000))  # every instance exactly once
    assert np.all(np.diff(lengths[flat]) <= 0)  # longest first
    batches = [b for p in parts for b in plan_batches(p, lengths, 16384)]
    widths = [set(padded_width(lengths[b]).tolist()) for b in batches]
    assert all(len(w) == 1 for w in widths)  # one padded width per batch
    assert all(len(b) * w.pop() <= 16384 or len(b) == 1 for b, w in zip(batches, widths))
    assert padding_fraction(batches, lengths) < 0.02


def test_rerun_skips_and_changes_invalidate(tiny_model_dir, prepared_corpus, tmp_path, tokenizer_dir):
    logs = []
    first = score(cfg(tiny_model_dir, prepared_corpus, tmp_path / "s"), log=logs.append).manifest
    again = score(cfg(tiny_model_dir, prepared_corpus, tmp_path / "s", batch_tokens=99), log=logs.append)
    assert not again.ran and again.manifest == first
    other = save_tiny_llama(tmp_path / "other-model", tokenizer_dir, seed=1)
    changed = score(cfg(other, prepared_corpus, tmp_path / "s"), log=logs.append).manifest
    assert changed["key"] != first["key"]
    assert any("another run's output" in m for m in logs)
    assert read_scores(tmp_path / "s").num_rows == first["instances"]


def test_out_of_memory_halves_the_batch(tiny_model_dir, prepared_corpus, tmp_path, monkeypatch):
    from miniplm.scoring.scorer import LogProbScorer

    run(tiny_model_dir, prepared_corpus, tmp_path / "plain")
    original = LogProbScorer._score

    def flaky(self, instances, features=False):
        if len(instances) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return original(self, instances, features)

    monkeypatch.setattr(LogProbScorer, "_score", flaky)
    logs = []
    score(cfg(tiny_model_dir, prepared_corpus, tmp_path / "oom", features=True), log=logs.append)
    assert any("out of memory on a batch" in m for m in logs)
    a, b = read_scores(tmp_path / "plain"), read_scores(tmp_path / "oom")
    assert np.allclose(a.column("logp_sum").to_numpy(), b.column("logp_sum").to_numpy(), atol=1e-6)
    hidden = np.array(b.column("hidden").to_pylist())  # the halves' features joined row for row
    assert hidden.shape == (a.num_rows, model_hidden_size(tiny_model_dir)) and np.isfinite(hidden).all()


def test_refuses_a_model_with_another_tokenizer(prepared_corpus, tmp_path):
    model = save_tiny_llama(tmp_path / "m", save_other_tokenizer(tmp_path / "other-tok"))
    with pytest.raises(ValueError, match="tokenizer mismatch: model .* but corpus .* was packed with"):
        run(model, prepared_corpus, tmp_path / "s")


def test_refuses_instances_longer_than_the_context(prepared_corpus, tmp_path, tokenizer_dir):
    model = save_tiny_llama(tmp_path / "short", tokenizer_dir, context=32)
    with pytest.raises(ValueError, match="context of 32; re-run `miniplm prepare` with max_len <= 32"):
        run(model, prepared_corpus, tmp_path / "s")


def test_refuses_pickled_weights_and_unsupported_gguf(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from miniplm.core.models import load_causal_lm

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(OSError, match="could not load model"):
        load_causal_lm(str(pickled))

    path = write_gguf_of_unknown_architecture(tmp_path / "odd.gguf")
    with pytest.raises(ValueError, match="transformers reads GGUF files of these architectures: .*llama"):
        load_causal_lm(str(path))


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_same_rows(tiny_model_dir, prepared_corpus, tmp_path):
    run(tiny_model_dir, prepared_corpus, tmp_path / "single", part_tokens=500)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "miniplm", "score", "--model", str(tiny_model_dir), "--corpus", str(prepared_corpus),
           "--output", str(tmp_path / "ddp"), "--precision", "fp32", "--threads", "1", "--progress", "false",
           "--part-tokens", "500"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "manifest.json").read_text())["world_size"] == 2
    a, b = read_scores(tmp_path / "single"), read_scores(tmp_path / "ddp")
    assert a.column("instance_id").equals(b.column("instance_id"))
    assert a.column("n_scored").equals(b.column("n_scored"))
    assert np.abs(a.column("logp_sum").to_numpy() - b.column("logp_sum").to_numpy()).max() < 1e-5


@pytest.mark.slow
def test_ray_executor_gives_the_same_rows(tiny_model_dir, prepared_corpus, tmp_path):
    pytest.importorskip("ray")
    run(tiny_model_dir, prepared_corpus, tmp_path / "single", part_tokens=500)
    manifest = run(tiny_model_dir, prepared_corpus, tmp_path / "ray", part_tokens=500, executor="ray", ray_actors=2)
    assert manifest["executor"] == "ray"
    a, b = read_scores(tmp_path / "single"), read_scores(tmp_path / "ray")
    assert a.column("instance_id").equals(b.column("instance_id"))
    assert np.abs(a.column("logp_sum").to_numpy() - b.column("logp_sum").to_numpy()).max() < 1e-5


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_model_equals_eager(tiny_model_dir, prepared_corpus, tmp_path, precision):
    """compile (the default) fuses the output layer's log-softmax and each decoder layer: the same scores in
    fp32; in bf16 within 3e-4 nats/token (1.2e-4 measured: fused kernels keep fp32 between ops where eager
    rounds each op's output to bf16)."""
    per_token = []
    for compile in (False, True):
        run(tiny_model_dir, prepared_corpus, tmp_path / str(compile), precision=precision, compile=compile,
            batch_tokens=300)
        table = read_scores(tmp_path / str(compile))
        per_token.append(table.column("logp_sum").to_numpy() / table.column("n_scored").to_numpy())
    assert np.abs(per_token[0] - per_token[1]).max() < (1e-5 if precision == "fp32" else 3e-4)

def test_recompiling_families_score_eagerly_and_a_recompile_storm_falls_back(tiny_model_dir, prepared_corpus,
                                                                              monkeypatch):
    """Mamba's layers make torch.compile rebuild a graph for every new sequence width (114x slower than eager,
    bench/compile.py): they are not compiled. Any other family whose compiled code keeps building graphs
    after the first batch goes back to eager, saying so, with the same scores."""
    from transformers import AutoModelForCausalLM

    from miniplm.scoring import scorer as scoring
    from miniplm.training.presets import build_config

    corpus = PackedCorpus(prepared_corpus)
    tokenizer = corpus.load_tokenizer()
    instances = [corpus.split("train")[i][: 20 + 7 * i] for i in range(6)]  # six widths
    mamba = AutoModelForCausalLM.from_config(build_config("mamba-tiny", len(tokenizer), 65, corpus.eos_id,
                                                          tokenizer.pad_token_id)).eval()
    logs = []
    compiled = scoring.LogProbScorer(mamba, {corpus.eos_id}, None, log=logs.append, compile=True)
    eager = scoring.LogProbScorer(mamba, {corpus.eos_id}, None, log=lambda m: None)
    assert any("mamba: scoring eagerly" in m for m in logs) and compiled.compiled_layers is None
    assert all(np.array_equal(compiled.score([x])[0], eager.score([x])[0]) for x in instances)

    llama = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    logs = []
    storm = scoring.LogProbScorer(llama, {corpus.eos_id}, None, log=logs.append, compile=True)
    assert storm.compiled_layers  # compiled, then every batch seems to build more graphs than allowed:
    monkeypatch.setattr(scoring, "_graphs_built", lambda: storm.graphs_after_probe + scoring.GRAPH_STORM + 1)
    reference = scoring.LogProbScorer(llama, {corpus.eos_id}, None, log=lambda m: None)
    got = [storm.score([x])[0] for x in instances]
    assert any("scoring eagerly from here" in m for m in logs) and storm.compiled_layers is None
    assert np.abs(np.concatenate(got) - np.concatenate([reference.score([x])[0] for x in instances])).max() < 1e-4
