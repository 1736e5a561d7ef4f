"""The catalogue of refused inputs: every row of docs/errors.md is a case here, and every case a row there.

Each case feeds one bad input to the real command line (`miniplm.cli.main`, in process) and returns what
the user sees (the error line on stderr, or the log line for inputs that are handled rather than refused);
the row's pattern must match it. The table in docs/errors.md is parsed, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import (
    make_corpus,
    save_other_tokenizer,
    save_tiny_llama,
    save_wide_tokenizer,
    write_gguf_of_unknown_architecture,
    write_jsonl,
)
from miniplm.cli import main
from miniplm.core.config import load_config
from miniplm.export.export import ExportConfig, export

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
ROW = re.compile(r"^\| `(?P<id>[a-z0-9-]+)` \| (?P<input>.+?) \| `(?P<pattern>.+)` \|$")


def documented() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text().splitlines():
        m = ROW.match(line)
        if m:
            assert m["id"] not in rows, f"docs/errors.md lists {m['id']} twice"
            rows[m["id"]] = m["pattern"]
    return rows


class Env:
    """Paths and helpers shared by the cases: a tiny corpus, model and tokenizer from conftest's fixtures."""

    def __init__(self, tmp: Path, corpus: Path, model: Path, tokenizer: Path, capsys):
        self.tmp, self.corpus, self.model, self.tokenizer, self.capsys = tmp, corpus, model, tokenizer, capsys

    def cli(self, *argv) -> str:
        """Run the command line; it must refuse (exit 2); returns its stderr."""
        self.capsys.readouterr()
        code = main([str(a) for a in argv])
        err = self.capsys.readouterr().err
        assert code == 2, f"expected a refusal (exit 2), got {code}: {err}"
        return err

    def prepare(self, inputs, *extra) -> str:
        return self.cli("prepare", "--inputs", inputs, "--tokenizer", self.tokenizer, "--output", self.tmp / "out",
                        "--max-len", 64, "--progress", "false", *extra)

    def jsonl(self, records, name="c.jsonl") -> Path:
        return write_jsonl(self.tmp / "raw" / name, records)

    def scores(self, name: str, model: Path | None = None, **extra) -> Path:
        out = self.tmp / name
        args = ["score", "--model", model or self.model, "--corpus", self.corpus, "--output", out, "--precision",
                "fp32", "--progress", "false"]
        for k, v in extra.items():
            args += [f"--{k.replace('_', '-')}", v]
        assert main([str(a) for a in args]) == 0
        return out

    def other_tokenizer(self) -> Path:
        return save_other_tokenizer(self.tmp / "other-tok")

    def selection(self) -> Path:
        ref_model = save_tiny_llama(self.tmp / "ref-model", self.tokenizer, seed=1)
        teacher, ref = self.scores("teacher"), self.scores("ref", ref_model)
        assert main(["select", "--corpus", str(self.corpus), "--teacher", str(teacher), "--reference", str(ref),
                     "--output", str(self.tmp / "sel"), "--report", "false", "--progress", "false"]) == 0
        return self.tmp / "sel"


# -- corpora ----------------------------------------------------------------------------------------------
def corpus_missing_input(e: Env) -> str:
    return e.prepare(e.tmp / "nowhere")


def corpus_zero_files(e: Env) -> str:
    return e.prepare(str(e.tmp / "nowhere" / "*.jsonl"))


def corpus_unknown_format(e: Env) -> str:
    return e.cli("prepare", "--output", e.tmp / "o", f"inputs=[{{path: {e.tmp}, format: csv}}]")


def corpus_empty_document(e: Env) -> str:
    return e.prepare(e.jsonl([{"text": "Fine."}, {"text": "   "}]), "--on-bad-record", "fail")


def corpus_bad_json(e: Env) -> str:
    return e.prepare(e.jsonl([{"text": "Fine."}, "{not json"]), "--on-bad-record", "fail")


def corpus_missing_field(e: Env) -> str:
    return e.prepare(e.jsonl([{"body": "no text field"}]), "--on-bad-record", "fail")


def corpus_non_string_field(e: Env) -> str:
    return e.prepare(e.jsonl([{"text": 42}]), "--on-bad-record", "fail")


