"""`miniplm report`: one page (markdown and HTML, PNG plots) comparing training runs.

Inputs are stage outputs, read by convention: a training run directory holds `eval.jsonl` (held-out loss
against training FLOPs, from `train --eval-every`) or `eval_loss.json` (from `miniplm eval loss`), and
`eval_tasks.json` (from `miniplm eval tasks --output`). Offline costs (scoring, reference training,
generation) come from the manifests of the directories named in `costs`, and are kept apart from training
compute, as the paper does.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from markdown_it import MarkdownIt
from matplotlib.figure import Figure  # no pyplot: no global backend, no window

from miniplm.core.config import ConfigError, option
from miniplm.core.flops import forward_flops, training_flops
from miniplm.core.hashing import file_sha256
from miniplm.core.manifest import MANIFEST, read_manifest, write_json_atomic
from miniplm.core.metrics import half_width, paired_difference
from miniplm.core.models import weights_description
from miniplm.core.stage import Stage, StageResult, execute
from miniplm.evaluation.final import SPLITS_FILE, TASKS_FILE
from miniplm.evaluation.scaling import compute_saving, curve_rows, fit_scaling_law, read_curve


@dataclass
class ReportConfig:
    runs: list[str] = field(default_factory=list, metadata={
        "help": "training run directories, each as NAME=DIR or DIR (named by its folder)"})
    baseline: str | None = option(None, "the run compute savings are measured against (null: the first)")
    paired: list[str] = field(default_factory=list, metadata={
        "help": "RUN:ARM:SEED for each run of a multi-seed comparison: the report gives each arm's paired "
                "differences against the baseline's arm, seed by seed (`miniplm run` fills this in)"})
    selection: str | None = option(None, "a `miniplm select` output whose report is linked in")
    diagnostics: list[str] = field(default_factory=list, metadata={
        "help": "`miniplm select` outputs (NAME=DIR or DIR) whose n-gram diagnostics are tabulated side by side"})
    costs: list[str] = field(default_factory=list, metadata={
        "help": "offline stage outputs (score, train of the reference, generate) for the cost table"})
    reference_points: str | None = option(None, "a JSON of reference held-out losses (unigram, teacher) as "
                                          "`miniplm run` writes it")
    extrapolate_to: float | None = option(None, "also give each fitted loss at this many FLOPs")
    teacher: str | None = option(None, "the teacher, named (with how its weights are stored) under the title")
    title: str = option("MiniPLM report", "page title")
    output: str = option("out/report", "output directory (report.md, report.html, PNGs, results.json)",
                         hashed=False)

    def validate(self) -> None:
        if not self.runs:
            raise ConfigError("runs: name at least one training run directory")
        for entry in self.paired:
            run, arm, seed = (entry.split(":") + ["", "", ""])[:3]
            if not (run and arm and seed.lstrip("-").isdigit()) or entry.count(":") != 2:
                raise ConfigError(f"paired: {entry!r} is not RUN:ARM:SEED (e.g. no-kd-s2:no-kd:2)")


def _named(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    return (name, Path(path)) if sep else (Path(spec).name, Path(spec))


def _manifest(path: Path) -> dict:
    return read_manifest(path) or {}


def cost_rows(stage_dirs: list[Path]) -> list[dict]:
    """Offline compute of each stage: forward passes 2 N D (scoring, generation), training 6 N D."""
    rows = []
    for directory in stage_dirs:
        m = _manifest(directory)
        stage = m.get("generated_by") or m.get("stage")  # older generate manifests said "prepare"
        if stage == "score":
            n, d = m["model"]["parameters"], m["tokens_scored"]
            weights = m["model"].get("weights")
            rows.append({"stage": f"score ({m['config']['model']}" + (f", {weights}" if weights and "GGUF" in weights
                                                                      else "") + ")", "parameters": n, "tokens": d,
                         "flops": forward_flops(n, d)})
        elif stage == "train":
            n, d = m["model"]["parameters"], m["tokens"]
            rows.append({"stage": f"train {directory.name} ({m['config']['split']})", "parameters": n, "tokens": d,
                         "flops": training_flops(n, d)})
        elif stage == "proxy":  # the teacher's labels and the predictor; the reference pass is its own row
            cost = m["summary"]["cost"]
            rows.append({"stage": f"proxy ({m['model']['spec']} labels {m['summary']['label_fraction']:.0%}, "
                                  f"predictor)", "parameters": m["model"]["parameters"],
                         "tokens": cost["teacher_labels"]["tokens"], "flops": cost["teacher_labels"]["flops"]})
        elif stage == "generate":
            n = m.get("model", {}).get("parameters", 0)
            d = m["splits"]["train"]["tokens"]  # prompts are read once, continuations generated one by one
            rows.append({"stage": f"generate ({m['config']['model']})", "parameters": n, "tokens": d,
                         "flops": forward_flops(n, d)})
        else:
            raise ValueError(f"costs: {directory} is not a score, proxy, train or generate output (no such "
                             f"manifest)")
        rows[-1]["seconds"] = m.get("wall_seconds")
    return rows


class Report(Stage):
    name = "report"
    config = ReportConfig

    def inputs(self, config: ReportConfig, log) -> dict:
        """The content hash of every file the report reads: it is redone exactly when one of them changed."""
        files = []
        for _, path in (_named(s) for s in config.runs):
            files += [path / "eval.jsonl", path / "eval_loss.json", tasks_file(path), splits_file(path)]
        if config.selection:
            selection = Path(config.selection)
            files += [selection / MANIFEST, selection / "report.md", *sorted((selection / "report").glob("*"))]
        files += [Path(c) / MANIFEST for c in config.costs]
        files += [path / MANIFEST for _, path in (_named(s) for s in config.diagnostics)]
        files += [Path(config.reference_points)] if config.reference_points else []
        return {str(f): file_sha256(f) for f in files if f.is_file()}

    def run(self, config: ReportConfig, out: Path, inputs: dict, log) -> dict:
        return _render(config, out, log)

    def summary(self, manifest: dict) -> str:
        return f"report: {manifest['output']}/report.md (and report.html beside it)"


def build_report(config: ReportConfig, force: bool = False, log=print) -> StageResult:
    """Write the report (or reuse it when none of the files it reads changed)."""
    return execute(Report(), config, force, log)


def splits_file(run: Path) -> Path:
    """A run's final held-out losses on more splits (`miniplm run` keeps them in <run>/evaluation/)."""
    return run / "evaluation" / SPLITS_FILE


