"""`miniplm run CONFIG.yaml`: the whole MiniPLM pipeline, one stage after another, each skipped when done.

prepare -> train the reference on D_ref -> score with the teacher and the reference -> select (Difference
Sampling and any baselines) -> [generate a SeqKD corpus] -> export each student's data (re-tokenized for
another family) -> train students and baselines, recording held-out loss against FLOPs -> zero-shot tasks ->
reference points (unigram and teacher held-out loss) -> report.

Every stage writes its own manifest and is skipped by it when its config and inputs are unchanged, and each
long stage resumes where it was killed, so `run` after a kill continues at the stage (and the part or
checkpoint) where it stopped. Paths between stages are fixed under `output`; stage settings are the stage
configs' own keys (see `miniplm <stage> --help`), given as mappings in the YAML.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from miniplm.config import ConfigError, load_config, option, to_dict
from miniplm.evaluation.tasks import PAPER_TASKS
from miniplm.manifest import manifest_key, write_json_atomic


@dataclass
class StudentConfig:
    name: str = option("student", "the run's name (its directory under <output>/students/)")
    model: str = option("qwen2-tiny", "a preset <family>-<size> or a transformers config.json")
    data: str = option("all", "'all': the whole scored pool in corpus order (no-KD); a selection's name "
                       "(e.g. miniplm); or 'seqkd' (the teacher-generated corpus)")
    kd: Literal["none", "vanilla"] = option("none", "vanilla: online token-level KD from the teacher "
                                            "(FLOP-matched unless train.match_flops is false)")
    tokenizer: str | None = option(None, "a student tokenizer of another family: its data is re-tokenized")
    train: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "`miniplm train` settings for this student (over the run's shared `train`)"})


@dataclass
class EvalSettings:
    split: str = option("heldout_hq", "held-out split of the prepared corpus (the paper's DCLM stand-in)")
    max_instances: int | None = option(256, "evaluate the first N held-out instances (null: all)")
    points: int = option(8, "held-out evaluations per student run: the points of its scaling curve")
    tasks: list[str] = field(default_factory=lambda: list(PAPER_TASKS), metadata={
        "help": "zero-shot tasks through lm-eval (empty: none)"})
    task_limit: int | None = option(200, "examples per task (null: all)")
    teacher_loss: bool = option(True, "also the teacher's held-out loss, as a reference point")
    final_splits: list[str] = field(default_factory=list, metadata={
        "help": "more held-out splits to evaluate each final model on (e.g. heldout: the whole corpus mix)"})


@dataclass
class RunConfig:
    output: str = option("out/run", "directory of every stage's output")
    teacher: str = option("smollm2", "the teacher: local directory, hub id, .gguf file, or 'smollm2'")
    prepare: dict[str, Any] = field(default_factory=dict, metadata={"help": "`miniplm prepare` settings"})
    reference: dict[str, Any] = field(default_factory=lambda: {"model": "qwen2-mini"}, metadata={
        "help": "`miniplm train` settings of the reference model (trained on the ref split, D_ref)"})
    score: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "`miniplm score` settings for both scorings (e.g. max_instances: the size of the pool)"})
    selections: dict[str, dict[str, Any]] = field(default_factory=lambda: {"miniplm": {}}, metadata={
        "help": "named `miniplm select` runs (domain_quota: from:<name> refers to another selection)"})
    generate: dict[str, Any] | None = option(None, "`miniplm generate` settings of the SeqKD corpus (needed "
                                             "when a student has data: seqkd)")
    train: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "`miniplm train` settings shared by every student (without max_tokens/max_steps: the tokens "
                "of the smallest student corpus, so that all see the same number and none repeats)"})
    students: list[StudentConfig] = field(default_factory=lambda: [
        StudentConfig(name="no-kd", data="all"), StudentConfig(name="miniplm", data="miniplm")], metadata={
        "help": "the student runs; the first is the baseline of the compute-saving factor"})
    eval: EvalSettings = field(default_factory=EvalSettings)
    title: str = option("MiniPLM run", "the report's title")

    def validate(self) -> None:
        names = [s.name for s in self.students]
        if not names:
            raise ConfigError("students: give at least one student")
        if len(set(names)) != len(names):
            raise ConfigError(f"students: names must be unique, got {', '.join(names)}")
        for s in self.students:
            if s.data not in ("all", "seqkd") and s.data not in self.selections:
                raise ConfigError(f"students.{s.name}.data: {s.data!r} is not 'all', 'seqkd' or a selection "
                                  f"({', '.join(self.selections)})")
            if s.data == "seqkd" and self.generate is None:
                raise ConfigError(f"students.{s.name}.data: seqkd needs a `generate` section")
            if s.data == "seqkd" and s.tokenizer:
                raise ConfigError(f"students.{s.name}: SeqKD data is in the teacher's tokenizer; drop tokenizer")
            if s.kd == "vanilla" and s.tokenizer:
                raise ConfigError(f"students.{s.name}: Vanilla KD needs the teacher's tokenizer; drop tokenizer")
        if not self.selections:
            raise ConfigError("selections: give at least one selection (e.g. miniplm: {})")
        if self.eval.points < 1:
            raise ConfigError(f"eval.points: must be at least 1, got {self.eval.points}")


class Pipeline:
    """The stages of one run, with their fixed paths; `run()` executes them in order."""

    def __init__(self, config: RunConfig, force: bool = False, echo=print):
        self.config, self.force, self.echo = config, force, echo
        self.out = Path(config.output)
        self.corpus = self.out / "corpus"
        self.reference = self.out / "reference"
        self.scores = {"teacher": self.out / "scores" / "teacher", "reference": self.out / "scores" / "reference"}
        self.seqkd = self.out / "seqkd"
        self.report = self.out / "report"

    def selection(self, name: str) -> Path:
        return self.out / "selections" / name

    def student(self, name: str) -> Path:
        return self.out / "students" / name

    def data(self, student: StudentConfig) -> Path:
        if student.data == "seqkd":
            return self.seqkd
        suffix = "" if student.tokenizer is None else "-" + manifest_key(student.tokenizer)[:8]
        return self.out / "data" / f"{student.data}{suffix}"

    # -- running ---------------------------------------------------------------------------------------
    def stages(self) -> list[tuple[str, Any]]:
        c = self.config
        stages = [("prepare", self.prepare), ("train reference (D_ref)", self.train_reference),
                  ("score teacher", lambda log: self.score("teacher", c.teacher, log)),
                  ("score reference", lambda log: self.score("reference", str(self.reference / "final"), log))]
        stages += [(f"select {name}", lambda log, name=name: self.select(name, log)) for name in c.selections]
        if any(s.data == "seqkd" for s in c.students):
            stages.append(("generate SeqKD corpus", self.generate))
        exports = {}
        for s in c.students:
            if s.data != "seqkd":
                exports.setdefault(self.data(s), s)
        stages += [(f"export {path.name}", lambda log, s=s: self.export(s, log)) for path, s in exports.items()]
        stages += [(f"train {s.name}", lambda log, s=s: self.train_student(s, log)) for s in c.students]
        if c.eval.tasks or c.eval.final_splits:
            stages += [(f"evaluate {s.name}", lambda log, s=s: self.evaluate(s, log)) for s in c.students]
        stages += [("reference points", self.reference_points), ("report", self.write_report)]
        return stages

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / "run_config.json", to_dict(self.config))
        stages = self.stages()
        for i, (name, fn) in enumerate(stages, 1):
            messages: list[str] = []

            def log(message: str, messages=messages) -> None:
                messages.append(message)

            started = time.time()
            self.echo(f"[{i:2d}/{len(stages)}] {name} ...")
            try:
                fn(log)
            except BaseException:
                for message in messages:
                    self.echo(f"        {message}")
                raise
            cached = any(("up to date" in m or " is done " in m or "cached" in m) for m in messages)
            self.echo(f"        {'cached' if cached else 'done'} in {time.time() - started:.1f} s"
                      + (f": {messages[-1]}" if messages and not cached else ""))
        return self.results()

    # -- the stages -------------------------------------------------------------------------------------
    def _stage_config(self, cls, settings: dict, fixed: dict, where: str):
        overlap = sorted(set(settings) & set(fixed))
        if overlap:
            raise ConfigError(f"{where}: {', '.join(overlap)} are set by `miniplm run` (paths between stages); "
                              f"remove them")
        try:
            return load_config(cls, None, {**settings, **fixed})
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def prepare(self, log) -> None:
        from miniplm.data.prepare import PrepareConfig, prepare

        cfg = self._stage_config(PrepareConfig, self.config.prepare, {"output": str(self.corpus)}, "prepare")
        prepare(cfg, force=self.force, log=log)

    def train_reference(self, log) -> None:
        from miniplm.training.train import TrainConfig, train

        settings = {"progress": True, **self.config.reference}
        cfg = self._stage_config(TrainConfig, settings, {"corpus": str(self.corpus), "split": "ref",
                                                         "output": str(self.reference)}, "reference")
        train(cfg, log=log)

    def score(self, who: str, model: str, log) -> None:
        from miniplm.scoring.run import ScoreConfig, score

        cfg = self._stage_config(ScoreConfig, self.config.score, {
            "model": model, "corpus": str(self.corpus), "split": "train", "output": str(self.scores[who])}, "score")
        score(cfg, force=self.force, log=log)

    def select(self, name: str, log) -> None:
        from miniplm.selection.select import SelectConfig, select

        # the pool is what was scored
        settings = {"max_instances": self.config.score.get("max_instances"), **self.config.selections[name]}
        quota = settings.get("domain_quota")
        if isinstance(quota, str) and quota.startswith("from:") and quota[5:] in self.config.selections:
            settings["domain_quota"] = f"from:{self.selection(quota[5:])}"
        cfg = self._stage_config(SelectConfig, settings, {
            "corpus": str(self.corpus), "split": "train", "teacher": str(self.scores["teacher"]),
            "reference": str(self.scores["reference"]), "output": str(self.selection(name))}, f"selections.{name}")
        select(cfg, force=self.force, log=log)

    def generate(self, log) -> None:
        from miniplm.training.generate import GenerateConfig, generate

        settings = {"max_instances": self.config.score.get("max_instances"), **(self.config.generate or {})}
        cfg = self._stage_config(GenerateConfig, settings, {
            "model": self.config.teacher, "corpus": str(self.corpus), "split": "train",
            "output": str(self.seqkd)}, "generate")
        generate(cfg, force=self.force, log=log)

    def export(self, student: StudentConfig, log) -> None:
        from miniplm.export import ExportConfig, export

        source = next(iter(self.config.selections)) if student.data == "all" else student.data
        cfg = load_config(ExportConfig, None, {
            "selection": str(self.selection(source)), "subset": "all" if student.data == "all" else "selected",
            "format": "tokens", "tokenizer": student.tokenizer, "output": str(self.data(student))})
        export(cfg, force=self.force, log=log)

    @functools.cached_property
    def smallest_student_corpus(self) -> int:
        """Tokens of the smallest student corpus: every student's default budget (read once, after export)."""
        return min(_tokens(self.data(s)) for s in self.config.students)

    def student_train_config(self, student: StudentConfig):
        from miniplm.data.shards import PackedCorpus
        from miniplm.training.train import TrainConfig, flop_matched_steps, planned_steps

        settings = {**self.config.train, **student.train, "model": student.model}
        if student.kd == "vanilla":
            settings = {"match_flops": True, **settings, "kd": "vanilla", "teacher": self.config.teacher}
        if settings.get("max_tokens") is None and settings.get("max_steps") is None:
            settings["max_tokens"] = self.smallest_student_corpus
        fixed = {"corpus": str(self.data(student)), "split": "train", "output": str(self.student(student.name)),
                 "eval_corpus": str(self.corpus), "eval_split": self.config.eval.split,
                 "eval_max_instances": self.config.eval.max_instances}
        cfg = self._stage_config(TrainConfig, settings, fixed, f"students.{student.name}")
        corpus = PackedCorpus(cfg.corpus)
        steps = planned_steps(cfg, corpus.split("train"))
        if cfg.kd == "vanilla" and cfg.match_flops:  # as many held-out points as the others get
            teacher = json.loads((self.scores["teacher"] / "manifest.json").read_text())["model"]["parameters"]
            steps = flop_matched_steps(steps, _parameters(cfg, corpus), teacher)
        cfg.eval_every = max(1, steps // self.config.eval.points)
        return cfg

    def train_student(self, student: StudentConfig, log) -> None:
        from miniplm.training.train import train

        train(self.student_train_config(student), log=log)

    def evaluate(self, student: StudentConfig, log) -> None:
        """Zero-shot tasks (eval_tasks.json) and the final model's loss on more splits (eval_splits.json)."""
        from miniplm.evaluation.tasks import EvalTasksConfig, evaluate_tasks

        run = self.student(student.name)
        e = self.config.eval
        trained = json.loads((run / "manifest.json").read_text())["key"]
        key = manifest_key(trained, e.tasks, e.task_limit, e.final_splits, e.max_instances)
        done = [run / "eval_tasks.json"] if e.tasks else []
        done += [run / "eval_splits.json"] if e.final_splits else []
        if not self.force and all(p.is_file() and json.loads(p.read_text()).get("key") == key for p in done):
            log(f"evaluate: {run} is up to date")
            return
        if e.tasks:
            result = evaluate_tasks(load_config(EvalTasksConfig, None, {
                "model": str(run / "final"), "tasks": e.tasks, "limit": e.task_limit}), log=log)
            write_json_atomic(run / "eval_tasks.json", {**result, "key": key})
        if e.final_splits:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from miniplm.data.shards import PackedCorpus
            from miniplm.evaluation.loss import HeldOut, heldout_loss

            model = AutoModelForCausalLM.from_pretrained(run / "final", use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(run / "final")
            corpus = PackedCorpus(self.corpus)
            losses = {split: heldout_loss(model, tokenizer, HeldOut(corpus, split, e.max_instances))
                      for split in e.final_splits}
            write_json_atomic(run / "eval_splits.json", {"key": key, "splits": losses})

    def reference_points(self, log) -> None:
        from miniplm.data.shards import PackedCorpus
        from miniplm.evaluation.loss import HeldOut, heldout_loss, unigram_loss
        from miniplm.models import load_causal_lm
        from miniplm.tokenizer import load_tokenizer

        corpus = PackedCorpus(self.corpus)
        e = self.config.eval
        key = manifest_key(corpus.key, self.config.teacher, e.split, e.max_instances, e.teacher_loss, e.final_splits)
        target = self.out / "reference_points.json"
        if not self.force and target.is_file() and json.loads(target.read_text()).get("key") == key:
            log(f"reference points: {target} is up to date")
            return
        teacher = load_causal_lm(self.config.teacher) if e.teacher_loss else None
        tokenizer = load_tokenizer(self.config.teacher) if e.teacher_loss else None

        def points_on(split: str) -> dict:
            heldout = HeldOut(corpus, split, e.max_instances)
            found = {"unigram": unigram_loss(corpus, heldout)}
            if teacher is not None:
                found["teacher"] = heldout_loss(teacher, tokenizer, heldout, show_progress=True)
            return found

        points = {"key": key, "split": e.split, **points_on(e.split),
                  "other_splits": {split: points_on(split) for split in e.final_splits}}
        write_json_atomic(target, points)
        log(f"reference points: unigram {points['unigram']['loss_per_token']:.4f}"
            + (f", teacher {points['teacher']['loss_per_token']:.4f}" if e.teacher_loss else "") + " nats/token")

    def write_report(self, log) -> None:
        from miniplm.report import ReportConfig, build_report

        costs = [self.scores["teacher"], self.scores["reference"], self.reference]
        if any(s.data == "seqkd" for s in self.config.students):
            costs.append(self.seqkd)
        selection = "miniplm" if "miniplm" in self.config.selections else next(iter(self.config.selections))
        build_report(load_config(ReportConfig, None, {
            "runs": [f"{s.name}={self.student(s.name)}" for s in self.config.students],
            "selection": str(self.selection(selection)), "costs": [str(c) for c in costs],
            "title": self.config.title, "output": str(self.report),
            "reference_points": str(self.out / "reference_points.json")}), log=log)

    # -- the summary -------------------------------------------------------------------------------------
    def results(self) -> dict:
        report = json.loads((self.report / "results.json").read_text())
        points = json.loads((self.out / "reference_points.json").read_text())
        rows = []
        for s in self.config.students:
            run = report["runs"].get(s.name, {})
            manifest = json.loads((self.student(s.name) / "manifest.json").read_text())
            rows.append({"student": s.name, "model": s.model, "data": s.data, "kd": s.kd,
                         "parameters": manifest["model"]["parameters"], "tokens": manifest["tokens"],
                         "heldout_loss": run.get("final_loss"), "tasks_average": run.get("tasks", {}).get("average"),
                         "compute_saving": run.get("compute_saving")})
        return {"students": rows, "reference_points": points, "report": str(self.report / "report.md"),
                "baseline": report["baseline"]}


def _parameters(config, corpus) -> int:
    from miniplm.training.train import build_model

    return sum(p.numel() for p in build_model(config, corpus, corpus.load_tokenizer()).parameters())


def _tokens(corpus: Path) -> int:
    from miniplm.data.shards import PackedCorpus

    return int(PackedCorpus(corpus).split("train").table.column("n_tokens").to_numpy().sum())