def corpus_lone_surrogate(e: Env) -> str:
    return e.prepare(e.jsonl(['{"text": "a \\ud800 b"}']), "--on-bad-record", "fail")


def corpus_nothing_to_pack(e: Env) -> str:
    path = e.tmp / "raw" / "empty.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("")
    return e.prepare(path)


def corpus_invalid_utf8(e: Env) -> str:
    path = e.tmp / "raw" / "latin.txt"
    path.parent.mkdir(parents=True)
    path.write_bytes("caf\xe9 au lait. ".encode("latin-1") * 3)
    return e.prepare(path.parent, "--on-bad-record", "fail")


def corpus_binary_file(e: Env) -> str:
    path = e.tmp / "raw" / "blob.txt"
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(range(256)) * 4)
    return e.prepare(path.parent, "--on-bad-record", "fail")


def corpus_unreadable_parquet(e: Env) -> str:
    path = e.tmp / "raw" / "broken.parquet"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PAR1 this is not parquet PAR1")
    return e.prepare(path, "--on-bad-record", "fail")


def corpus_huge_document(e: Env) -> str:
    """Handled, not refused: one document is cut into at most max_chunks_per_document instances."""
    from miniplm.core.config import load_config
    from miniplm.data.prepare import PrepareConfig, prepare

    path = e.jsonl([{"text": "A sentence of some words. " * 400, "id": "huge"}])
    logs = []
    manifest = prepare(load_config(PrepareConfig, None, {
        "inputs": [str(path)], "tokenizer": str(e.tokenizer), "output": str(e.tmp / "o"), "max_len": 16,
        "max_chunks_per_document": 5, "progress": False, "splits": {"ref": {"fraction": 0.0},
        "heldout": {"fraction": 0.0}, "heldout_hq": {"fraction": 0.0}}}), log=logs.append).manifest
    assert manifest["splits"]["train"]["instances"] == 5
    return " ".join(f"{r}: {n}" for r, n in manifest["documents"]["skip_reasons"].items()) + " " + " ".join(logs)


def corpus_no_eos(e: Env) -> str:
    return e.prepare(e.jsonl([{"text": "Fine."}]), "--eos-token", "<not-a-token>")


# -- configs ----------------------------------------------------------------------------------------------
def config_unknown_key(e: Env) -> str:
    return e.cli("prepare", "max_lenn=64")


def config_wrong_type(e: Env) -> str:
    return e.cli("prepare", "max_len=long")


def config_bad_override(e: Env) -> str:
    return e.cli("prepare", "max_len")


def config_max_len_too_small(e: Env) -> str:
    return e.cli("prepare", "--max-len", "4")


def config_split_fractions(e: Env) -> str:
    return e.cli("prepare", "splits.ref.fraction=0.7", "splits.heldout.fraction=0.4")


def config_alpha_out_of_range(e: Env) -> str:
    return e.cli("select", "--alpha", "1.5")


def config_negative_budget(e: Env) -> str:
    return e.cli("select", "--budget-tokens", "-5")


def config_zero_batch(e: Env) -> str:
    return e.cli("train", "--batch-size", "0")


def config_kd_lambda(e: Env) -> str:
    return e.cli("train", "--kd-lambda", "2")


def config_unknown_preset(e: Env) -> str:
    return e.cli("train", "--corpus", e.corpus, "--output", e.tmp / "t", "--model", "qwen2-huge")


def config_unknown_task(e: Env) -> str:
    return e.cli("eval", "tasks", "--tasks", "storycloze")


def config_run_student_data(e: Env) -> str:
    return e.cli("run", "students=[{name: a, data: nope}]")


def config_run_empty_eval_split(e: Env) -> str:
    raw = make_corpus(e.tmp / "raw", n_docs=40)  # domains news and books: no wikipedia for heldout_hq
    return e.cli("run", f"output={e.tmp / 'run'}", f"teacher={e.model}", f"prepare.inputs=[{raw}]",
                 f"prepare.tokenizer={e.tokenizer}", "prepare.max_len=64", "prepare.progress=false",
                 "prepare.splits.heldout.fraction=0.2")


