"""`miniplm run CONFIG.yaml`: the whole MiniPLM pipeline, one stage after another, each skipped when done.

prepare -> train the reference on D_ref -> score with the teacher and the reference -> [proxy: the teacher
labels a fraction, a predictor the rest] -> select (Difference Sampling and any baselines) -> [generate a SeqKD
corpus] -> export each student's data (re-tokenized for another family) -> for each student and baseline:
train, recording held-out loss against FLOPs, then its final evaluation (zero-shot tasks, more held-out splits)
-> reference points (n-gram levels, teacher, reference) -> report.

`RunConfig` holds every stage's own typed config, so a whole run is checked when it is loaded: a bad key or
value anywhere is refused, with its dotted path, before the first stage starts. Each stage runs through the
one executor (`miniplm.core.stage`): skipped when its manifest matches, resumed where it was killed, redone
everywhere with --force. Paths between stages are fixed under `output`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from miniplm.core.config import ConfigError, from_dict, option, to_dict
from miniplm.core.manifest import manifest_key, output_lock, read_manifest, write_json_atomic
from miniplm.core.stage import Stage, execute
from miniplm.data.bpe import TokenizerTrainConfig, TrainTokenizer
from miniplm.data.ngram import check_orders
from miniplm.data.prepare import Prepare, PrepareConfig
from miniplm.data.shards import PackedCorpus
from miniplm.evaluation import results as results_folder
from miniplm.evaluation.comparison import Rule, Signal, forest_plot, jsonable, rank, render_report
from miniplm.evaluation.final import (
    POINTS_FILE,
    FinalEval,
    FinalEvalConfig,
    ReferencePoints,
    ReferencePointsConfig,
)
from miniplm.evaluation.report import Report, ReportConfig
from miniplm.evaluation.tasks import PAPER_TASKS, EvalTasksConfig
from miniplm.export.export import Export, ExportConfig
from miniplm.kd.generate import Generate, GenerateConfig
from miniplm.scoring.proxy import Proxy, ProxyConfig
from miniplm.scoring.score import Score, ScoreConfig
from miniplm.selection.select import NEEDS, Select, SelectConfig
from miniplm.training.train import Train, TrainConfig, build_model, flop_matched_steps, planned_steps


@dataclass
class StudentConfig:
    name: str = option("student", "the run's name (its directory under <output>/students/)")
    model: str = option("qwen2-tiny", "a preset <family>-<size> or a transformers config.json")
    data: str = option("all", "'all': the whole scored pool in corpus order (no-KD); a selection's name "
                       "(e.g. miniplm); or 'seqkd' (the teacher-generated corpus)")
    kd: Literal["none", "vanilla"] = option("none", "vanilla: online token-level KD from the teacher "
                                            "(FLOP-matched unless this student's train.match_flops is false)")
    tokenizer: str | None = option(None, "a student tokenizer of another family (a path, `gpt-neox`, or the name of "
                                   "one of the run's `tokenizers`): its data is re-tokenized")
    train: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "`miniplm train` keys for this student, over the run's shared `train` (checked at load)"})


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
        "help": "more held-out splits to evaluate each final model on (e.g. heldout: the whole corpus mix; "
                "heldout_unseen: the default corpus's unseen domain)"})
    ngram_orders: list[int] = field(default_factory=lambda: [1, 2], metadata={
        "help": "n-gram reference levels: 1 (add-one unigram), 2 (interpolated Kneser-Ney bigram)"})


@dataclass
class StudentRecipe:
    model: str = option("llama-small", "a preset <family>-<size> or a transformers config.json")
    tokenizer: str | None = option(None, "a student tokenizer (a path, or the name of one of the run's `tokenizers`)")
    train: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "`miniplm train` keys for these students, over the run's shared `train`"})


@dataclass
class CompareSettings:
    signals: dict[str, SelectConfig] = field(default_factory=dict, metadata={
        "help": "named `miniplm select` configs to compare (e.g. miniplm-wd: {domain_quota: proportional}); each "
                "gets a random control with the same per-domain quotas"})
    seeds: list[int] = field(default_factory=lambda: [10, 11, 12], metadata={
        "help": "student seeds (init, data order, random draws); every arm is trained once per seed"})
    student: StudentRecipe = field(default_factory=StudentRecipe, metadata={"help": "the students' recipe"})
    second_size: StudentRecipe | None = option(None, "a second student size (the rank agreement between sizes "
                                               "says how stable the decision is)")
    tokens: int | None = option(None, "training tokens per student (null: the smallest student corpus); every "
                                "student also takes the same number of optimizer steps")
    splits: list[str] = field(default_factory=lambda: ["heldout", "heldout_hq", "heldout_unseen"], metadata={
        "help": "evaluation splits (those the prepared corpus holds); the rule decides on rule.split"})
    rule: Rule = field(default_factory=Rule, metadata={
        "help": "the decision rule: split, works, does_not_work, not_worse (nats/token), interval (t, bootstrap "
                "or none), confidence, seeds (pairs needed)"})

    def validate(self) -> None:
        if not self.signals:
            raise ConfigError("compare.signals: name at least one selection signal")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ConfigError(f"compare.seeds: give distinct seeds, got {self.seeds}")
        if self.rule.split not in self.splits:
            raise ConfigError(f"compare.rule.split: {self.rule.split!r} is not one of compare.splits {self.splits}")
        for name in self.signals:
            if name in ("all", "seqkd", "no-kd") or name.startswith("random-"):
                raise ConfigError(f"compare.signals.{name}: the name is taken (no-kd, all, seqkd and random-* are "
                                  f"the controls'); choose another")


# the keys `miniplm run` sets itself in each stage's config (the paths between stages)
FIXED = {
    "prepare": ("output",),
    "reference": ("corpus", "split", "output"),
    "score": ("model", "corpus", "split", "output"),
    "tokenizers": ("corpus", "output"),
    "selections": ("corpus", "split", "teacher", "reference", "output", "diagnostic_splits",
                   "diagnostic_max_instances"),
    "generate": ("model", "corpus", "split", "output"),
    "proxy": ("corpus", "split", "reference", "output", "max_instances", "exact_teacher"),
    "train": ("model", "corpus", "split", "output", "eval_every", "eval_corpus", "eval_split", "eval_max_instances",
              "kd", "teacher"),
}


@dataclass
class RunConfig:
    output: str = option("out/run", "directory of every stage's output")
    teacher: str = option("smollm2", "the teacher: local directory, hub id, .gguf file, or 'smollm2'")
    prepare: PrepareConfig = field(default_factory=PrepareConfig, metadata={"help": "`miniplm prepare` settings"})
    reference: TrainConfig = field(default_factory=lambda: TrainConfig(model="qwen2-mini"), metadata={
        "help": "`miniplm train` settings of the reference model (trained on the ref split, D_ref)"})
    score: ScoreConfig = field(default_factory=ScoreConfig, metadata={
        "help": "`miniplm score` settings for both scorings (e.g. max_instances: the size of the pool)"})
    proxy: ProxyConfig = field(default_factory=ProxyConfig, metadata={
        "help": "`miniplm proxy` settings, used by the selections that say `teacher: proxy` (the teacher labels "
                "label_fraction of the pool, a predictor from the reference's features ranks the rest)"})
    selections: dict[str, SelectConfig] = field(default_factory=lambda: {"miniplm": SelectConfig()}, metadata={
        "help": "named `miniplm select` runs (domain_quota: from:<name> refers to another selection)"})
    tokenizers: dict[str, TokenizerTrainConfig] = field(default_factory=dict, metadata={
        "help": "named `miniplm tokenizer train` runs (small-vocabulary student tokenizers), learnt from the "
                "prepared corpus; a student's `tokenizer:` may name one"})
    generate: GenerateConfig | None = option(None, "`miniplm generate` settings of the SeqKD corpus (needed "
                                             "when a student has data: seqkd)")
    train: TrainConfig = field(default_factory=TrainConfig, metadata={
        "help": "`miniplm train` settings shared by every student (without max_tokens/max_steps: the tokens "
                "of the smallest student corpus, so that all see the same number and none repeats)"})
    students: list[StudentConfig] = field(default_factory=lambda: [
        StudentConfig(name="no-kd", data="all"), StudentConfig(name="miniplm", data="miniplm")], metadata={
        "help": "the student runs; the first is the baseline of the compute-saving factor"})
    eval: EvalSettings = field(default_factory=EvalSettings)
    title: str = option("MiniPLM run", "the report's title")
    compare: CompareSettings | None = option(None, "`miniplm compare`: signals, seeds and a student recipe that "
                                             "expand into the selections and students above (replacing them)")

    def validate(self) -> None:
        names = [s.name for s in self.students]
        if not names:
            raise ConfigError("students: give at least one student")
        if len(set(names)) != len(names):
            raise ConfigError(f"students: names must be unique, got {', '.join(names)}")
        if not self.selections:
            raise ConfigError("selections: give at least one selection (e.g. miniplm: {})")
        for i, s in enumerate(self.students):
            where = f"students[{i}] ({s.name})"
            if s.data not in ("all", "seqkd") and s.data not in self.selections:
                raise ConfigError(f"{where}.data: {s.data!r} is not 'all', 'seqkd' or a selection "
                                  f"({', '.join(self.selections)})")
            if s.data == "seqkd" and self.generate is None:
                raise ConfigError(f"{where}.data: seqkd needs a `generate` section")
            if s.data == "seqkd" and s.tokenizer:
                raise ConfigError(f"{where}: SeqKD data is in the teacher's tokenizer; drop tokenizer")
            if s.kd == "vanilla" and s.tokenizer:
                raise ConfigError(f"{where}: Vanilla KD needs the teacher's tokenizer; drop tokenizer")
            fixed = sorted(set(s.train) & set(FIXED["train"]))
            if fixed:
                raise ConfigError(f"students[{i}].train: {', '.join(fixed)} are set by `miniplm run`; remove them")
            self.student_train(s)  # every key and value checked now, not when the student's turn comes
        sections = [("prepare", self.prepare), ("reference", self.reference), ("score", self.score),
                    ("train", self.train), ("generate", self.generate), ("proxy", self.proxy),
                    *((f"selections.{name}", c) for name, c in self.selections.items()),
                    *((f"tokenizers.{name}", c) for name, c in self.tokenizers.items())]
        for where, config in sections:
            if config is not None:
                fixed = FIXED[where.split(".")[0]]
                if isinstance(config, SelectConfig) and config.teacher == "proxy":  # the run's proxy table
                    fixed = tuple(f for f in fixed if f != "teacher")
                _refuse_fixed(where, config, fixed)
        if self.eval.points < 1:
            raise ConfigError(f"eval.points: must be at least 1, got {self.eval.points}")
        if self.eval.tasks:
            from_dict(EvalTasksConfig, {"tasks": self.eval.tasks}, "eval")
        try:
            check_orders(self.eval.ngram_orders, "eval.ngram_orders")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def student_train(self, student: StudentConfig) -> TrainConfig:
        """A student's `miniplm train` config: the shared `train`, its own keys over it, its model and KD."""
        settings = {**to_dict(self.train), **student.train, "model": student.model}
        if student.kd == "vanilla":
            settings.update(kd="vanilla", teacher=self.teacher, match_flops=student.train.get("match_flops", True))
        where = f"students[{[s.name for s in self.students].index(student.name)}].train"
        return from_dict(TrainConfig, settings, where)


