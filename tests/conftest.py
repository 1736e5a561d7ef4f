"""Shared fixtures: a tiny byte-level BPE tokenizer trained here and saved, and small corpora on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

SENTENCES = [
    "The cat sat on the mat. It was warm!",
    "Why do birds sing? Nobody knows; they just do.",
    "A long line without any punctuation at all that goes on and on and on",
    "Rivers flow to the sea.\nMountains stand still.",
    "Numbers like 3.14 are not the end of a sentence. But this is.",
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A real HF fast tokenizer (trained on the test sentences), loadable with AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return path


WIDE_OFFSET = 70_000


def save_wide_tokenizer(path: Path, tokenizer_dir: Path, offset: int = WIDE_OFFSET) -> Path:
    """The test tokenizer with every id moved up by `offset` behind placeholder entries: a vocabulary past
    uint16 (as Llama-3's, Gemma's or Qwen's) whose ids for any text are exactly the test tokenizer's + offset."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = {token: i + offset for token, i in spec["model"]["vocab"].items()}
    spec["model"]["vocab"] = {**{f"<placeholder-{i}>": i for i in range(offset)}, **vocab}
    for added in spec["added_tokens"]:
        added["id"] += offset
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def make_corpus(root: Path, n_docs: int = 60, domains=("news", "books")) -> Path:
    """A jsonl corpus of `n_docs` documents per domain with ids, in one file per domain."""
    root.mkdir(parents=True, exist_ok=True)
    for d in domains:
        records = []
        for i in range(n_docs):
            text = " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(1 + i % 7))
            records.append({"text": f"{d} document {i}. {text}", "domain": d, "id": f"{d}-{i}"})
        write_jsonl(root / f"{d}.jsonl", records)
    return root


def save_tiny_llama(path: Path, tokenizer_dir: Path, seed: int = 0, layers: int = 2, context: int = 256) -> Path:
    """A tiny Llama built from a config, saved as safetensors with the test tokenizer beside it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=context,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_other_tokenizer(path: Path, eos: bool = True) -> Path:
    """A small BPE tokenizer with another vocabulary than the test tokenizer's (with or without EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    specials = ["</s>"] if eos else []
    tok.train_from_iterator(["other words entirely"] * 10, trainers.BpeTrainer(vocab_size=280,
                                                                               special_tokens=specials))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>" if eos else None).save_pretrained(path)
    return path


def write_gguf_of_unknown_architecture(path: Path) -> Path:
    """A valid GGUF file whose architecture ('fooarch') transformers cannot load."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="fooarch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


@pytest.fixture(scope="session")
def prepared_corpus(tmp_path_factory, tokenizer_dir) -> Path:
    """A corpus prepared with the test tokenizer (max_len 64), shared by the scoring tests."""
    from miniplm.core.config import load_config
    from miniplm.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("prepared")
    make_corpus(root / "raw", n_docs=80)
    cfg = load_config(PrepareConfig, None, {"inputs": [str(root / "raw")], "output": str(root / "corpus"),
                                            "tokenizer": str(tokenizer_dir), "max_len": 64, "progress": False})
    prepare(cfg, log=lambda m: None)
    return root / "corpus"


@pytest.fixture(scope="session")
def export_selection(prepared_corpus, tmp_path_factory) -> Path:
    """A Difference Sampling selection of the prepared corpus (random scores), for the export tests."""
    from miniplm.core.config import load_config
    from miniplm.data.shards import PackedCorpus
    from miniplm.selection.select import SelectConfig, select

    tmp = tmp_path_factory.mktemp("sel")
    n = len(PackedCorpus(prepared_corpus).split("train"))
    rng = np.random.default_rng(1)
    write_scores(tmp / "t", prepared_corpus, rng.normal(-3, 1, n))
    write_scores(tmp / "f", prepared_corpus, rng.normal(-5, 1, n))
    select(load_config(SelectConfig, None, {"corpus": str(prepared_corpus), "teacher": str(tmp / "t"),
                                            "reference": str(tmp / "f"), "output": str(tmp / "sel"),
                                            "report": False}), log=lambda m: None)
    return tmp / "sel"


def kept_ids(selection: Path, subset: str = "selected") -> list[int]:
    import pyarrow.parquet as pq

    t = pq.read_table(selection / "instances.parquet")
    flags = t.column("selected").to_pylist()
    ids = t.column("instance_id").to_pylist()
    return [i for i, f in zip(ids, flags) if (f if subset == "selected" else not f)]


def export_run(selection: Path, tmp_path: Path, fmt: str, log=None, **options) -> tuple[dict, Path]:
    """`miniplm export` of the selection into tmp_path/fmt; (manifest, output directory)."""
    from miniplm.core.config import load_config
    from miniplm.export.export import ExportConfig, export

    cfg = load_config(ExportConfig, None, {"selection": str(selection), "format": fmt,
                                           "output": str(tmp_path / fmt), "progress": False, **options})
    return export(cfg, log=log or (lambda m: None)).manifest, tmp_path / fmt


def write_scores(path: Path, corpus: Path, means: np.ndarray, n_scored: np.ndarray | None = None,
                 ids: np.ndarray | None = None, key: str | None = None) -> Path:
    """A scoring run's output (manifest + one part) holding the given per-token means."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from miniplm.data.shards import PackedCorpus

    c = PackedCorpus(corpus)
    ids = np.arange(len(means)) if ids is None else ids
    n = np.full(len(ids), 10) if n_scored is None else n_scored
    (path / "parts").mkdir(parents=True)
    pq.write_table(pa.table({"instance_id": ids.astype(np.int64), "n_scored": n.astype(np.int32),
                             "logp_sum": (means[ids] * n).astype(np.float64)}), path / "parts" / "part-000000.parquet")
    manifest = {"stage": "score", "key": path.name,
                "corpus": {"path": str(corpus), "key": key or c.key, "split": "train"}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def run_yaml(tmp_path: Path, tokenizer_dir: Path) -> dict:
    """A `miniplm run` config of every stage on tiny data (a tiny Llama teacher, tiny students)."""
    raw = make_corpus(tmp_path / "raw", n_docs=120)
    teacher = save_tiny_llama(tmp_path / "teacher", tokenizer_dir, seed=1)
    return {
        "output": str(tmp_path / "run"),
        "teacher": str(teacher),
        "prepare": {"inputs": [str(raw)], "tokenizer": str(tokenizer_dir), "max_len": 64, "shuffle": True,
                    "progress": False, "splits": {"ref": {"fraction": 0.2}, "heldout": {"fraction": 0.05},
                                                  "heldout_hq": {"fraction": 0.05, "domains": ["news"]}}},
        "reference": {"model": "qwen2-tiny", "max_steps": 6, "batch_size": 4, "warmup_steps": 2,
                      "precision": "fp32", "progress": False, "save_every": 6},
        "score": {"max_instances": 80, "progress": False, "precision": "fp32"},
        "selections": {"miniplm": {"alpha": 0.5, "progress": False},
                       "random-mix": {"selector": "random", "domain_quota": "from:miniplm", "progress": False,
                                      "report": False},
                       "miniplm-proxy": {"teacher": "proxy", "progress": False, "report": False}},
        "proxy": {"label_fraction": 0.7, "first_fraction": 1.0, "progress": False},
        "train": {"batch_size": 4, "warmup_steps": 2, "precision": "fp32", "progress": False, "save_every": 100},
        "students": [{"name": "no-kd", "model": "qwen2-tiny", "data": "all"},
                     {"name": "miniplm", "model": "llama-tiny", "data": "miniplm"},
                     {"name": "kd", "model": "qwen2-tiny", "data": "all", "kd": "vanilla"},
                     {"name": "small-vocab", "model": "llama-tiny", "data": "all", "tokenizer": "bpe280"}],
        "tokenizers": {"bpe280": {"vocab_size": 280, "progress": False}},
        "eval": {"split": "heldout_hq", "max_instances": 8, "points": 3, "tasks": ["lambada_openai"], "task_limit": 4,
                 "final_splits": ["heldout"]},
    }