def tasks_file(run: Path) -> Path:
    """A run's zero-shot results: `miniplm run` keeps them in <run>/evaluation/, `eval tasks --output` anywhere."""
    nested = run / "evaluation" / TASKS_FILE
    return nested if nested.is_file() else run / TASKS_FILE


def _number(value, digits: int = 4) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def _reference_points(points: dict) -> list[str]:
    """The levels students are read against, per held-out split: nats/token with its 95% interval, bits per
    byte (comparable across tokenizers), and the share of the unigram-to-teacher gap the reference closes."""
    md = ["## Reference points", "",
          f"Every level on the same held-out instances; n-gram models fitted on {points['fit_instances']:,} "
          "instances of the training pool (a bracketed name: in that student tokenizer's ids).", ""]
    for split, levels in points["levels"].items():
        md += [f"**{split}**", "", "| level | nats/token (95% CI) | bits/byte | tokens | bytes |",
               "|---|---|---|---|---|"]
        md += [f"| {who} | {p['loss_per_token']:.4f} +- {half_width(p):.4f} | {_number(p.get('bits_per_byte'))} | "
               f"{p['tokens']:,} | {p.get('bytes', 0):,} |" for who, p in levels.items()]
        if {"unigram", "teacher", "reference"} <= set(levels):
            unigram, teacher, ref = (levels[k]["loss_per_token"] for k in ("unigram", "teacher", "reference"))
            md += ["", f"The reference closes {100 * (unigram - ref) / (unigram - teacher):.0f}% of the gap from the "
                   f"unigram level to the teacher on {split}."]
        md.append("")
    md += ["A student below the unigram level has learned more than token frequencies; below the bigram level, "
           "more than pairs of tokens.", ""]
    return md