def config_classifier_target(e: Env) -> str:
    return e.cli("select", "--corpus", e.corpus, "--selector", "classifier", "--target", "heldout", "--teacher",
                 "null", "--reference", "null", "--output", e.tmp / "s", "--progress", "false")


def config_whole_domain_split(e: Env) -> str:
    return e.cli("prepare", "splits.ref.fraction=1")


def config_tokenizer_vocab_size(e: Env) -> str:
    return e.cli("tokenizer", "train", "--vocab-size", "100")


def config_ngram_order(e: Env) -> str:
    return e.cli("run", "eval.ngram_orders=[3]")


def config_patience_without_validation(e: Env) -> str:
    return e.cli("train", "--patience", "3")


def config_report_paired(e: Env) -> str:
    return e.cli("report", "--runs", e.tmp, "--paired", "a:b")


def config_grace(e: Env) -> str:
    return e.cli("select", "--grace-s", "0")


# -- models -----------------------------------------------------------------------------------------------
def model_missing(e: Env) -> str:
    return e.cli("score", "--model", e.tmp / "no-model", "--corpus", e.corpus, "--output", e.tmp / "s")


def model_tokenizer_mismatch(e: Env) -> str:
    other = save_tiny_llama(e.tmp / "other-model", e.other_tokenizer())
    return e.cli("score", "--model", other, "--corpus", e.corpus, "--output", e.tmp / "s")


def model_vocabulary_rows(e: Env) -> str:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(e.model)
    model.resize_token_embeddings(64)
    model.save_pretrained(e.tmp / "small-vocab")
    shutil.copy(e.model / "tokenizer.json", e.tmp / "small-vocab")
    shutil.copy(e.model / "tokenizer_config.json", e.tmp / "small-vocab")
    return e.cli("score", "--model", e.tmp / "small-vocab", "--corpus", e.corpus, "--output", e.tmp / "s")


def model_context_overflow(e: Env) -> str:
    short = save_tiny_llama(e.tmp / "short", e.tokenizer, context=32)
    return e.cli("score", "--model", short, "--corpus", e.corpus, "--output", e.tmp / "s")


def model_pickled_weights(e: Env) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(e.model)
    target = e.tmp / "pickled"
    shutil.copytree(e.model, target)
    (target / "model.safetensors").unlink()
    torch.save(model.state_dict(), target / "pytorch_model.bin")
    return e.cli("score", "--model", target, "--corpus", e.corpus, "--output", e.tmp / "s")


def model_unsupported_gguf(e: Env) -> str:
    path = write_gguf_of_unknown_architecture(e.tmp / "odd.gguf")
    return e.cli("score", "--model", path, "--tokenizer", e.tokenizer, "--corpus", e.corpus, "--output", e.tmp / "s")


def model_kd_other_vocabulary(e: Env) -> str:
    other = save_tiny_llama(e.tmp / "other-teacher", e.other_tokenizer())
    return e.cli("train", "--corpus", e.corpus, "--output", e.tmp / "t", "--model", "qwen2-tiny", "--kd", "vanilla",
                 "--teacher", other, "--max-steps", "1", "--progress", "false")


def model_student_without_eos(e: Env) -> str:
    no_eos = save_other_tokenizer(e.tmp / "no-eos", eos=False)
    return e.cli("export", "--selection", e.selection(), "--tokenizer", no_eos, "--output", e.tmp / "x",
                 "--progress", "false")


# -- state ------------------------------------------------------------------------------------------------
def state_not_a_corpus(e: Env) -> str:
    return e.cli("train", "--corpus", e.tmp / "nothing", "--output", e.tmp / "t")


def state_missing_split(e: Env) -> str:
    return e.cli("eval", "loss", "--model", e.model, "--corpus", e.corpus, "--split", "dev")


def state_missing_eval_split(e: Env) -> str:
    selection = e.selection()
    manifest = json.loads((selection / "manifest.json").read_text())
    return e.cli("select", "--corpus", e.corpus, "--teacher", manifest["scores"]["teacher"]["path"],
                 "--reference", manifest["scores"]["reference"]["path"], "--output", e.tmp / "sel2",
                 "--diagnostic-splits", "nope")


