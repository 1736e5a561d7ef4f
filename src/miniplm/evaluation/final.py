"""Evaluations of finished models that `miniplm run` records beside its students, as stages of their own.

    final eval        a student's final model: zero-shot tasks (eval_tasks.json) and its held-out loss on
                      more splits (eval_splits.json)
    reference points  the levels a student is read against on the same held-out instances: the add-one
                      unigram model of the training split, and the teacher (reference_points.json)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from miniplm.core.config import Progress, option
from miniplm.core.manifest import read_manifest, write_json_atomic
from miniplm.core.models import load_causal_lm
from miniplm.core.stage import Stage
from miniplm.core.tokenizer import load_tokenizer, source_fingerprint
from miniplm.data.shards import PackedCorpus
from miniplm.evaluation.loss import HeldOut, heldout_loss, unigram_loss
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
        if config.splits:
            model = AutoModelForCausalLM.from_pretrained(final, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(final)
            corpus = PackedCorpus(config.corpus)
            losses = {split: heldout_loss(model, tokenizer, HeldOut(corpus, split, config.max_instances))
                      for split in config.splits}
            write_json_atomic(out / SPLITS_FILE, {"splits": losses})
        return {"files": [name for name, on in ((TASKS_FILE, config.tasks), (SPLITS_FILE, config.splits)) if on]}

    def summary(self, manifest: dict) -> str:
        return f"evaluated {manifest['config']['run']}/final into {manifest['output']}"


@dataclass
class ReferencePointsConfig(Progress):
    corpus: str = option("out/corpus", "the prepared corpus (its train split fits the unigram model)")
    split: str = option("heldout_hq", "the held-out split students are read on")
    other_splits: list[str] = field(default_factory=list, metadata={"help": "more held-out splits"})
    max_instances: int | None = option(None, "the first N instances of each split (null: all)")
    teacher: str | None = option(None, "the teacher, whose held-out loss is also recorded (null: unigram only)")
    output: str = option("out/reference_points", "output directory", hashed=False)


class ReferencePoints(Stage):
    name = "reference points"
    config = ReferencePointsConfig

    def inputs(self, config: ReferencePointsConfig, log) -> dict:
        return {"corpus": PackedCorpus(config.corpus).key,
                "teacher": source_fingerprint(config.teacher) if config.teacher else None}

    def run(self, config: ReferencePointsConfig, out: Path, inputs: dict, log) -> dict:
        corpus = PackedCorpus(config.corpus)
        teacher = load_causal_lm(config.teacher) if config.teacher else None
        tokenizer = load_tokenizer(config.teacher) if config.teacher else None

        def points_on(split: str) -> dict:
            heldout = HeldOut(corpus, split, config.max_instances)
            found = {"unigram": unigram_loss(corpus, heldout)}
            if teacher is not None:
                found["teacher"] = heldout_loss(teacher, tokenizer, heldout, show_progress=config.progress)
            return found

        points = {"split": config.split, **points_on(config.split),
                  "other_splits": {split: points_on(split) for split in config.other_splits}}
        write_json_atomic(out / POINTS_FILE, points)
        return {"points": {who: p["loss_per_token"] for who, p in points.items() if isinstance(p, dict)
                           and "loss_per_token" in p}}

    def summary(self, manifest: dict) -> str:
        return "reference points: " + ", ".join(f"{who} {loss:.4f}" for who, loss in manifest["points"].items()) \
            + " nats/token"
