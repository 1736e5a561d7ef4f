"""Evaluations of finished models that `miniplm run` records beside its students, as stages of their own.

    final eval        a student's final model: zero-shot tasks (eval_tasks.json) and its held-out loss on
                      every evaluated split, per instance too, for paired comparisons (eval_splits.json)
    reference points  the levels a student is read against on the same held-out instances, in nats/token and
                      bits per byte: n-gram models fitted on the training pool (in every tokenizer the run
                      uses), the teacher and the reference model (reference_points.json)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from miniplm.core import stop
from miniplm.core.config import ConfigError, Progress, option
from miniplm.core.manifest import read_manifest, write_json_atomic
from miniplm.core.models import load_causal_lm
from miniplm.core.stage import Stage
from miniplm.core.tokenizer import load_tokenizer, source_fingerprint
from miniplm.core.tokens import Retokenizer, masked_id_array
from miniplm.data import ngram
from miniplm.data.shards import PackedCorpus
from miniplm.evaluation.loss import HeldOut, describe, heldout_loss, ngram_loss
from miniplm.evaluation.tasks import EvalTasksConfig, evaluate_tasks

TASKS_FILE, SPLITS_FILE, POINTS_FILE = "eval_tasks.json", "eval_splits.json", "reference_points.json"


@dataclass
class FinalEvalConfig(Progress):
    run: str = option("out/train", "a finished `miniplm train` run (its final/ model is evaluated)")
    corpus: str = option("out/corpus", "the corpus holding the held-out splits")
    tasks: list[str] = field(default_factory=list, metadata={"help": "zero-shot tasks (empty: none)"})
    task_limit: int | None = option(None, "examples per task (null: all)")
    splits: list[str] = field(default_factory=list, metadata={"help": "held-out splits to evaluate on"})
    max_instances: int | None = option(None, "evaluate the first N instances of each split (null: all)")
    output: str = option("out/train/evaluation", "output directory", hashed=False)


class FinalEval(Stage):
    name = "final eval"
    config = FinalEvalConfig
    version = 2  # eval_splits.json holds per-instance losses

    def inputs(self, config: FinalEvalConfig, log) -> dict:
        trained = read_manifest(config.run)
        if trained is None or trained.get("stage") != "train":
            raise FileNotFoundError(f"{config.run} is not a finished `miniplm train` run")
        return {"run": trained["key"], "corpus": PackedCorpus(config.corpus).key if config.splits else None}

    def run(self, config: FinalEvalConfig, out: Path, inputs: dict, log) -> dict:
        final = Path(config.run) / "final"
        if config.tasks:
            result = evaluate_tasks(EvalTasksConfig(model=str(final), tasks=config.tasks, limit=config.task_limit,
                                                    progress=config.progress), log=log)
            write_json_atomic(out / TASKS_FILE, result)
            stop.check()  # written whole: a stop between the tasks and the losses abandons it
        if config.splits:
            model = AutoModelForCausalLM.from_pretrained(final, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(final)
            corpus = PackedCorpus(config.corpus)
            losses = {split: heldout_loss(model, tokenizer, HeldOut(corpus, split, config.max_instances),
                                          per_instance=True) for split in config.splits}
            write_json_atomic(out / SPLITS_FILE, {"splits": losses})
        return {"files": [name for name, on in ((TASKS_FILE, config.tasks), (SPLITS_FILE, config.splits)) if on]}

    def summary(self, manifest: dict) -> str:
        return f"evaluated {manifest['config']['run']}/final into {manifest['output']}"


@dataclass
class ReferencePointsConfig(Progress):
    corpus: str = option("out/corpus", "the prepared corpus (its held-out splits, and the instances the n-gram "
                         "models are fitted on)")
    splits: list[str] = field(default_factory=lambda: ["heldout_hq"], metadata={
        "help": "held-out splits to measure every level on (the first is the one students are read on)"})
    max_instances: int | None = option(None, "the first N instances of each split (null: all)")
    fit_split: str = option("train", "the split whose instances the n-gram models are fitted on")
    fit_max_instances: int | None = option(None, "fit on its first N instances (null: all); `miniplm run` "
                                           "passes the scored pool, the instances its students draw from")
    orders: list[int] = field(default_factory=lambda: [1, 2], metadata={
        "help": "n-gram orders: 1 (add-one unigram), 2 (interpolated Kneser-Ney bigram)"})
    tokenizers: list[str] = field(default_factory=list, metadata={
        "help": "student tokenizers of other families, as NAME=SPEC or SPEC: their n-gram levels too, named "
                "'unigram [NAME]' (the instances re-tokenized)"})
    teacher: str | None = option(None, "the teacher, whose held-out loss is also recorded (null: none)")
    reference: str | None = option(None, "the reference model, whose held-out loss is also recorded (null: none)")
    output: str = option("out/reference_points", "output directory", hashed=False)

    def validate(self) -> None:
        if not self.splits:
            raise ConfigError("splits: name at least one held-out split")
        try:
            ngram.check_orders(self.orders, "orders")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def _named(entry: str) -> tuple[str, str]:
    name, sep, spec = entry.partition("=")
    return (name, spec) if sep else (entry, entry)


class ReferencePoints(Stage):
    name = "reference points"
    config = ReferencePointsConfig
    version = 2

    def inputs(self, config: ReferencePointsConfig, log) -> dict:
        corpus = PackedCorpus(config.corpus)
        for split in [*config.splits, config.fit_split]:
            corpus.split(split)  # an unknown split is refused here, listing the ones that exist
        return {"corpus": corpus.key,
                "teacher": source_fingerprint(config.teacher) if config.teacher else None,
                "reference": source_fingerprint(config.reference) if config.reference else None,
                "tokenizers": {name: source_fingerprint(spec) for name, spec in map(_named, config.tokenizers)}}

    def run(self, config: ReferencePointsConfig, out: Path, inputs: dict, log) -> dict:
        corpus = PackedCorpus(config.corpus)
        source = corpus.load_tokenizer()
        fit_split = corpus.split(config.fit_split)
        n_fit = len(fit_split) if config.fit_max_instances is None else min(config.fit_max_instances, len(fit_split))
        fit_on = [fit_split[i] for i in range(n_fit)]
        vocabularies = [("", source, fit_on, corpus.eos_id)]
        max_len = corpus.manifest["max_len"]
        for name, spec in map(_named, config.tokenizers):
            tokenizer = load_tokenizer(spec)
            retokenize = Retokenizer(source, corpus.eos_id, tokenizer, max_len, "auto")
            vocabularies.append((f" [{name}]", tokenizer, [retokenize(x) for x in fit_on],
                                 int(tokenizer.eos_token_id)))
        ngrams = [(ngram.NAMES[order] + suffix, ngram.fit(order, instances, len(tokenizer),
                                                          masked_id_array(eos, tokenizer)), tokenizer, eos)
                  for suffix, tokenizer, instances, eos in vocabularies for order in config.orders]
        models = {who: (load_causal_lm(path), load_tokenizer(path))
                  for who, path in (("teacher", config.teacher), ("reference", config.reference)) if path}
        levels = {}
        for split in config.splits:
            heldout = HeldOut(corpus, split, config.max_instances)
            found = {name: ngram_loss(model, heldout, tokenizer, eos) for name, model, tokenizer, eos in ngrams}
            for who, (model, tokenizer) in models.items():
                found[who] = heldout_loss(model, tokenizer, heldout, show_progress=config.progress)
            for who, summary in found.items():
                log(f"{split}: {who}: {describe(summary)}")
            levels[split] = found
        write_json_atomic(out / POINTS_FILE, {"split": config.splits[0], "fit_instances": n_fit, "levels": levels})
        return {"points": {who: p["loss_per_token"] for who, p in levels[config.splits[0]].items()},
                "split": config.splits[0]}

    def summary(self, manifest: dict) -> str:
        return f"reference points on {manifest['split']}: " + ", ".join(
            f"{who} {loss:.4f}" for who, loss in manifest["points"].items()) + " nats/token"