def state_no_scores(e: Env) -> str:
    return e.cli("select", "--corpus", e.corpus, "--teacher", e.tmp / "none", "--reference", e.tmp / "none2",
                 "--output", e.tmp / "sel")


def state_scores_of_another_corpus(e: Env) -> str:
    from miniplm.core.config import load_config
    from miniplm.data.prepare import PrepareConfig, prepare

    other = e.tmp / "other-corpus"
    prepare(load_config(PrepareConfig, None, {"inputs": [str(make_corpus(e.tmp / "raw2", n_docs=20))],
                                              "tokenizer": str(e.tokenizer), "output": str(other), "max_len": 64,
                                              "progress": False}), log=lambda m: None)
    teacher = e.scores("teacher")
    return e.cli("select", "--corpus", other, "--teacher", teacher, "--reference", teacher, "--output", e.tmp / "sel")


def state_partial_scores(e: Env) -> str:
    teacher = e.scores("teacher", max_instances=10)
    return e.cli("select", "--corpus", e.corpus, "--teacher", teacher, "--reference", teacher, "--output",
                 e.tmp / "sel")


def state_unfinished_scores(e: Env) -> str:
    teacher = e.scores("teacher", part_tokens=500)
    (teacher / "manifest.json").unlink()  # as a killed run leaves it: some parts, no manifest
    next((teacher / "parts").glob("part-*.parquet")).unlink()
    return e.cli("select", "--corpus", e.corpus, "--teacher", teacher, "--reference", teacher, "--output",
                 e.tmp / "sel")


def state_damaged_scores(e: Env) -> str:
    """A finished run that lost a part file: select refuses; the same score command re-scores what is gone."""
    teacher = e.scores("teacher", part_tokens=500)
    lost = next((teacher / "parts").glob("part-*.parquet"))
    lost.unlink()
    err = e.cli("select", "--corpus", e.corpus, "--teacher", teacher, "--reference", teacher, "--output",
                e.tmp / "sel")
    e.scores("teacher", part_tokens=500)
    assert lost.is_file()
    return err


def state_stale_selection(e: Env) -> str:
    selection = e.selection()
    manifest = json.loads((selection / "manifest.json").read_text())
    manifest["corpus"]["key"] = "0" * 16  # as if the corpus had been re-prepared since
    (selection / "manifest.json").write_text(json.dumps(manifest))
    return e.cli("export", "--selection", selection, "--output", e.tmp / "x", "--progress", "false")


def state_busy_output(e: Env) -> str:
    from miniplm.core.manifest import output_lock

    with output_lock(e.tmp / "busy"):
        return e.prepare(e.jsonl([{"text": "Fine."}]), "--output", e.tmp / "busy")


def state_disk_full(e: Env) -> str:
    """A write that fails midway (ENOSPC from the parquet writer): a clear error, and no part file left."""
    import errno

    import pyarrow.parquet as pq

    real = pq.write_table

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    pq.write_table = full
    try:
        err = e.cli("score", "--model", e.model, "--corpus", e.corpus, "--output", e.tmp / "s", "--precision", "fp32",
                    "--progress", "false")
    finally:
        pq.write_table = real
    assert not list((e.tmp / "s" / "parts").glob("*")), "a failed write left a file behind"
    return err


def state_changed_config(e: Env) -> str:
    """Handled, not refused: a run directory trained with another config is started over, said so."""
    from miniplm.core.config import load_config
    from miniplm.training.train import TrainConfig, train

    base = {"corpus": str(e.corpus), "output": str(e.tmp / "t"), "model": "qwen2-tiny", "max_steps": 2,
            "batch_size": 2, "warmup_steps": 1, "progress": False, "precision": "fp32"}
    train(load_config(TrainConfig, None, base), log=lambda m: None)
    logs = []
    train(load_config(TrainConfig, None, {**base, "lr": 0.01}), log=logs.append)
    return " ".join(logs)