def _refuse_fixed(where: str, config, fixed: tuple[str, ...]) -> None:
    defaults = type(config)()
    for name in fixed:
        if getattr(config, name) != getattr(defaults, name):
            raise ConfigError(f"{where}.{name}: set by `miniplm run` (the paths between stages); remove it")


def control(signal: str, config: SelectConfig) -> tuple[str, SelectConfig]:
    """A signal's control: a random selection of as many instances (or tokens) with the same per-domain quotas:
    the signal's own domain mix (`from:<signal>`) for a global cut, the same quotas for a quota'd one."""
    quota = config.domain_quota
    if quota == "none":
        return f"random-mix-{signal}", SelectConfig(selector="random", alpha=config.alpha,
                                                    budget_tokens=config.budget_tokens, domain_quota=f"from:{signal}",
                                                    max_instances=config.max_instances)
    random = SelectConfig(selector="random", alpha=config.alpha, budget_tokens=config.budget_tokens,
                          domain_quota=quota, max_instances=config.max_instances)
    if quota == "proportional":
        return "random-wd" + ("" if config.alpha == 0.5 and config.budget_tokens is None else
                              f"-{config.budget_tokens or config.alpha}"), random
    return f"random-{signal}", random


def expand_compare(config: RunConfig) -> RunConfig:
    """A run with a `compare:` section as the run it stands for: each signal and its control as selections, and
    for every size and seed a no-KD student, a student per signal and one per control, all alike but for their
    data (equal tokens and optimizer steps: `Pipeline.student_train_config`). Expanding twice changes nothing."""
    c = config.compare
    if c is None:
        return config
    selections: dict[str, SelectConfig] = {}
    controls: dict[str, str] = {}
    for name, signal in c.signals.items():
        selections[name] = signal
    for name, signal in c.signals.items():
        control_name, control_config = control(name, signal)
        if control_name in selections and selections[control_name] != control_config:
            raise ConfigError(f"compare.signals.{name}: its control {control_name} differs from one already made")
        selections[control_name] = control_config
        controls[name] = control_name
    arms = ["all", *dict.fromkeys(controls.values()), *c.signals]
    sizes = [("", c.student), *([(f"{c.second_size.model}-", c.second_size)] if c.second_size else [])]
    students = [StudentConfig(name=f"{prefix}{'no-kd' if arm == 'all' else arm}-s{seed}", model=recipe.model,
                              data=arm, tokenizer=recipe.tokenizer, train={**recipe.train, "seed": seed})
                for prefix, recipe in sizes for seed in c.seeds for arm in arms]
    train = dataclasses.replace(config.train, max_tokens=c.tokens) if c.tokens is not None else config.train
    e = dataclasses.replace(config.eval, split=c.rule.split, final_splits=list(c.splits))
    return dataclasses.replace(config, selections=selections, students=students, train=train, eval=e)


