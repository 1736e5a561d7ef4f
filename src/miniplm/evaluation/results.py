"""A run's results folder and the tables of a results document, rendered from that folder alone.

`collect` copies out of a run what the tables read and nothing heavy (no weights, no token shards): curves,
evaluations, manifests, the selections' per-instance scores, the held-out splits' domains, the teacher's score
table. Each table function reads only that folder, so every number of a committed document regenerates from
committed files (docs/results/*.md, through scripts/repro_v2.py and scripts/repro_tables.py, which only
choose the tables and the document's own decision rule).

Students are named `<arm>-s<seed>` (`miniplm compare`'s and repro v2's layout); a name without the suffix is
its arm's only seed.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from miniplm.evaluation.comparison import compare
from miniplm.evaluation.final import POINTS_FILE, SPLITS_FILE, TASKS_FILE
from miniplm.evaluation.report import cost_rows
from miniplm.evaluation.scaling import compute_saving, curve_rows, fit_scaling_law, measured_saving, read_curve
from miniplm.selection.select import NEEDS

STUDENT_FILES = ("eval.jsonl", "metrics.jsonl", TASKS_FILE, SPLITS_FILE, "manifest.json")
STAGE_FILES = {"scores/teacher": ("manifest.json",), "scores/reference": ("manifest.json",),
               "reference": ("manifest.json", "metrics.jsonl", "validation.jsonl"), "seqkd": ("manifest.json",),
               "corpus": ("manifest.json",), "report": ("results.json",),
               "scores/proxy": ("manifest.json", "summary.json", "report.md")}
# the teacher's score table (a run's most expensive offline output, ~270 KB for repro v2): copied whole
WHOLE = ("scores/teacher",)
KEPT = ("zero_shot_check",)  # results measured outside the run (a registered check), which `collect` keeps


def collect(run: Path, results: Path) -> int:
    """Replace everything in `results` but the checks added by hand (KEPT) with the small files of `run`;
    returns the bytes collected."""
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
    for stage in WHOLE:
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
    return sum(p.stat().st_size for p in results.rglob("*") if p.is_file())


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def arm_of(name: str) -> str:
    """`miniplm-s11` -> `miniplm`: the arm a student belongs to."""
    return re.sub(r"-s\d+$", "", name)


def seed_of(name: str, default: int) -> int:
    match = re.search(r"-s(\d+)$", name)
    return int(match.group(1)) if match else default


def mean_std(values: list[float], digits: int = 4, empty: str = "-") -> str:
    """`mean ± sample std` (the value alone for one, `empty` for none)."""
    if not values:
        return empty
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def students(results: Path) -> dict[str, dict]:
    """{name: student} of every student with a manifest (in a results folder or a run's output), in name order:
    its spec in the run config, manifest, curve (eval.jsonl), final evaluations (splits, tasks) and directory."""
    specs = {s["name"]: s for s in read_json(results / "run_config.json").get("students", [])}
    found = {}
    for directory in sorted((results / "students").glob("*")):
        manifest = read_json(directory / "manifest.json")
        if not manifest:
            continue
        curve = curve_rows(directory) if (directory / "eval.jsonl").is_file() else []
        # a run keeps the final evaluations in the student's evaluation/ directory, a results folder beside it
        finals = directory / "evaluation" if (directory / "evaluation").is_dir() else directory
        found[directory.name] = {"name": directory.name, "spec": specs.get(directory.name, {}),
                                 "manifest": manifest, "curve": curve, "tasks": read_json(finals / TASKS_FILE),
                                 "splits": read_json(finals / SPLITS_FILE).get("splits", {}), "dir": directory}
    return found


def arms(results: Path, default_seed: int) -> dict[str, dict[int, dict]]:
    """{arm: {seed: student}} of the evaluated students, arms in the run config's order (then by name)."""
    evaluated = {name: s for name, s in students(results).items() if s["splits"]}
    order = [s["name"] for s in read_json(results / "run_config.json").get("students", [])]
    out: dict[str, dict[int, dict]] = {}
    for name in [n for n in order if n in evaluated] + sorted(set(evaluated) - set(order)):
        out.setdefault(arm_of(name), {})[seed_of(name, default_seed)] = evaluated[name]
    return out


def per_instance(seeds: dict[int, dict], splits: tuple[str, ...]) -> dict[int, dict[str, dict]]:
    """{seed: {split: per_instance record}} of one arm's students, for `comparison.compare`."""
    return {seed: {split: s["splits"][split]["per_instance"] for split in splits if split in s["splits"]}
            for seed, s in seeds.items()}


def differences(by_arm: dict, control: str, arm: str, splits: tuple[str, ...]) -> dict[int, dict[str, dict]]:
    """{seed: {split: paired difference control - arm}} over the seeds both have."""
    return compare(per_instance(by_arm.get(control, {}), splits), per_instance(by_arm.get(arm, {}), splits)).seeds


def signal_seconds(selection: dict, score_seconds: dict[str, float]) -> float:
    """Offline seconds of a selection (its manifest): the scoring runs its selector reads, the proxy's where its
    teacher table was a proxy's, and its own (a classifier's fit)."""
    config = selection["config"]
    proxied = str(config.get("teacher", "")).endswith("proxy")
    reads = ["proxy" if who == "teacher" and proxied else who for who in NEEDS[config["selector"]]]
    return sum(score_seconds.get(who, 0.0) for who in reads) + selection.get("wall_seconds", 0.0)


# -- tables of evaluated arms (repro v2, `miniplm compare`'s students) ------------------------------------------

def students_table(by_arm: dict, splits: tuple[str, ...]) -> list[str]:
    out = ["### Students (final loss, nats/token / bits per byte; mean ± sample std over seeds)", "",
           "| arm | model | tokenizer | data | KD | seeds | params | tokens | " + " | ".join(splits) + " |",
           "|---" * (8 + len(splits)) + "|"]
    for arm, seeds in by_arm.items():
        first = next(iter(seeds.values()))
        spec, manifest = first["spec"], first["manifest"]
        cells = [arm, spec.get("model", "?"), spec.get("tokenizer") or "teacher's", spec.get("data", "?"),
                 spec.get("kd", "none"), ",".join(str(s) for s in seeds),
                 f"{manifest['model']['parameters'] / 1e6:.1f}M", f"{manifest['tokens']:,}"]
        for split in splits:
            nats = [s["splits"][split]["loss_per_token"] for s in seeds.values() if split in s["splits"]]
            bpb = [s["splits"][split]["bits_per_byte"] for s in seeds.values() if split in s["splits"]]
            cells.append(f"{mean_std(nats, empty='pending')} / {np.mean(bpb):.4f}" if nats else "-")
        out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def each_student_table(by_arm: dict, splits: tuple[str, ...]) -> list[str]:
    out = ["### Each student (nats/token [95% bootstrap interval over instances] / bits per byte)", "",
           "| student | " + " | ".join(splits) + " |", "|---" * (1 + len(splits)) + "|"]
    for seeds in by_arm.values():
        for student in seeds.values():
            cells = [f"{v['loss_per_token']:.4f} [{v['loss_per_token_ci95'][0]:.3f}, {v['loss_per_token_ci95'][1]:.3f}]"
                     f" / {v['bits_per_byte']:.4f}" if (v := student["splits"].get(split)) else "-" for split in splits]
            out.append(f"| {student['name']} | " + " | ".join(cells) + " |")
    return out + [""]


def paired_table(by_arm: dict, pairs: list[tuple[str, str]], splits: tuple[str, ...]) -> list[str]:
    out = ["### Paired differences (control minus arm, nats/token; positive: the arm is better)", "",
           "Per seed: the difference on the same instances with its 95% bootstrap interval over instances. "
           "Across seeds: mean ± sample std of the per-seed differences.", "",
           "| control | arm | seed | " + " | ".join(splits) + " |", "|---" * (3 + len(splits)) + "|"]
    for control, arm in pairs:
        d = differences(by_arm, control, arm, splits)
        for seed, by_split in d.items():
            cells = [f"{v['loss_per_token']:+.4f} [{v['loss_per_token_ci95'][0]:+.3f}, "
                     f"{v['loss_per_token_ci95'][1]:+.3f}]" if (v := by_split.get(split)) else "-" for split in splits]
            out.append(f"| {control} | {arm} | {seed} | " + " | ".join(cells) + " |")
        if len(d) > 1:
            cells = [mean_std([d[s][split]["loss_per_token"] for s in d if split in d[s]], empty="pending")
                     for split in splits]
            out.append(f"| {control} | {arm} | **all {len(d)}** | " + " | ".join(cells) + " |")
    return out + [""]


def domain_table(domains_file: Path, by_arm: dict, pairs: list[tuple[str, str]], split: str) -> list[str]:
    """The paired differences on `split` restricted to each domain's instances (token-weighted); `domains_file`:
    the split's instances (a parquet file with their `domain`, in order: an evaluation reads the first N)."""
    records = [s["splits"][split]["per_instance"] for arm in {a for pair in pairs for a in pair}
               for s in by_arm.get(arm, {}).values() if "per_instance" in s["splits"].get(split, {})]
    if not domains_file.is_file() or not records:
        return []
    evaluated = len(records[0]["nats"])
    domain = np.array(pq.read_table(domains_file, columns=["domain"]).column("domain").to_pylist()[:evaluated])
    names = sorted(set(domain))
    out = [f"### Paired differences on {split} by domain (control minus arm, nats/token; mean ± sample "
           "std over seeds)", "", "Where on the whole mix an arm gains or loses: the same paired "
           "differences restricted to each domain's instances (token-weighted).", "",
           "| control | arm | " + " | ".join(f"{n} ({int((domain == n).sum())})" for n in names) + " |",
           "|---" * (2 + len(names)) + "|"]
    for control, arm in pairs:
        per_seed = []
        for seed in sorted(set(by_arm.get(control, {})) & set(by_arm.get(arm, {}))):
            a = by_arm[control][seed]["splits"].get(split, {}).get("per_instance")
            b = by_arm[arm][seed]["splits"].get(split, {}).get("per_instance")
            if a is None or b is None or len(a["nats"]) != len(domain):
                continue
            gap, tokens = np.subtract(a["nats"], b["nats"]), np.asarray(a["tokens"])
            per_seed.append([gap[domain == n].sum() / tokens[domain == n].sum() for n in names])
        if per_seed:
            cells = [mean_std([row[i] for row in per_seed], 3, empty="pending") for i in range(len(names))]
            out.append(f"| {control} | {arm} | " + " | ".join(cells) + " |")
    return out + [""]


def kept_dropped_table(results: Path, selection: str) -> list[str]:
    """The teacher's and the reference's mean loss on what a selection keeps and drops, per domain."""
    kept_file = results / "selections" / selection / "instances.parquet"
    if not kept_file.is_file():
        return []
    table = pq.read_table(kept_file, columns=["domain", "n_tokens", "teacher_logp", "ref_logp", "selected"])
    domain = np.array(table.column("domain").to_pylist())
    tokens, kept = table.column("n_tokens").to_numpy(), table.column("selected").to_numpy()
    teacher, ref = -table.column("teacher_logp").to_numpy(), -table.column("ref_logp").to_numpy()
    out = [f"### What Difference Sampling keeps and drops inside each domain ({selection})", "",
           "Mean loss of the teacher and of the reference (nats/token, teacher tokenizer, token-weighted) on "
           f"the pool instances `{selection}` keeps and on those it drops.", "",
           "| domain | pool instances | kept: teacher | kept: reference | dropped: teacher | dropped: reference |",
           "|---|---|---|---|---|---|"]
    for name in sorted(set(domain)):
        cells = [f"{np.average(loss[(domain == name) & side], weights=tokens[(domain == name) & side]):.3f}"
                 for side in (kept, ~kept) for loss in (teacher, ref)]
        out.append(f"| {name} | {int((domain == name).sum()):,} | " + " | ".join(cells) + " |")
    return out + [""]


def _is_no_kd(spec: dict) -> bool:
    return spec.get("data") == "all" and spec.get("kd", "none") == "none"


def saving_table(by_arm: dict) -> list[str]:
    """Each student's compute saving against the no-KD student of the same model, tokenizer and seed."""
    out = ["### Compute saving against no-KD of the same model, tokenizer and seed "
           "(only where measured points bracket)", "",
           "Read off the measured held-out curves at the loss both runs reach (interpolated between the two "
           "points that bracket it); 'not bracketed' where the points do not reach it, since no extrapolation "
           "is quoted; beside it, the saving of the fitted L(C) = A*C^-a + L_inf curves (4 points each) at the same "
           "loss.", "", "| student | baseline | measured saving | fitted saving |", "|---|---|---|---|"]
    for seeds in by_arm.values():
        spec = next(iter(seeds.values()))["spec"]
        if _is_no_kd(spec):
            continue
        for seed, student in seeds.items():
            base = next((s[seed] for s in by_arm.values() if seed in s and _is_no_kd(s[seed]["spec"])
                         and s[seed]["spec"].get("model") == spec.get("model")
                         and s[seed]["spec"].get("tokenizer") == spec.get("tokenizer")), None)
            if base is None or spec.get("data") in ("seqkd", "first-160"):
                continue
            base_curve, curve = read_curve(base["dir"]), read_curve(student["dir"])
            saving = measured_saving(base_curve, curve)
            fitted = "-"
            if np.isfinite(saving):  # a fit is quoted only where the measured points bracket the loss
                target = max(base_curve[1][-1], curve[1][-1])
                fitted = f"{compute_saving(fit_scaling_law(*base_curve), fit_scaling_law(*curve), target):.3g}x"
            out.append(f"| {student['name']} | {base['name']} | "
                       + (f"{saving:.3g}x" if np.isfinite(saving) else "not bracketed") + f" | {fitted} |")
    return out + [""]


def points_table(points: dict, splits: tuple[str, ...]) -> list[str]:
    """The reference points ({split: {level: summary}}): n-gram levels, the teacher, the reference."""
    out = ["### Reference points (nats/token / bits per byte, on the students' instances)", "",
           "| level | " + " | ".join(splits) + " |", "|---" * (1 + len(splits)) + "|"]
    for who in dict.fromkeys(w for split in splits for w in points.get(split, {})):
        cells = [f"{p['loss_per_token']:.4f} / {p['bits_per_byte']:.4f}" if (p := points.get(s, {}).get(who)) else "-"
                 for s in splits]
        out.append(f"| {who} | " + " | ".join(cells) + " |")
    return out + [""]


def selections_table(results: Path, splits: tuple[str, ...]) -> list[str]:
    """Each selection's n-gram diagnostic (kept half against the pool) and domain mix, from its manifest."""
    out = ["### Selections: n-gram diagnostic and domain mix", "",
           "Unigram and bigram models fitted on each selection's kept half and on the whole pool (teacher "
           "tokenizer), scored on the held-out splits: kept minus pool, nats/token (negative: the kept half's "
           "token statistics are closer to that split).", "",
           "| selection | kept tokens | " + " | ".join(f"{s} {lv}" for s in splits for lv in ("unigram", "bigram"))
           + " |", "|---" * (2 + 2 * len(splits)) + "|"]
    manifests = {s.name: read_json(s / "manifest.json") for s in sorted((results / "selections").glob("*"))}
    for name, m in manifests.items():
        diagnostic = m.get("ngram_diagnostic", {})
        cells = []
        for split in splits:
            for level in ("unigram", "bigram"):
                d = diagnostic.get(split, {})
                cells.append(f"{d['kept'][level]['loss_per_token'] - d['pool'][level]['loss_per_token']:+.4f}"
                             if "kept" in d and "pool" in d else "-")
        out.append(f"| {name} | {m.get('kept_tokens', 0):,} | " + " | ".join(cells) + " |")
    mixes = {name: m["domains"] for name, m in manifests.items() if m.get("domains")}
    if mixes:
        pool = max(mixes.values(), key=lambda mix: sum(d["tokens"] for d in mix.values()))  # the whole pool
        total = sum(d["tokens"] for d in pool.values())
        out += ["", "Token share per domain, in %: the pool, then each selection's kept half.", "",
                "| domain | pool | " + " | ".join(mixes) + " |", "|---" * (2 + len(mixes)) + "|"]
        for domain in sorted(pool):
            cells = [f"{100 * pool[domain]['tokens'] / total:.1f}"]
            for mix in mixes.values():
                kept = sum(d["kept_tokens"] for d in mix.values())
                cells.append(f"{100 * mix.get(domain, {}).get('kept_tokens', 0) / max(kept, 1):.1f}")
            out.append(f"| {domain} | " + " | ".join(cells) + " |")
    return out + [""]


# -- tables of the first reproduction's layout (the paper's Table 1, fitted savings) -----------------------------

def legacy_points(points: dict) -> tuple[str, dict]:
    """(the primary split, {split: {level: summary}}) of a reference-points file, in either of its layouts."""
    primary = points.get("split", "heldout_hq")
    if "levels" in points:
        return primary, points["levels"]
    # written before the n-gram levels: the primary split's levels at the top, the others nested
    return primary, {primary: {who: points[who] for who in ("unigram", "teacher") if who in points},
                     **points.get("other_splits", {})}


def points_by_model_table(points: dict) -> list[str]:
    primary, levels = legacy_points(points)
    splits = [primary, *(s for s in levels if s != primary)]
    out = ["### Reference points (held-out loss, nats/token, and bits/byte where recorded)", "",
           "| model | " + " | ".join(splits) + " |", "|---" * (1 + len(splits)) + "|"]
    for who in levels.get(primary, {}):
        cells = [who]
        for split in splits:
            p = levels[split].get(who)
            cells.append("-" if p is None else f"{p['loss_per_token']:.4f}"
                         + (f" / {p['bits_per_byte']:.4f}" if "bits_per_byte" in p else ""))
        out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def table1(rows: dict[str, dict], primary: str, other: list[str]) -> list[str]:
    """Per arm: the final loss on every split and each zero-shot task's accuracy (the paper's Table 1)."""
    groups: dict[str, list[str]] = {}
    for name in rows:
        groups.setdefault(arm_of(name), []).append(name)
    task_names = list(dict.fromkeys(t for r in rows.values() for t in r["tasks"].get("tasks", {})))
    out = ["### Students: held-out loss and zero-shot accuracy (the paper's Table 1 layout)", "",
           "Loss per token of the student's own tokenizer on the final step; tasks: acc_norm where the task has "
           "it, else acc, in %. `a ± b`: mean ± sample std over seeds (n in the seeds column).", "",
           "| " + " | ".join(["student", "model", "data", "KD", "seeds", "params", "tokens", f"loss {primary}",
                              *[f"loss {s}" for s in other], *task_names, "Avg."]) + " |",
           "|---" * (8 + len(other) + len(task_names) + 1) + "|"]
    for group, names in groups.items():
        first = rows[names[0]]
        spec, manifest = first["spec"], first["manifest"]
        primary_losses = [rows[n]["curve"][-1]["loss_per_token"] for n in names if rows[n]["curve"]]
        cells = [group, spec.get("model", "?") + (f" ({spec['tokenizer']})" if spec.get("tokenizer") else ""),
                 spec.get("data", "?"), spec.get("kd", "none"), str(len(names)),
                 f"{manifest['model']['parameters'] / 1e6:.1f}M", f"{manifest['tokens']:,}", mean_std(primary_losses)]
        cells += [mean_std([rows[n]["splits"][s]["loss_per_token"] for n in names if s in rows[n]["splits"]])
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
    return out + ["", f"Examples per task: {', '.join(str(x) for x in limit) or '-'}. Chance: 25% (hellaswag, arc, "
                  "openbookqa), 50% (piqa, winogrande), 33% (social_iqa), ~0% (lambada).", ""]


def _no_kd_twin(rows: dict[str, dict], name: str) -> str | None:
    """The no-KD run of the same model, tokenizer and seed suffix (tiny-miniplm-s2 against tiny-no-kd-s2)."""
    spec, suffix = rows[name]["spec"], name[len(arm_of(name)):]
    return next((n for n, r in rows.items() if r["spec"].get("model") == spec.get("model")
                 and r["spec"].get("tokenizer") == spec.get("tokenizer") and r["spec"].get("data") == "all"
                 and r["spec"].get("kd") == "none" and n[len(arm_of(n)):] == suffix), None)


def fitted_saving_table(rows: dict[str, dict]) -> list[str]:
    out = ["### Compute saving against no-KD of the same model", "",
           "Fitted: from L(C) = A C^-a + L_inf fitted to each curve. Measured: read off the measured points at the "
           "loss both runs reach, interpolated between the two points that bracket it, never extrapolated.", "",
           "| student | baseline | final loss | fit A | alpha | L_inf | fit RMSE | fitted saving | measured saving |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        spec = row["spec"]
        if not spec or spec.get("data") == "all" and spec.get("kd") == "none":
            continue
        baseline = _no_kd_twin(rows, name)
        if baseline is None:
            continue
        try:
            base_fit = fit_scaling_law(*read_curve(rows[baseline]["dir"]))
            fit = fit_scaling_law(*read_curve(row["dir"]))
        except ValueError:
            continue
        target = rows[baseline]["curve"][-1]["loss_per_token"]
        saving = compute_saving(base_fit, fit, target)
        shown = f"{saving:.3g}x" if math.isfinite(saving) and saving > 0 else (
            "never reaches it" if saving == 0 else "only it reaches it" if math.isinf(saving) else "-")
        needed = fit.compute_for(target)
        if math.isfinite(needed) and needed > 2 * row["curve"][-1]["flops"]:
            shown += " (extrapolated past its last point)"
        measured = measured_saving(read_curve(rows[baseline]["dir"]), read_curve(row["dir"]))
        out.append(f"| {name} | {baseline} | {row['curve'][-1]['loss_per_token']:.4f} | {fit.A:.4g} | "
                   f"{fit.alpha:.4f} | {fit.L_inf:.4f} | {fit.rmse:.4f} | {shown} | "
                   f"{f'{measured:.3g}x' if math.isfinite(measured) else 'not bracketed'} |")
    return out + [""]


def mix_table(results: Path) -> list[str]:
    """Each selection's domain mix, counted from its per-instance table, and the first one's r against the
    teacher's loss."""
    out = ["### Selections: domain mix of the kept half", ""]
    selections = sorted((results / "selections").glob("*"))
    mixes = {}
    for selection in selections:
        if (selection / "instances.parquet").is_file():
            d = pq.read_table(selection / "instances.parquet", columns=["domain", "n_tokens", "selected"]).to_pydict()
            total: dict[str, int] = {}
            kept: dict[str, int] = {}
            for domain, n, selected in zip(d["domain"], d["n_tokens"], d["selected"]):
                total[domain] = total.get(domain, 0) + n
                if selected:
                    kept[domain] = kept.get(domain, 0) + n
            mixes[selection.name] = (total, kept)
    if not mixes:
        return out
    total = next(iter(mixes.values()))[0]
    out += ["Token share per domain, in %: the pool, then each selection's kept half.", "",
            "| domain | pool | " + " | ".join(mixes) + " |", "|---" * (2 + len(mixes)) + "|"]
    for domain in sorted(total):
        cells = [f"{100 * total.get(domain, 0) / sum(total.values()):.1f}"]
        cells += [f"{100 * kept.get(domain, 0) / max(sum(kept.values()), 1):.1f}" for _, kept in mixes.values()]
        out.append(f"| {domain} | " + " | ".join(cells) + " |")
    out.append("")
    first = pq.read_table(selections[0] / "instances.parquet").to_pydict()
    if first.get("teacher_logp") and first.get("ref_logp") and first["ref_logp"][0] is not None:
        teacher = -np.array(first["teacher_logp"], dtype=float)
        reference = -np.array(first["ref_logp"], dtype=float)
        corr = np.corrcoef(reference - teacher, -teacher)[0, 1]  # r = mean log p_teacher - mean log p_ref
        out += [f"In `{selections[0].name}`: mean teacher loss {teacher.mean():.3f}, mean reference loss "
                f"{reference.mean():.3f} nats/token over {len(teacher):,} instances; correlation of r with "
                f"-(teacher loss) {corr:.3f} (near 1: the reference adds little beyond teacher-perplexity "
                f"selection).", ""]
    return out


def quoted_facts(results: Path, rows: dict[str, dict]) -> list[str]:
    """Figures a document's prose quotes that no table holds, each read off the results folder."""
    out = ["### Other figures the text quotes", ""]
    # single-seed arms against the MiniPLM student of the same model and seed (not against a seed mean)
    for name, row in rows.items():
        spec = row["spec"]
        if spec.get("data") in (None, "all", "miniplm", "seqkd") or spec.get("kd") != "none":
            continue
        suffix = name[len(arm_of(name)):]
        twin = next((n for n, r in rows.items() if r["spec"].get("data") == "miniplm"
                     and r["spec"].get("model") == spec.get("model") and n[len(arm_of(n)):] == suffix), None)
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
    seqkd = read_json(results / "seqkd" / "manifest.json")
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
        wall = read_json(results / "reference" / "manifest.json").get("wall_seconds")
        out.append(f"- The reference's training: {logged:,.0f} s of steps in its metrics.jsonl; its manifest's "
                   f"wall_seconds: {wall} (the last process only, where a run was resumed and its manifest "
                   f"predates the count of attempts).")
    return out + [""]


def costs_table(results: Path) -> list[str]:
    stages = [results / stage for stage in ("scores/teacher", "scores/reference", "reference", "seqkd")]
    costs = [f"| {r['stage']} | {r['parameters'] / 1e6:.1f}M | {r['tokens']:,} | {r['flops']:.3g} | "
             f"{r['seconds'] if r['seconds'] is not None else '-'} |"
             for r in cost_rows([p for p in stages if (p / "manifest.json").is_file()])]
    if not costs:
        return []
    return ["### Offline costs (kept apart from training compute, as the paper)", "",
            "| stage | parameters | tokens | FLOPs | wall seconds (2 CPU cores) |", "|---|---|---|---|---|",
            *costs, ""]


def fill(document: Path, tables: str) -> None:
    """Rewrite the part of `document` between `<!-- tables:begin -->` and `<!-- tables:end -->` (a new file
    holds the tables alone); the prose around the markers is written by hand."""
    begin, end = "<!-- tables:begin -->", "<!-- tables:end -->"
    text = document.read_text() if document.is_file() else f"{begin}\n{end}\n"
    if begin not in text or end not in text:
        raise SystemExit(f"{document} has no {begin} ... {end} markers to fill")
    head, rest = text.split(begin, 1)
    document.write_text(f"{head}{begin}\n{tables}\n{end}{rest.split(end, 1)[1]}")