# -- proxy scoring ----------------------------------------------------------------------------------------
def _proxy(e: Env, *extra) -> str:
    return e.cli("proxy", "--corpus", e.corpus, "--reference", e.scores("ref", features="true"), "--output",
                 e.tmp / "proxy", "--teacher.model", e.model, "--teacher.precision", "fp32", "--progress", "false",
                 *extra)


def proxy_fraction_out_of_range(e: Env) -> str:
    return e.cli("proxy", "--label-fraction", 1.5)


def proxy_reference_without_features(e: Env) -> str:
    return e.cli("proxy", "--corpus", e.corpus, "--reference", e.scores("ref"), "--output", e.tmp / "proxy")


def proxy_too_few_labels(e: Env) -> str:
    return _proxy(e, "--label-fraction", 0.05)


def proxy_another_pool(e: Env) -> str:
    return _proxy(e, "--split", "heldout")


def proxy_nan_features(e: Env) -> str:
    """Handled, not refused: NaN features are counted, kept out of the fit, and said."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from miniplm.core.config import load_config
    from miniplm.scoring.proxy import ProxyConfig, proxy

    reference = e.scores("ref", features="true")
    part = next((reference / "parts").glob("part-*.parquet"))
    table = pq.read_table(part)
    hidden = table.column("hidden").to_pylist()
    hidden[0] = [float("nan")] * len(hidden[0])
    pq.write_table(table.set_column(table.schema.get_field_index("hidden"), "hidden",
                                    pa.array(hidden, type=table.schema.field("hidden").type)), part)
    logs = []
    proxy(load_config(ProxyConfig, None, {"corpus": str(e.corpus), "reference": str(reference), "progress": False,
                                          "output": str(e.tmp / "proxy"), "label_fraction": 0.5,
                                          "teacher": {"model": str(e.model), "precision": "fp32"}}), log=logs.append)
    return " ".join(logs)


def proxy_bad_instances_file(e: Env) -> str:
    import numpy as np

    np.save(e.tmp / "ids.npy", np.array([3, 1, 2]))
    return e.cli("score", "--model", e.model, "--corpus", e.corpus, "--output", e.tmp / "s", "--instances",
                 e.tmp / "ids.npy", "--progress", "false")


# -- exports ----------------------------------------------------------------------------------------------
def export_vocabulary_past_the_format(e: Env) -> str:
    wide = save_wide_tokenizer(e.tmp / "wide", e.tokenizer)
    return e.cli("export", "--selection", e.selection(), "--format", "nanogpt", "--tokenizer", wide, "--output",
                 e.tmp / "x", "--progress", "false")


def export_option_of_another_format(e: Env) -> str:
    return e.cli("export", "--format", "tokens", "--block-size", 1024)


def export_missing_validation_split(e: Env) -> str:
    return e.cli("export", "--selection", e.selection(), "--format", "nanogpt", "--val-split", "dev", "--output",
                 e.tmp / "x", "--progress", "false")


def export_pad_is_eos(e: Env) -> str:
    """Handled, not refused: a tokenizer that pads with EOS gets a pad of its own in an hf export, said so."""
    logs = []
    export(load_config(ExportConfig, None, {"selection": str(e.selection()), "format": "hf",
                                            "output": str(e.tmp / "hf"), "progress": False}), log=logs.append)
    return " ".join(logs)


CASES = {name.replace("_", "-"): fn for name, fn in list(globals().items())
         if name.startswith(("corpus_", "config_", "model_", "state_", "proxy_", "export_")) and callable(fn)}


def test_the_catalogue_and_the_cases_agree_one_to_one():
    rows = documented()
    assert len(rows) >= 30
    assert sorted(rows) == sorted(CASES), (f"only in docs/errors.md: {sorted(set(rows) - set(CASES))}; "
                                           f"only in tests: {sorted(set(CASES) - set(rows))}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_input(case, tmp_path, prepared_corpus, tiny_model_dir, tokenizer_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # commands left at their default output write under tmp_path/out
    message = CASES[case](Env(tmp_path, prepared_corpus, tiny_model_dir, tokenizer_dir, capsys))
    pattern = documented()[case]
    assert re.search(pattern, message, re.S), f"{case}: {message!r} does not match {pattern!r}"