@dataclass
class Step:
    """One line of the run: a stage and (built when its turn comes, from the outputs before it) its config."""

    label: str
    stage: Stage
    config: Callable[[], Any]
    check: Callable[[], None] | None = None  # run after the stage: refuses what the stages after it cannot do


class Pipeline:
    """The stages of one run, with their fixed paths; `run()` executes them in order."""

    def __init__(self, config: RunConfig, force: bool = False, echo=print):
        config = expand_compare(config)
        self.config, self.force, self.echo = config, force, echo
        self.wall_seconds: list[dict] = []  # each stage of the last run(): its label, seconds, whether it ran
        self.out = Path(config.output)
        self.corpus = self.out / "corpus"
        self.reference = self.out / "reference"
        self.scores = {"teacher": self.out / "scores" / "teacher", "reference": self.out / "scores" / "reference",
                       "proxy": self.out / "scores" / "proxy"}
        self.seqkd = self.out / "seqkd"
        self.points = self.out / "reference_points"
        self.report = self.out / "report"

    @property
    def proxied(self) -> bool:
        """Some selection reads the proxy's teacher table."""
        return any(s.teacher == "proxy" for s in self.config.selections.values())

    @property
    def exact_teacher(self) -> bool:
        """The teacher scores the whole pool: unless the proxy's table serves every selection that needs it."""
        return not self.proxied or any(s.teacher != "proxy" and "teacher" in NEEDS[s.selector]
                                       for s in self.config.selections.values())

    def teacher_scores(self) -> Path:
        """A scoring run of the teacher (exact or proxy) whose manifest describes the teacher model."""
        return self.scores["teacher"] if self.exact_teacher else self.scores["proxy"]

    def selection(self, name: str) -> Path:
        return self.out / "selections" / name

    def student(self, name: str) -> Path:
        return self.out / "students" / name

    def tokenizer(self, student: StudentConfig) -> str | None:
        """A student's tokenizer spec: one of the run's trained tokenizers, or as given."""
        if student.tokenizer in self.config.tokenizers:
            return str(self.out / "tokenizers" / student.tokenizer)
        return student.tokenizer

    def draw(self, student: StudentConfig) -> str:
        """The selection a student's data comes from: a random selection is drawn anew for each student seed
        (`<name>@seed<N>`), so that seeds vary the draw as well as the weights and the order."""
        config = self.config.selections[student.data]
        seed = self.config.student_train(student).seed
        random = config.selector == "random" or config.temperature is not None
        return f"{student.data}@seed{seed}" if random and seed != config.seed else student.data

    def data(self, student: StudentConfig) -> Path:
        if student.data == "seqkd":
            return self.seqkd
        suffix = "" if student.tokenizer is None else "-" + manifest_key(self.tokenizer(student))[:8]
        name = "all" if student.data == "all" else self.draw(student)
        return self.out / "data" / f"{name}{suffix}"

    def arm(self, student: StudentConfig) -> tuple[str, int]:
        """(arm, seed): students that differ only in their seed are one arm, named after its first student."""
        def identity(s: StudentConfig) -> str:
            settings = {k: v for k, v in dataclasses.asdict(self.config.student_train(s)).items() if k != "seed"}
            return manifest_key([s.model, s.data, s.kd, s.tokenizer, settings])

        mine = identity(student)
        first = next(s for s in self.config.students if identity(s) == mine)
        return first.name, self.config.student_train(student).seed

    # -- the stages and their configs ------------------------------------------------------------------
    def steps(self) -> list[Step]:
        c = self.config
        steps = [Step("prepare", Prepare(), lambda: dataclasses.replace(c.prepare, output=str(self.corpus)),
                      self.check_eval_splits),
                 *(Step(f"tokenizer train {name}", TrainTokenizer(), functools.partial(self.tokenizer_config, name))
                   for name in c.tokenizers),
                 Step("train reference (D_ref)", Train(), lambda: dataclasses.replace(
                     c.reference, corpus=str(self.corpus), split="ref", output=str(self.reference)))]
        if self.exact_teacher:
            steps.append(Step("score teacher", Score(), lambda: self.score_config("teacher", c.teacher)))
        steps.append(Step("score reference", Score(), lambda: self.score_config("reference",
                                                                                str(self.reference / "final"))))
        if self.proxied:
            steps.append(Step("proxy: teacher labels and a predictor", Proxy(), self.proxy_config))
        steps += [Step(f"select {name}", Select(), functools.partial(self.select_config, name))
                  for name in c.selections]
        draws = {self.draw(s): s for s in c.students if s.data in c.selections and self.draw(s) != s.data}
        steps += [Step(f"select {name}", Select(), functools.partial(
            self.select_config, s.data, c.student_train(s).seed)) for name, s in draws.items()]
        if any(s.data == "seqkd" for s in c.students):
            steps.append(Step("generate SeqKD corpus", Generate(), self.generate_config))
        exports = {}
        for s in c.students:
            if s.data != "seqkd":
                exports.setdefault(self.data(s), s)
        steps += [Step(f"export {path.name}", Export(), functools.partial(self.export_config, s))
                  for path, s in exports.items()]
        for s in c.students:  # each student evaluated as soon as it is trained: an interrupted run keeps its results
            steps += [Step(f"train {s.name}", Train(), functools.partial(self.student_train_config, s)),
                      Step(f"evaluate {s.name}", FinalEval(), functools.partial(self.final_eval_config, s))]
        steps += [Step("reference points", ReferencePoints(), self.reference_points_config),
                  Step("report", Report(), self.report_config)]
        return steps

    def tokenizer_config(self, name: str) -> TokenizerTrainConfig:
        return dataclasses.replace(self.config.tokenizers[name], corpus=str(self.corpus),
                                   output=str(self.out / "tokenizers" / name))

    def score_config(self, who: str, model: str) -> ScoreConfig:
        return dataclasses.replace(self.config.score, model=model, corpus=str(self.corpus), split="train",
                                   output=str(self.scores[who]), features=who == "reference" and self.proxied)

    def proxy_config(self) -> ProxyConfig:
        c = self.config
        return dataclasses.replace(c.proxy, corpus=str(self.corpus), split="train",
                                   reference=str(self.scores["reference"]), output=str(self.scores["proxy"]),
                                   max_instances=c.score.max_instances,
                                   exact_teacher=str(self.scores["teacher"]) if self.exact_teacher else None,
                                   teacher=dataclasses.replace(c.score, model=c.teacher))

    def select_config(self, name: str, seed: int | None = None) -> SelectConfig:
        """Selection `name`, or its draw with another seed (written to `<name>@seed<N>`)."""
        config, e = self.config.selections[name], self.config.eval
        output = self.selection(name if seed is None else f"{name}@seed{seed}")
        quota = config.domain_quota
        if isinstance(quota, str) and quota.startswith("from:") and quota[5:] in self.config.selections:
            quota = f"from:{self.selection(quota[5:])}"
        pool = config.max_instances if config.max_instances is not None else self.config.score.max_instances
        teacher = self.scores["proxy" if config.teacher == "proxy" else "teacher"]
        return dataclasses.replace(config, corpus=str(self.corpus), split="train", teacher=str(teacher),
                                   reference=str(self.scores["reference"]), output=str(output),
                                   domain_quota=quota, max_instances=pool, seed=config.seed if seed is None else seed,
                                   diagnostic_splits=self.eval_splits(), diagnostic_max_instances=e.max_instances,
                                   report=config.report and seed is None)

    def generate_config(self) -> GenerateConfig:
        config = self.config.generate
        pool = config.max_instances if config.max_instances is not None else self.config.score.max_instances
        return dataclasses.replace(config, model=self.config.teacher, corpus=str(self.corpus), split="train",
                                   output=str(self.seqkd), max_instances=pool)

    def export_config(self, student: StudentConfig) -> ExportConfig:
        source = next(iter(self.config.selections)) if student.data == "all" else self.draw(student)
        return ExportConfig(selection=str(self.selection(source)),
                            subset="all" if student.data == "all" else "selected", format="tokens",
                            tokenizer=self.tokenizer(student), output=str(self.data(student)))

    @functools.cached_property
    def smallest_student_corpus(self) -> int:
        """Tokens of the smallest student corpus: every student's default budget (read once, after export)."""
        return min(_tokens(self.data(s)) for s in self.config.students)

    def student_train_config(self, student: StudentConfig) -> TrainConfig:
        e = self.config.eval
        config = self._data_train_config(student)
        if self.config.compare is not None and config.max_steps is None:
            config.max_steps = self.matched_steps(student)
        corpus = PackedCorpus(config.corpus)
        steps = planned_steps(config, corpus.split("train"))
        if config.kd == "vanilla" and config.match_flops:  # as many held-out points as the others get
            teacher = read_manifest(self.teacher_scores())["model"]["parameters"]
            student_parameters = sum(p.numel() for p in build_model(config, corpus, corpus.load_tokenizer())
                                     .parameters())
            steps = flop_matched_steps(steps, student_parameters, teacher)
        config.eval_every = max(1, steps // e.points)
        return config

    def _data_train_config(self, student: StudentConfig) -> TrainConfig:
        """A student's train config on its data, its budget in tokens (the smallest student corpus by default)."""
        e = self.config.eval
        config = dataclasses.replace(self.config.student_train(student), corpus=str(self.data(student)),
                                     split="train", output=str(self.student(student.name)),
                                     eval_corpus=str(self.corpus), eval_split=e.split,
                                     eval_max_instances=e.max_instances)
        if config.max_tokens is None and config.max_steps is None:
            config.max_tokens = self.smallest_student_corpus
        return config

    def matched_steps(self, student: StudentConfig) -> int:
        """compare: every student takes the optimizer steps its size's no-KD student takes for the token budget
        on the pool, so that the arms of a size differ in their data only (same steps, same batch)."""
        base = next(s for s in self.config.students if s.data == "all" and s.model == student.model
                    and s.tokenizer == student.tokenizer)
        config = self._data_train_config(base)
        return planned_steps(config, PackedCorpus(config.corpus).split("train"))

    def final_eval_config(self, student: StudentConfig) -> FinalEvalConfig:
        e, run = self.config.eval, self.student(student.name)
        return FinalEvalConfig(run=str(run), corpus=str(self.corpus), tasks=e.tasks, task_limit=e.task_limit,
                               splits=self.eval_splits(), max_instances=e.max_instances,
                               output=str(run / "evaluation"))

    def eval_splits(self) -> list[str]:
        """The held-out splits every model and level is measured on: the curve's split first, then each of
        `final_splits` that the prepared corpus holds instances of."""
        e = self.config.eval
        held = self._split_sizes()
        return list(dict.fromkeys([e.split, *(s for s in e.final_splits if held.get(s))]))

    def _split_sizes(self) -> dict[str, int]:
        manifest = read_manifest(self.corpus) or {}
        return {name: facts.get("instances", 0) for name, facts in manifest.get("splits", {}).items()}

    def check_eval_splits(self) -> None:
        """Refuse, right after prepare, a run whose evaluation split is empty (before hours of scoring and
        training fail on it); drop empty `final_splits` with a warning."""
        e, held = self.config.eval, self._split_sizes()
        if not held.get(e.split):
            state = "is empty" if e.split in held else "does not exist"
            usable = ", ".join(f"{name} ({n:,} instances)" for name, n in held.items() if n and name not in
                               ("train", "ref")) or "none besides train and ref"
            domains = (getattr(self.config.prepare.splits.get(e.split), "domains", None) or [])
            why = f" (no document has one of its domains: {', '.join(domains)})" if domains else ""
            raise ConfigError(f"eval.split: '{e.split}' {state} in {self.corpus}{why}; held-out splits with "
                              f"instances: {usable}. Choose one with eval.split=NAME, or give the split your own "
                              f"domains with prepare.splits.{e.split}.domains=[...]")
        for name in e.final_splits:
            if not held.get(name):
                self.echo(f"        warning: eval.final_splits: '{name}' has no instances in {self.corpus}; "
                          f"it is left out of the evaluations")

    def reference_points_config(self) -> ReferencePointsConfig:
        e, c = self.config.eval, self.config
        return ReferencePointsConfig(corpus=str(self.corpus), splits=self.eval_splits(), orders=e.ngram_orders,
                                     max_instances=e.max_instances, fit_max_instances=c.score.max_instances,
                                     tokenizers=list(dict.fromkeys(f"{s.tokenizer}={self.tokenizer(s)}"
                                                                   for s in c.students if s.tokenizer)),
                                     teacher=c.teacher if e.teacher_loss else None,
                                     reference=str(self.reference / "final"), output=str(self.points))

    def report_config(self) -> ReportConfig:
        costs = [self.scores["teacher"]] if self.exact_teacher else []
        costs += [self.scores["reference"], self.reference] + ([self.scores["proxy"]] if self.proxied else [])
        if any(s.data == "seqkd" for s in self.config.students):
            costs.append(self.seqkd)
        selection = "miniplm" if "miniplm" in self.config.selections else next(iter(self.config.selections))
        arms = [self.arm(s) for s in self.config.students]
        paired = [f"{s.name}:{arm}:{seed}" for s, (arm, seed) in zip(self.config.students, arms)] \
            if len(set(arms)) > len({arm for arm, _ in arms}) else []  # only where some arm has several seeds
        return ReportConfig(runs=[f"{s.name}={self.student(s.name)}" for s in self.config.students], paired=paired,
                            diagnostics=[f"{name}={self.selection(name)}" for name in self.config.selections],
                            selection=str(self.selection(selection)), costs=[str(c) for c in costs],
                            title=self.config.title, output=str(self.report), teacher=self.config.teacher,
                            reference_points=str(self.points / POINTS_FILE))

    # -- running ---------------------------------------------------------------------------------------
    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        with output_lock(self.out):
            write_json_atomic(self.out / "run_config.json", to_dict(self.config))
            steps = self.steps()
            self.wall_seconds.clear()
            for i, step in enumerate(steps, 1):
                messages: list[str] = []
                started = time.time()
                self.echo(f"[{i:2d}/{len(steps)}] {step.label} ...")
                try:
                    result = execute(step.stage, step.config(), self.force, log=messages.append)
                    if step.check is not None:
                        step.check()
                except BaseException:
                    for message in messages:
                        self.echo(f"        {message}")
                    raise
                for message in messages:  # a finished stage's log is kept quiet, but not its warnings
                    if "warning" in message:
                        self.echo(f"        {message}")
                gist = result.summary.splitlines()[-1] if result.summary else ""
                seconds = time.time() - started
                self.wall_seconds.append({"stage": step.label, "seconds": round(seconds, 1), "ran": result.ran})
                self.echo(f"        {'done' if result.ran else 'cached'} in {seconds:.1f} s"
                          + (f": {gist}" if gist else ""))
            if self.config.compare is not None:
                self.compare_report()
            return self.results()

    # -- compare: each signal against its control ------------------------------------------------------
    def compare_arms(self) -> dict[str, dict[int, dict]]:
        """{arm: {seed: student}} of the evaluated students (`<size prefix><arm>-s<seed>`)."""
        return results_folder.arms(self.out, default_seed=self.config.compare.seeds[0])

    def compare_sizes(self) -> dict[str, str]:
        """{student model: the prefix of its students' names} of the compared sizes."""
        c = self.config.compare
        return {c.student.model: ""} | ({c.second_size.model: f"{c.second_size.model}-"} if c.second_size else {})

    def compare_signals(self, arms: dict[str, dict[int, dict]]) -> dict[str, list[Signal]]:
        """Per student size, each signal's and its control's evaluated students."""
        c, splits = self.config.compare, tuple(self.config.compare.splits)
        return {size: [Signal(name, control(name, signal)[0],
                              results_folder.per_instance(arms.get(f"{prefix}{name}", {}), splits),
                              results_folder.per_instance(arms.get(f"{prefix}{control(name, signal)[0]}", {}), splits),
                              self.signal_cost(name))
                       for name, signal in c.signals.items()]
                for size, prefix in self.compare_sizes().items()}

    def signal_cost(self, name: str) -> float | None:
        """Offline seconds of a signal: the scoring runs it reads and its own selection (a classifier's fit)."""
        selection = read_manifest(self.selection(name))
        if selection is None:
            return None
        return results_folder.signal_seconds(selection, {who: (read_manifest(path) or {}).get("wall_seconds", 0.0)
                                          for who, path in self.scores.items()})

    def compare_report(self) -> Path:
        c, out = self.config.compare, self.out / "compare"
        rule, splits = c.rule, tuple(c.splits)
        out.mkdir(parents=True, exist_ok=True)
        arms = self.compare_arms()
        ranked = {size: rank(signals, rule) for size, signals in self.compare_signals(arms).items()}
        forest_plot(ranked, rule, out / "forest.png")
        pairs = [(f"{prefix}{control(name, signal)[0]}", f"{prefix}{name}") for prefix in self.compare_sizes().values()
                 for name, signal in c.signals.items()]
        # the students behind the ranking: each arm's losses, and where in the mix each signal gains or loses
        details = (results_folder.students_table(arms, splits) + results_folder.domain_table(
            self.corpus / rule.split / "instances.parquet", arms, pairs, rule.split))
        report = render_report(ranked, rule, f"{self.config.title}: which signal beats its control", "forest.png")
        (out / "report.md").write_text(report + "\n" + "\n".join(details), encoding="utf-8")
        write_json_atomic(out / "compare.json", jsonable({"rule": dataclasses.asdict(rule), "sizes": ranked}))
        for size, rows in ranked.items():
            self.echo(f"compare ({size}): " + "; ".join(f"{r['signal']} {r['outcome']}" for r in rows))
        self.echo(f"compare: {out / 'report.md'}")
        return out / "report.md"

    # -- the summary -------------------------------------------------------------------------------------
    def results(self) -> dict:
        report = read_json(self.report / "results.json")
        points = read_json(self.points / POINTS_FILE)
        rows = []
        primary = report.get("final_splits", {}).get(self.config.eval.split, {})
        for s in self.config.students:
            run = report["runs"].get(s.name, {})
            manifest = read_manifest(self.student(s.name))
            rows.append({"student": s.name, "model": s.model, "data": s.data, "kd": s.kd,
                         "parameters": manifest["model"]["parameters"], "tokens": manifest["tokens"],
                         "heldout_loss": run.get("final_loss"), "heldout_loss_ci95": run.get("final_loss_ci95"),
                         "heldout_bits_per_byte": run.get("final_bits_per_byte"),
                         "paired_difference": primary.get(s.name, {}).get("difference"),
                         "tasks_average": run.get("tasks", {}).get("average"),
                         "compute_saving": run.get("compute_saving")})
        reference = read_manifest(self.reference)
        teacher = read_manifest(self.teacher_scores()) or {}
        pool = {"scored": teacher.get("instances"), "scored_by": "proxy" if self.proxied else "teacher",
                "train_split": len(PackedCorpus(self.corpus).split("train"))}
        return {"students": rows, "reference_points": points, "report": str(self.report / "report.md"),
                "pool": pool,
                "reference": {"tokens": reference["tokens"], "steps": reference["steps"],
                              "validation": reference.get("validation")},
                "baseline": report["baseline"], "wall_seconds": self.wall_seconds}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _tokens(corpus: Path) -> int:
    return int(PackedCorpus(corpus).split("train").table.column("n_tokens").to_numpy().sum())