def _diagnostics(selections: list[tuple[str, Path]]) -> list[str]:
    """Each selection's n-gram diagnostic: held-out loss of n-gram models fitted on its kept data, and the
    difference from the same models fitted on the whole pool."""
    md = ["## Selections through n-gram models (no student needed)", "",
          "Held-out loss (nats/token) of unigram and bigram models fitted on each selection's kept data, and in "
          "brackets the difference from models fitted on the whole pool: a selection that only moves the domain "
          "mix toward an evaluation split already gains here.", ""]
    found = {name: (read_manifest(path) or {}).get("ngram_diagnostic") for name, path in selections}
    found = {name: d for name, d in found.items() if d}
    if not found:
        return []
    splits = list(dict.fromkeys(split for d in found.values() for split in d))
    columns = [(split, level) for split in splits for level in ("unigram", "bigram")]
    md += ["| selection | " + " | ".join(f"{level} {split}" for split, level in columns) + " |",
           "|---" * (len(columns) + 1) + "|"]
    first = next(iter(found.values()))
    cells = [f"{first[split]['pool'][level]['loss_per_token']:.4f}" if split in first else "-"
             for split, level in columns]
    md.append("| (whole pool) | " + " | ".join(cells) + " |")
    for name, d in found.items():
        cells = []
        for split, level in columns:
            if split not in d:
                cells.append("-")
                continue
            kept, pool = d[split]["kept"][level]["loss_per_token"], d[split]["pool"][level]["loss_per_token"]
            cells.append(f"{kept:.4f} ({kept - pool:+.4f})")
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*md, ""]


def _final_splits(baseline: str, extra: dict[str, dict]) -> tuple[list[str], dict]:
    """Each run's final model on every evaluated split, and its difference from the baseline's on the same
    instances with a paired bootstrap interval (far narrower than either model's own)."""
    md = ["## Final models on every held-out split", "",
          f"Each run's final model, and its difference from {baseline}'s on the same instances (95% paired "
          "bootstrap interval; an interval that excludes 0 is a difference these instances can tell). "
          "Bits per byte compare across tokenizers.", "",
          "| split | run | nats/token (95% CI) | bits/byte | minus baseline, nats/token [95% CI] | "
          "minus baseline, bits/byte [95% CI] |",
          "|---|---|---|---|---|---|"]
    found: dict = {}
    splits = list(dict.fromkeys(split for losses in extra.values() for split in losses))
    for split in splits:
        base = extra.get(baseline, {}).get(split, {}).get("per_instance")
        for run, losses in extra.items():
            if split not in losses:
                continue
            p = losses[split]
            row = {k: p.get(k) for k in ("loss_per_token", "loss_per_token_ci95", "bits_per_byte")}
            cells = ["-", "-"]
            if run != baseline and base is not None and p.get("per_instance") is not None:
                row["difference"] = d = paired_difference(p["per_instance"], base)
                cells = [f"{d['loss_per_token']:+.4f} [{d['loss_per_token_ci95'][0]:+.4f}, "
                         f"{d['loss_per_token_ci95'][1]:+.4f}]",
                         f"{d['bits_per_byte']:+.4f} [{d['bits_per_byte_ci95'][0]:+.4f}, "
                         f"{d['bits_per_byte_ci95'][1]:+.4f}]"]
            found.setdefault(split, {})[run] = row
            md.append(f"| {split} | {run} | {p['loss_per_token']:.4f} +- {half_width(p):.4f} | "
                      f"{_number(p.get('bits_per_byte'))} | " + " | ".join(cells) + " |")
    return [*md, ""], found


def _paired_differences(paired: list[str], baseline: str, finals: dict[str, dict], extra: dict[str, dict]) -> tuple:
    """Per arm, the run-minus-baseline differences of final held-out losses between runs of the same seed:
    mean and standard deviation over seeds, on the curve's split and on every split of the final evaluations."""
    runs = {}
    for entry in paired:
        run, arm, seed = entry.split(":")
        runs[(arm, int(seed))] = run
    arm_of = {run: arm for (arm, _), run in runs.items()}
    if baseline not in arm_of:
        return [], {}
    base_arm = arm_of[baseline]

    def losses(run: str) -> dict[str, float]:
        found = {f"{key} (curve)": finals.get(run, {}).get(key) for key in ("loss_per_token", "bits_per_byte")}
        for split, p in extra.get(run, {}).items():
            found.update({f"{key} ({split})": p.get(key) for key in ("loss_per_token", "bits_per_byte")})
        return found

    md = ["## Paired differences across seeds", "",
          f"Each arm minus {base_arm} trained with the same seed (initial weights, data order, random draws): "
          "mean +- standard deviation over seeds. Negative: lower loss than the baseline arm.", "",
          "| arm | seeds | metric | arm mean | difference |", "|---|---|---|---|---|"]
    results = {}
    for arm in dict.fromkeys(arm for arm, _ in runs):
        if arm == base_arm:
            continue
        seeds = sorted(seed for a, seed in runs if a == arm and (base_arm, seed) in runs)
        if not seeds:
            continue
        mine = [losses(runs[(arm, seed)]) for seed in seeds]
        base = [losses(runs[(base_arm, seed)]) for seed in seeds]
        results[arm] = {"seeds": seeds}
        for metric in mine[0]:
            values = [(m.get(metric), b.get(metric)) for m, b in zip(mine, base)]
            if any(v is None or w is None for v, w in values):
                continue
            diffs = np.array([v - w for v, w in values])
            own = np.array([v for v, _ in values])
            spread = float(diffs.std(ddof=1)) if len(diffs) > 1 else math.nan
            results[arm][metric] = {"mean_difference": float(diffs.mean()), "std_difference": spread,
                                    "differences": diffs.tolist(), "arm_mean": float(own.mean())}
            md.append(f"| {arm} | {', '.join(map(str, seeds))} | {metric} | {own.mean():.4f} | "
                      f"{diffs.mean():+.4f} +- {_number(spread)} |")
    md.append("")
    return md, results


