"""Collect the small results of a `miniplm run` and render the tables of its results document.

    .venv/bin/python scripts/repro_tables.py collect out/micro_repro results/micro_repro
    .venv/bin/python scripts/repro_tables.py render results/micro_repro docs/results/micro_repro.md

`collect` copies what the document needs and nothing heavy (no model weights, no token shards): curves,
evaluation JSON, manifests, the selections' per-instance scores. `render` rewrites the part of the document
between `<!-- tables:begin -->` and `<!-- tables:end -->` from those files alone, so every number there
can be regenerated from the committed results; the prose around the markers is written by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from miniplm.evaluation.final import POINTS_FILE, SPLITS_FILE, TASKS_FILE
from miniplm.evaluation.report import cost_rows
from miniplm.evaluation.scaling import compute_saving, fit_scaling_law, measured_saving, read_curve

STUDENT_FILES = ("eval.jsonl", "metrics.jsonl", TASKS_FILE, SPLITS_FILE, "manifest.json")
STAGE_FILES = {"scores/teacher": ("manifest.json",), "scores/reference": ("manifest.json",),
               "reference": ("manifest.json", "metrics.jsonl", "validation.jsonl"), "seqkd": ("manifest.json",),
               "corpus": ("manifest.json",), "report": ("results.json",),
               "scores/proxy": ("manifest.json", "summary.json", "report.md")}
BEGIN, END = "<!-- tables:begin -->", "<!-- tables:end -->"
# the teacher's score table (the run's most expensive offline output, ~270 KB): copied whole, parts included
WHOLE = ("scores/teacher",)
KEPT = ("zero_shot_check",)  # results measured outside the run (a registered check), kept by `collect`


def collect(run: Path, results: Path) -> None:
    """Replace everything in `results` but the checks added by hand (KEPT), which no run writes."""
    if results.exists():
        for path in results.iterdir():
            if path.name not in KEPT:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    results.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "run_config.json", results / "run_config.json")
    if (run / "reference_points" / POINTS_FILE).is_file():
        shutil.copy(run / "reference_points" / POINTS_FILE, results / POINTS_FILE)
    for stage, files in STAGE_FILES.items():
        for name in files:
            if (run / stage / name).is_file():
                (results / stage).mkdir(parents=True, exist_ok=True)
                shutil.copy(run / stage / name, results / stage / name)
    for split in sorted((run / "corpus").glob("heldout*/instances.parquet")):
        # which domain each evaluated instance comes from, in evaluation order (per-domain differences)
        table = pq.read_table(split, columns=["instance_id", "domain", "n_tokens"])
        (results / "corpus").mkdir(exist_ok=True)
        pq.write_table(table, results / "corpus" / f"{split.parent.name}.parquet")
    for stage in WHOLE:  # the expensive tables themselves, so that a fresh machine need not redo them
        if (run / stage / "manifest.json").is_file():
            shutil.copytree(run / stage, results / stage, dirs_exist_ok=True)
    for selection in sorted((run / "selections").glob("*")):
        target = results / "selections" / selection.name
        target.mkdir(parents=True)
        for name in ("manifest.json", "instances.parquet"):
            if (selection / name).is_file():
                shutil.copy(selection / name, target / name)
    for student in sorted((run / "students").glob("*")):
        target = results / "students" / student.name
        target.mkdir(parents=True)
        for name in STUDENT_FILES:
            # a student's final evaluations live in its evaluation/ directory
            source = student / "evaluation" / name if name in (TASKS_FILE, SPLITS_FILE) else student / name
            if source.is_file():
                shutil.copy(source, target / name)
    size = sum(p.stat().st_size for p in results.rglob("*") if p.is_file())
    print(f"collected {results} ({size / 1e6:.1f} MB)")


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def _group(name: str) -> str:
    """Seed variants (<name>-sN) belong to <name>."""
    return re.sub(r"-s\d+$", "", name)


def render(results: Path) -> str:
    config = _json(results / "run_config.json")
    students = {s["name"]: s for s in config.get("students", [])}
    points = _json(results / "reference_points.json")
    out = []
    hq = points.get("split", "heldout_hq")
    if "levels" in points:  # {split: {level: summary}}
        levels = points["levels"]
    else:  # written before the n-gram levels: the primary split's levels at the top, the others nested
        levels = {hq: {who: points[who] for who in ("unigram", "teacher") if who in points},
                  **points.get("other_splits", {})}
    splits = [hq, *(s for s in levels if s != hq)]
    other = splits[1:]
    out += ["### Reference points (held-out loss, nats/token, and bits/byte where recorded)", "",
            "| model | " + " | ".join(splits) + " |", "|---" * (1 + len(splits)) + "|"]
    for who in levels.get(hq, {}):
        cells = [who]
        for split in splits:
            p = levels[split].get(who)
            cells.append("-" if p is None else f"{p['loss_per_token']:.4f}"
                         + (f" / {p['bits_per_byte']:.4f}" if "bits_per_byte" in p else ""))
        out.append("| " + " | ".join(cells) + " |")
    out.append("")

    rows: dict[str, dict] = {}
    for directory in sorted((results / "students").glob("*")):
        manifest = _json(directory / "manifest.json")
        if not manifest:
            continue
        curve = [json.loads(x) for x in (directory / "eval.jsonl").read_text().splitlines()] \
            if (directory / "eval.jsonl").is_file() else []
        tasks = _json(directory / "eval_tasks.json")
        splits = _json(directory / "eval_splits.json").get("splits", {})
        rows[directory.name] = {"curve": curve, "tasks": tasks, "splits": splits, "manifest": manifest,
                                "spec": students.get(directory.name, {})}
    groups: dict[str, list[str]] = {}
    for name in rows:
        groups.setdefault(_group(name), []).append(name)

    task_names = list(dict.fromkeys(t for r in rows.values() for t in r["tasks"].get("tasks", {})))
    out += ["### Students: held-out loss and zero-shot accuracy (the paper's Table 1 layout)", "",
            "Loss per token of the student's own tokenizer on the final step; tasks: acc_norm where the task has "
            "it, else acc, in %. `a ± b`: mean ± sample std over seeds (n in the seeds column).", "",
            "| " + " | ".join(["student", "model", "data", "KD", "seeds", "params", "tokens", f"loss {hq}",
                                *[f"loss {s}" for s in other], *task_names, "Avg."]) + " |",
            "|---" * (8 + len(other) + len(task_names) + 1) + "|"]
    for group, names in groups.items():
        first = rows[names[0]]
        spec, manifest = first["spec"], first["manifest"]
        hq_losses = [rows[n]["curve"][-1]["loss_per_token"] for n in names if rows[n]["curve"]]
        cells = [group, spec.get("model", "?") + (f" ({spec['tokenizer']})" if spec.get("tokenizer") else ""),
                 spec.get("data", "?"), spec.get("kd", "none"), str(len(names)),
                 f"{manifest['model']['parameters'] / 1e6:.1f}M", f"{manifest['tokens']:,}", _mean_std(hq_losses)]
        cells += [_mean_std([rows[n]["splits"][s]["loss_per_token"] for n in names if s in rows[n]["splits"]])
                  for s in other]
        for task in task_names:
            values = [100 * rows[n]["tasks"]["tasks"][task]["value"] for n in names
                      if task in rows[n]["tasks"].get("tasks", {})]
            cells.append(f"{np.mean(values):.1f}" if values else "-")
        averages = [100 * rows[n]["tasks"]["average"] for n in names if rows[n]["tasks"]]
        cells.append(f"{np.mean(averages):.1f}" + (f" ± {np.std(averages, ddof=1):.1f}" if len(averages) > 1 else "")
                     if averages else "-")
        out.append("| " + " | ".join(cells) + " |")
    limit = {r["tasks"].get("limit") for r in rows.values() if r["tasks"]}
    out += ["", f"Examples per task: {', '.join(str(x) for x in limit) or '-'}. Chance: 25% (hellaswag, arc, "
            "openbookqa), 50% (piqa, winogrande), 33% (social_iqa), ~0% (lambada).", ""]

    out += ["### Compute saving against no-KD of the same model", "",
            "Fitted: from L(C) = A C^-a + L_inf fitted to each curve. Measured: read off the measured points at the "
            "loss both runs reach, interpolated between the two points that bracket it, never extrapolated.", "",
            "| student | baseline | final loss | fit A | alpha | L_inf | fit RMSE | fitted saving | measured saving |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        spec = row["spec"]
        if not spec or spec.get("data") == "all" and spec.get("kd") == "none":
            continue
        # the no-KD run of the same model, tokenizer and seed suffix (tiny-miniplm-s2 against tiny-no-kd-s2)
        suffix = name[len(_group(name)):]
        baseline = next((n for n, r in rows.items() if r["spec"].get("model") == spec.get("model")
                         and r["spec"].get("tokenizer") == spec.get("tokenizer") and r["spec"].get("data") == "all"
                         and r["spec"].get("kd") == "none" and n[len(_group(n)):] == suffix), None)
        if baseline is None:
            continue
        try:
            base_fit = fit_scaling_law(*read_curve(results / "students" / baseline))
            fit = fit_scaling_law(*read_curve(results / "students" / name))
        except ValueError:
            continue
        target = rows[baseline]["curve"][-1]["loss_per_token"]
        saving = compute_saving(base_fit, fit, target)
        shown = f"{saving:.3g}x" if math.isfinite(saving) and saving > 0 else (
            "never reaches it" if saving == 0 else "only it reaches it" if math.isinf(saving) else "-")
        needed = fit.compute_for(target)
        if math.isfinite(needed) and needed > 2 * row["curve"][-1]["flops"]:
            shown += " (extrapolated past its last point)"
        measured = measured_saving(read_curve(results / "students" / baseline), read_curve(results / "students" / name))
        out.append(f"| {name} | {baseline} | {row['curve'][-1]['loss_per_token']:.4f} | {fit.A:.4g} | "
                   f"{fit.alpha:.4f} | {fit.L_inf:.4f} | {fit.rmse:.4f} | {shown} | "
                   f"{f'{measured:.3g}x' if math.isfinite(measured) else 'not bracketed'} |")
    out.append("")

    out += ["### Selections: domain mix of the kept half", ""]
    import pyarrow.parquet as pq

    selections = sorted((results / "selections").glob("*"))
    mixes = {}
    for selection in selections:
        if (selection / "instances.parquet").is_file():
            table = pq.read_table(selection / "instances.parquet", columns=["domain", "n_tokens", "selected"])
            d = table.to_pydict()
            total: dict[str, int] = {}
            kept: dict[str, int] = {}
            for domain, n, selected in zip(d["domain"], d["n_tokens"], d["selected"]):
                total[domain] = total.get(domain, 0) + n
                if selected:
                    kept[domain] = kept.get(domain, 0) + n
            mixes[selection.name] = (total, kept)
    if mixes:
        domains = sorted(next(iter(mixes.values()))[0])
        out += ["Token share per domain, in %: the pool, then each selection's kept half.", "",
                "| domain | pool | " + " | ".join(mixes) + " |", "|---" * (2 + len(mixes)) + "|"]
        total = next(iter(mixes.values()))[0]
        for domain in domains:
            cells = [f"{100 * total.get(domain, 0) / sum(total.values()):.1f}"]
            cells += [f"{100 * kept.get(domain, 0) / max(sum(kept.values()), 1):.1f}" for _, kept in mixes.values()]
            out.append(f"| {domain} | " + " | ".join(cells) + " |")
        out.append("")
        first = pq.read_table(selections[0] / "instances.parquet").to_pydict() if selections else None
        if first and first.get("teacher_logp") and first.get("ref_logp") and first["ref_logp"][0] is not None:
            n = np.array(first["n_tokens"], dtype=float)
            teacher = -np.array(first["teacher_logp"], dtype=float)
            reference = -np.array(first["ref_logp"], dtype=float)
            r = reference - teacher  # mean log p_teacher - mean log p_ref, per token
            corr = np.corrcoef(r, -teacher)[0, 1]
            out += [f"In `{selections[0].name}`: mean teacher loss {teacher.mean():.3f}, mean reference loss "
                    f"{reference.mean():.3f} nats/token over {len(n):,} instances; correlation of r with "
                    f"-(teacher loss) {corr:.3f} (near 1: the reference adds little beyond teacher-perplexity "
                    f"selection).", ""]

    out += _quoted_facts(results, rows)
    stages = [results / stage for stage in ("scores/teacher", "scores/reference", "reference", "seqkd")]
    costs = [f"| {r['stage']} | {r['parameters'] / 1e6:.1f}M | {r['tokens']:,} | {r['flops']:.3g} | "
             f"{r['seconds'] if r['seconds'] is not None else '-'} |"
             for r in cost_rows([p for p in stages if (p / "manifest.json").is_file()])]
    if costs:
        out += ["### Offline costs (kept apart from training compute, as the paper)", "",
                "| stage | parameters | tokens | FLOPs | wall seconds (2 CPU cores) |", "|---|---|---|---|---|",
                *costs, ""]
    return "\n".join(out)


def _quoted_facts(results: Path, rows: dict[str, dict]) -> list[str]:
    """Figures the prose quotes that no table above holds, each read off the committed files."""
    import pyarrow.parquet as pq

    out = ["### Other figures the text quotes", ""]
    # single-seed arms against the MiniPLM student of the same model and seed (not against a seed mean)
    for name, row in rows.items():
        spec = row["spec"]
        if spec.get("data") in (None, "all", "miniplm", "seqkd") or spec.get("kd") != "none":
            continue
        suffix = name[len(_group(name)):]
        twin = next((n for n, r in rows.items() if r["spec"].get("data") == "miniplm"
                     and r["spec"].get("model") == spec.get("model") and n[len(_group(n)):] == suffix), None)
        if twin is None:
            continue
        mine, theirs = row["splits"], rows[twin]["splits"]
        cells = [f"{split} {mine[split]['loss_per_token']:.3f} vs {theirs[split]['loss_per_token']:.3f}"
                 for split in mine if split in theirs]
        curve = (f"curve's last point {row['curve'][-1]['loss_per_token']:.4f} vs "
                 f"{rows[twin]['curve'][-1]['loss_per_token']:.4f}")
        out.append(f"- {name} against {twin} (same seed): {curve}; " + ", ".join(cells) + ".")
    for selection in sorted((results / "selections").glob("*")):
        if not (selection / "instances.parquet").is_file():
            continue
        table = pq.read_table(selection / "instances.parquet").to_pydict()
        per_domain: dict[str, list] = {}
        for domain, selected, ref, n in zip(table["domain"], table["selected"], table["ref_logp"], table["n_tokens"]):
            per_domain.setdefault(domain, []).append((selected, ref, n))
        cells = []
        for domain, items in sorted(per_domain.items()):
            refs = [-r for _, r, _ in items if r is not None and math.isfinite(r)]
            cells.append(f"{domain} {sum(s for s, _, _ in items)}/{len(items)}"
                         + (f" (reference loss {np.mean(refs):.3f})" if refs else ""))
        out.append(f"- {selection.name}: kept/pool instances per domain: " + ", ".join(cells) + ".")
    seqkd = _json(results / "seqkd" / "manifest.json")
    if seqkd:
        corpus = seqkd["splits"]["train"]["tokens"]
        readers = [r["manifest"]["tokens"] for r in rows.values() if r["spec"].get("data") == "seqkd"]
        out.append(f"- SeqKD corpus: {seqkd['generated_tokens']:,} generated tokens, {corpus:,} with their prompts"
                   + (f"; its student read {readers[0]:,} tokens ({readers[0] / corpus:.1f} passes)" if readers else "")
                   + ".")
    metrics = results / "reference" / "metrics.jsonl"
    if metrics.is_file():
        logged, previous = 0.0, 0
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            logged += (row["tokens"] - previous) / row["tokens_per_second"]
            previous = row["tokens"]
        wall = _json(results / "reference" / "manifest.json").get("wall_seconds")
        out.append(f"- The reference's training: {logged:,.0f} s of steps in its metrics.jsonl; its manifest's "
                   f"wall_seconds: {wall} (the last process only, where a run was resumed and its manifest "
                   f"predates the count of attempts).")
    return out + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="copy a run's small results into a results folder")
    c.add_argument("run", type=Path)
    c.add_argument("results", type=Path)
    r = sub.add_parser("render", help="rewrite the tables of a results document from a results folder")
    r.add_argument("results", type=Path)
    r.add_argument("document", type=Path)
    args = parser.parse_args()
    if args.command == "collect":
        collect(args.run, args.results)
        return
    text = args.document.read_text() if args.document.is_file() else f"{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{args.document} has no {BEGIN} ... {END} markers to fill")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    args.document.write_text(f"{head}{BEGIN}\n{render(args.results)}\n{END}{tail}")
    print(f"rendered {args.document} from {args.results}")


if __name__ == "__main__":
    main()