def _render(config: ReportConfig, out: Path, log) -> dict:
    runs = [_named(s) for s in config.runs]
    names = [n for n, _ in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"runs: two runs share a name ({', '.join(names)}); name them as NAME=DIR")
    baseline = config.baseline or names[0]
    if baseline not in names:
        raise ConfigError(f"baseline: {baseline!r} is not one of the runs ({', '.join(names)})")

    curves, finals, tasks, extra = {}, {}, {}, {}
    for name, path in runs:
        if not path.is_dir():
            raise FileNotFoundError(f"runs: {path} is not a directory")
        try:
            curves[name] = read_curve(path)
            finals[name] = curve_rows(path)[-1]
        except FileNotFoundError as exc:
            log(f"report: {exc}")
        if tasks_file(path).is_file():
            tasks[name] = json.loads(tasks_file(path).read_text())
        if splits_file(path).is_file():
            extra[name] = json.loads(splits_file(path).read_text())["splits"]

    md = [f"# {config.title}", ""]
    if config.teacher:
        md += [f"Teacher: `{config.teacher}` ({weights_description(config.teacher)}).", ""]
    results: dict = {"runs": {}, "baseline": baseline}
    if curves:
        md += _curves(config, out, baseline, curves, finals, results["runs"])
    if extra:
        lines, results["final_splits"] = _final_splits(baseline, extra)
        md += lines
    if config.paired:
        lines, results["paired_differences"] = _paired_differences(config.paired, baseline, finals, extra)
        md += lines
    if config.reference_points:
        results["reference_points"] = json.loads(Path(config.reference_points).read_text())
        md += _reference_points(results["reference_points"])
    if tasks:
        md += _tasks(tasks, results["runs"])
    if config.selection:
        md += _selection(Path(config.selection), out)
    if config.diagnostics:
        md += _diagnostics([_named(spec) for spec in config.diagnostics])
    if config.costs:
        results["costs"] = cost_rows([Path(p) for p in config.costs])
        md += _costs(results["costs"])
    text = "\n".join(md)
    (out / "report.md").write_text(text)
    body = MarkdownIt("commonmark").enable("table").render(text)
    (out / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{config.title}</title><style>body{{font-family:"
        "sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        f"padding:2px 6px}}img{{max-width:100%}}</style></head><body>{body}</body></html>")
    write_json_atomic(out / "results.json", results)
    return {"baseline": baseline, "runs": names}


def _curves(config: ReportConfig, out: Path, baseline: str, curves: dict, finals: dict, rows: dict) -> list[str]:
    """The loss-against-compute plot and table: each run's final loss, its fit and its compute saving."""
    fits = {name: fit_scaling_law(c, y) for name, (c, y) in curves.items() if len(c) >= 3}
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for i, (name, (c, y)) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(c, y, "o", color=color, ms=3, label=name)
        if name in fits:
            grid = np.geomspace(c.min(), max(c.max(), config.extrapolate_to or 0), 100)
            ax.plot(grid, fits[name].loss_at(grid), "--", color=color, lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (6ND; + teacher forward for Vanilla KD)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("loss against compute; dashed: fitted L(C) = A C^-a + L_inf")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_compute.png", dpi=120)
    md = ["## Held-out loss against training compute", "", "![loss vs compute](loss_vs_compute.png)", "",
          "| run | final FLOPs | final loss (95% CI) | bits/byte | A | alpha | L_inf | fit RMSE | points |"
          + (" loss at extrapolated C |" if config.extrapolate_to else "") + f" compute saving vs {baseline} |",
          "|---|---|---|---|---|---|---|---|---|" + ("---|" if config.extrapolate_to else "") + "---|"]
    base_fit = fits.get(baseline)
    target = float(curves[baseline][1][-1]) if baseline in curves else math.nan
    for name, (c, y) in curves.items():
        fit, final = fits.get(name), finals[name]
        saving = compute_saving(base_fit, fit, target) if (fit and base_fit and name != baseline) else None
        row = {"final_flops": float(c[-1]), "final_loss": float(y[-1]),
               "final_loss_ci95": final.get("loss_per_token_ci95"), "final_bits_per_byte": final.get("bits_per_byte"),
               "fit": fit.to_dict() if fit else None, "compute_saving": saving}
        interval = f" +- {half_width(final):.4f}" if final.get("loss_per_token_ci95") else ""
        cells = [name, f"{c[-1]:.3g}", f"{y[-1]:.4f}{interval}", _number(final.get("bits_per_byte"))]
        cells += [f"{fit.A:.4g}", f"{fit.alpha:.4f}", f"{fit.L_inf:.4f}", f"{fit.rmse:.4f}", str(fit.points)] \
            if fit else ["-"] * 4 + [str(len(c))]
        if config.extrapolate_to:
            row["loss_at_extrapolation"] = float(fit.loss_at(config.extrapolate_to)) if fit else None
            cells.append(_number(row["loss_at_extrapolation"]))
        cells.append("(baseline)" if name == baseline else f"{saving:.2f}x" if saving is not None
                     and math.isfinite(saving) else "-" if saving is None else str(saving))
        md.append("| " + " | ".join(cells) + " |")
        rows[name] = row
    return [*md, "", f"Compute saving: how many times less training compute a run needs than {baseline} to reach "
            f"{baseline}'s final loss ({target:.4f}), both read off the fitted curves.", ""]


def _tasks(tasks: dict, rows: dict) -> list[str]:
    task_names = list(dict.fromkeys(t for r in tasks.values() for t in r["tasks"]))
    md = ["## Zero-shot tasks (acc_norm where the task has it, else acc)", "",
          "| run | " + " | ".join(task_names) + " | Avg. |", "|---" * (len(task_names) + 2) + "|"]
    for name, result in tasks.items():
        cells = [f"{100 * result['tasks'][t]['value']:.1f}" if t in result["tasks"] else "-" for t in task_names]
        md.append(f"| {name} | " + " | ".join(cells) + f" | {100 * result['average']:.1f} |")
        rows.setdefault(name, {})["tasks"] = result
    limits = {r.get("limit") for r in tasks.values()}
    return [*md, "", f"Examples per task: {', '.join('all' if x is None else str(x) for x in limits)}.", ""]


def _selection(selection: Path, out: Path) -> list[str]:
    """The selection's own report, copied beside this one and linked."""
    if not (selection / "report.md").is_file():
        raise FileNotFoundError(f"selection: {selection} has no report.md (a `miniplm select` output)")
    target_dir = out / "selection"
    if target_dir.exists():
        shutil.rmtree(target_dir)
    shutil.copytree(selection / "report", target_dir / "report")
    shutil.copy(selection / "report.md", target_dir / "report.md")
    m = _manifest(selection)
    return ["## Selection", "", f"Selector `{m.get('config', {}).get('selector')}`: kept {m.get('kept', 0):,} of "
            f"{m.get('instances', 0):,} instances ({m.get('kept_tokens', 0):,} tokens); "
            "[full selection report](selection/report.md).", "",
            "![key histogram](selection/report/key_histogram.png)", "", "![domains](selection/report/domains.png)", ""]


def _costs(rows: list[dict]) -> list[str]:
    md = ["## Offline costs (not in the training compute above)", "",
          "| stage | parameters | tokens | FLOPs | wall seconds |", "|---|---|---|---|---|"]
    md += [f"| {r['stage']} | {r['parameters'] / 1e6:.1f}M | {r['tokens']:,} | {r['flops']:.3g} | "
           f"{r['seconds'] if r['seconds'] is not None else '-'} |" for r in rows]
    return [*md, ""]
