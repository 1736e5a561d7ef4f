"""The tables and the pre-registered decision of docs/results/repro_v2.md, from results/repro_v2/ alone.

    .venv/bin/python scripts/repro_tables.py collect out/repro_v2 results/repro_v2
    .venv/bin/python scripts/repro_v2.py results/repro_v2 docs/results/repro_v2.md
    .venv/bin/python scripts/repro_v2.py results/repro_v2 --compare     # v2's signals as `miniplm compare` ranks them

Rewrites the part of the document between `<!-- tables:begin -->` and `<!-- tables:end -->`. Arms whose
students have not finished yet show as pending, and so does the decision until every student it needs exists.
The rule (docs/results/repro_v2.md, "Decision rule"): d_s = loss(control, seed s) - loss(arm, seed s) on the
same instances; *works* if d_s >= 0.03 on `heldout` for every seed (plus the clauses below), *does not work*
if the mean of d_s over seeds is under 0.02, else *inconclusive*.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from miniplm.evaluation.comparison import Rule, Signal, compare, rank, render_report
from miniplm.evaluation.comparison import decide as decide_rule
from miniplm.evaluation.scaling import compute_saving, fit_scaling_law, measured_saving, read_curve
from miniplm.selection.select import NEEDS

BEGIN, END = "<!-- tables:begin -->", "<!-- tables:end -->"
PRIMARY, SPLITS, SEEDS = "heldout", ("heldout", "heldout_hq", "heldout_unseen"), (10, 11, 12)
WORKS, DOES_NOT, NOT_WORSE, TIER_CPU, TIER_SCALE = 0.03, 0.02, -0.02, 1.0, 0.2
# (control, arm): the comparisons the rule and the text use, by arm name (a student `<arm>-s<seed>` is its seed)
PAIRS = [("random-wd", "miniplm-wd"), ("no-kd", "miniplm"), ("random-mix", "miniplm"), ("no-kd", "random-wd"),
         ("no-kd", "miniplm-wd"), ("no-kd", "random-mix"), ("teacher-ppl-wd", "miniplm-wd"),
         ("ref-ppl-wd", "miniplm-wd"), ("miniplm", "miniplm-proxy"), ("no-kd", "miniplm-proxy"),
         ("mini-random-wd", "mini-miniplm-wd"), ("mini-no-kd", "mini-miniplm"),
         ("neox-random-wd", "neox-miniplm-wd"), ("neox-no-kd", "neox-miniplm-wd"), ("tt-no-kd", "tt-kd"),
         ("tt-first-160", "tt-seqkd")]


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _arm_seed(name: str) -> tuple[str, int]:
    match = re.fullmatch(r"(.*)-s(\d+)", name)
    return (match.group(1), int(match.group(2))) if match else (name, 10)


def load(results: Path) -> dict:
    """{arm: {seed: student}} of the finished students, in the run config's order: their spec, manifest, curve
    and final evaluations."""
    specs = {s["name"]: s for s in _json(results / "run_config.json").get("students", [])}
    arms: dict[str, dict[int, dict]] = {}
    found = {d.name: d for d in (results / "students").glob("*")}
    for directory in [found[n] for n in specs if n in found] + [found[n] for n in sorted(set(found) - set(specs))]:
        splits = _json(directory / "eval_splits.json").get("splits", {})
        if not splits:
            continue
        arm, seed = _arm_seed(directory.name)
        arms.setdefault(arm, {})[seed] = {"name": directory.name, "spec": specs.get(directory.name, {}),
                                          "manifest": _json(directory / "manifest.json"), "splits": splits,
                                          "dir": directory}
    return arms


def per_instance(seeds: dict) -> dict[int, dict[str, dict]]:
    """{seed: {split: per_instance record}} of one arm's students, for `evaluation.comparison.compare`."""
    return {seed: {split: s["splits"][split]["per_instance"] for split in SPLITS if split in s["splits"]}
            for seed, s in seeds.items()}


def differences(arms: dict, control: str, arm: str) -> dict[int, dict[str, dict]]:
    """{seed: {split: paired difference control - arm}} over the seeds both have."""
    return compare(per_instance(arms.get(control, {})), per_instance(arms.get(arm, {}))).seeds


def _mean_std(values: list[float], digits: int = 4) -> str:
    if not values:
        return "pending"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


# the registered rule: every seed pair >= 0.03 on heldout, the other splits' means above -0.02, no interval clause
RULE = Rule(split=PRIMARY, works=WORKS, does_not_work=DOES_NOT, not_worse=NOT_WORSE, interval="none",
            seeds=len(SEEDS))


def decide(arms: dict, control: str, arm: str, rivals: tuple[str, ...] = ()) -> tuple[str, str]:
    """The pre-registered outcome of `arm` against `control` (the library's rule plus v2's rival clause: no
    perplexity selection beats the arm), and every figure the rule reads."""
    outcome, figures = decide_rule(compare(per_instance(arms.get(control, {})), per_instance(arms.get(arm, {}))),
                                   RULE)
    if outcome == "pending":
        return "pending", f"{figures['seeds']} of {len(SEEDS)} seed pairs finished"
    primary = figures["per_seed"]
    why = f"d on {PRIMARY}: " + ", ".join(f"{x:+.4f}" for x in primary) + f" (mean {figures['mean']:+.4f})"
    for split in SPLITS[1:]:
        why += f"; mean d on {split} {figures[f'mean {split}']:+.4f}"
    rivals_beaten, rivals_pending = True, False
    for rival in rivals:
        if 10 not in arms.get(rival, {}):
            why += f"; {rival} not finished"
            rivals_pending = True
            continue
        rd = differences(arms, rival, arm)[10][PRIMARY]["loss_per_token"]
        why += f"; {rival} - {arm} on {PRIMARY} (seed 10) {rd:+.4f}"
        rivals_beaten &= rd > 0
    if outcome == "does not work":  # whatever the other clauses say
        return outcome, why
    if rivals_pending:
        return "pending", why
    return ("works" if outcome == "works" and rivals_beaten else "inconclusive"), why


def tier(arms: dict, points: dict) -> tuple[str, str]:
    """The tier the no-kd students reached ("scale", "CPU", "none", or "pending"), and the figures behind it."""
    base = [s["splits"][PRIMARY]["loss_per_token"] for s in arms.get("no-kd", {}).values() if PRIMARY in s["splits"]]
    level = points.get(PRIMARY, {})
    unigram = level.get("unigram [bpe8k]", {}).get("loss_per_token")
    bigram = level.get("bigram [bpe8k]", {}).get("loss_per_token")
    if len(base) < len(SEEDS) or unigram is None or bigram is None:
        return "pending", "pending (the no-kd students of every seed and the reference points)"
    mean = float(np.mean(base))
    reached = "scale" if mean <= bigram - TIER_SCALE else "CPU" if mean <= unigram - TIER_CPU else "none"
    def place(level: float) -> str:
        return f"{level - mean:.4f} below" if mean <= level else f"{mean - level:.4f} above"

    return reached, (f"no-kd (llama-small, {len(base)} seeds) on {PRIMARY}: {mean:.4f} nats/token; unigram "
                     f"{unigram:.4f} ({place(unigram)}), Kneser-Ney bigram {bigram:.4f} ({place(bigram)}), both "
                     f"fitted on the scored pool in bpe8k. Tier reached: **{reached}** (CPU: >= {TIER_CPU} below "
                     f"the unigram; scale: also >= {TIER_SCALE} below the bigram).")


def render(results: Path) -> str:
    arms = load(results)
    points = _json(results / "reference_points.json").get("levels", {})
    reached, tier_text = tier(arms, points)
    out = ["### Decision (pre-registered rule)", ""]
    for label, control, arm, rivals in (("primary", "random-wd", "miniplm-wd", ("teacher-ppl-wd", "ref-ppl-wd")),
                                        ("global vs no-KD", "no-kd", "miniplm", ()),
                                        ("global vs domain-matched", "random-mix", "miniplm", ())):
        outcome, why = decide(arms, control, arm, rivals)
        if outcome != "pending" and reached == "pending":
            outcome, why = "pending", why + "; the tier is not known yet"
        elif outcome != "pending" and reached == "none":  # the rule: no tier, no verdict on the differences
            outcome, why = "inconclusive: setting not reached", why + f" (the rule alone: {outcome})"
        elif outcome != "pending":
            why += f"; {reached} tier"
        out.append(f"- **{label}** ({arm} against {control}): **{outcome}**; {why}.")
    out += ["", "### Tier", "", tier_text, ""]

    out += ["### Students (final loss, nats/token / bits per byte; mean ± sample std over seeds)", "",
            "| arm | model | tokenizer | data | KD | seeds | params | tokens | " + " | ".join(SPLITS) + " |",
            "|---" * (8 + len(SPLITS)) + "|"]
    for arm, seeds in arms.items():
        first = next(iter(seeds.values()))
        spec, manifest = first["spec"], first["manifest"]
        cells = [arm, spec.get("model", "?"), spec.get("tokenizer") or "teacher's", spec.get("data", "?"),
                 spec.get("kd", "none"), ",".join(str(s) for s in seeds),
                 f"{manifest['model']['parameters'] / 1e6:.1f}M", f"{manifest['tokens']:,}"]
        for split in SPLITS:
            nats = [s["splits"][split]["loss_per_token"] for s in seeds.values() if split in s["splits"]]
            bpb = [s["splits"][split]["bits_per_byte"] for s in seeds.values() if split in s["splits"]]
            cells.append(f"{_mean_std(nats)} / {np.mean(bpb):.4f}" if nats else "-")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")

    out += ["### Each student (nats/token [95% bootstrap interval over instances] / bits per byte)", "",
            "| student | " + " | ".join(SPLITS) + " |", "|---" * (1 + len(SPLITS)) + "|"]
    for seeds in arms.values():
        for student in seeds.values():
            cells = [f"{v['loss_per_token']:.4f} [{v['loss_per_token_ci95'][0]:.3f}, {v['loss_per_token_ci95'][1]:.3f}]"
                     f" / {v['bits_per_byte']:.4f}" if (v := student["splits"].get(split)) else "-" for split in SPLITS]
            out.append(f"| {student['name']} | " + " | ".join(cells) + " |")
    out.append("")

    out += ["### Paired differences (control minus arm, nats/token; positive: the arm is better)", "",
            "Per seed: the difference on the same instances with its 95% bootstrap interval over instances. "
            "Across seeds: mean ± sample std of the per-seed differences.", "",
            "| control | arm | seed | " + " | ".join(SPLITS) + " |", "|---" * (3 + len(SPLITS)) + "|"]
    for control, arm in PAIRS:
        d = differences(arms, control, arm)
        for seed, by_split in d.items():
            cells = [f"{v['loss_per_token']:+.4f} [{v['loss_per_token_ci95'][0]:+.3f}, "
                     f"{v['loss_per_token_ci95'][1]:+.3f}]" if (v := by_split.get(split)) else "-" for split in SPLITS]
            out.append(f"| {control} | {arm} | {seed} | " + " | ".join(cells) + " |")
        if len(d) > 1:
            cells = [_mean_std([d[s][split]["loss_per_token"] for s in d if split in d[s]]) for split in SPLITS]
            out.append(f"| {control} | {arm} | **all {len(d)}** | " + " | ".join(cells) + " |")
    out.append("")

    domains_file = results / "corpus" / f"{PRIMARY}.parquet"
    if domains_file.is_file():
        domain = np.array(pq.read_table(domains_file, columns=["domain"]).column("domain").to_pylist())
        names = sorted(set(domain))
        out += [f"### Paired differences on {PRIMARY} by domain (control minus arm, nats/token; mean ± sample "
                "std over seeds)", "", "Where on the whole mix an arm gains or loses: the same paired "
                "differences restricted to each domain's instances (token-weighted).", "",
                "| control | arm | " + " | ".join(f"{n} ({int((domain == n).sum())})" for n in names) + " |",
                "|---" * (2 + len(names)) + "|"]
        for control, arm in PAIRS[:3]:
            per_seed = []
            for seed in sorted(set(arms.get(control, {})) & set(arms.get(arm, {}))):
                a = arms[control][seed]["splits"].get(PRIMARY, {}).get("per_instance")
                b = arms[arm][seed]["splits"].get(PRIMARY, {}).get("per_instance")
                if a is None or b is None or len(a["nats"]) != len(domain):
                    continue
                gap, tokens = np.subtract(a["nats"], b["nats"]), np.asarray(a["tokens"])
                per_seed.append([gap[domain == n].sum() / tokens[domain == n].sum() for n in names])
            if per_seed:
                cells = [_mean_std([row[i] for row in per_seed], 3) for i in range(len(names))]
                out.append(f"| {control} | {arm} | " + " | ".join(cells) + " |")
        out.append("")

    kept_file = results / "selections" / "miniplm-wd" / "instances.parquet"
    if kept_file.is_file():
        table = pq.read_table(kept_file, columns=["domain", "n_tokens", "teacher_logp", "ref_logp", "selected"])
        domain = np.array(table.column("domain").to_pylist())
        tokens, kept = table.column("n_tokens").to_numpy(), table.column("selected").to_numpy()
        teacher, ref = -table.column("teacher_logp").to_numpy(), -table.column("ref_logp").to_numpy()
        out += ["### What Difference Sampling keeps and drops inside each domain (miniplm-wd)", "",
                "Mean loss of the teacher and of the reference (nats/token, teacher tokenizer, token-weighted) on "
                "the pool instances `miniplm-wd` keeps and on those it drops.", "",
                "| domain | pool instances | kept: teacher | kept: reference | dropped: teacher | dropped: reference |",
                "|---|---|---|---|---|---|"]
        for name in sorted(set(domain)):
            cells = [f"{np.average(loss[(domain == name) & side], weights=tokens[(domain == name) & side]):.3f}"
                     for side in (kept, ~kept) for loss in (teacher, ref)]
            out.append(f"| {name} | {int((domain == name).sum()):,} | " + " | ".join(cells) + " |")
        out.append("")

    out += ["### Compute saving against no-KD of the same model, tokenizer and seed "
            "(only where measured points bracket)", "",
            "Read off the measured held-out curves at the loss both runs reach (interpolated between the two "
            "points that bracket it); 'not bracketed' where the points do not reach it, since no extrapolation "
            "is quoted; beside it, the saving of the fitted L(C) = A*C^-a + L_inf curves (4 points each) at the same "
            "loss.", "", "| student | baseline | measured saving | fitted saving |", "|---|---|---|---|"]
    for seeds in arms.values():
        spec = next(iter(seeds.values()))["spec"]
        if spec.get("data") == "all" and spec.get("kd", "none") == "none":
            continue
        for seed, student in seeds.items():
            base = next((s[seed] for a, s in arms.items() if seed in s and s[seed]["spec"].get("data") == "all"
                         and s[seed]["spec"].get("kd", "none") == "none"
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
    out.append("")

    out += ["### Reference points (nats/token / bits per byte, on the students' instances)", "",
            "| level | " + " | ".join(SPLITS) + " |", "|---" * (1 + len(SPLITS)) + "|"]
    for who in dict.fromkeys(w for split in SPLITS for w in points.get(split, {})):
        cells = [f"{p['loss_per_token']:.4f} / {p['bits_per_byte']:.4f}" if (p := points.get(s, {}).get(who)) else "-"
                 for s in SPLITS]
        out.append(f"| {who} | " + " | ".join(cells) + " |")
    out.append("")

    out += ["### Selections: n-gram diagnostic and domain mix", "",
            "Unigram and bigram models fitted on each selection's kept half and on the whole pool (teacher "
            "tokenizer), scored on the held-out splits: kept minus pool, nats/token (negative: the kept half's "
            "token statistics are closer to that split).", "",
            "| selection | kept tokens | " + " | ".join(f"{s} {lv}" for s in SPLITS for lv in ("unigram", "bigram"))
            + " |", "|---" * (2 + 2 * len(SPLITS)) + "|"]
    for selection in sorted((results / "selections").glob("*")):
        m = _json(selection / "manifest.json")
        diagnostic = m.get("ngram_diagnostic", {})
        cells = []
        for split in SPLITS:
            for level in ("unigram", "bigram"):
                d = diagnostic.get(split, {})
                cells.append(f"{d['kept'][level]['loss_per_token'] - d['pool'][level]['loss_per_token']:+.4f}"
                             if "kept" in d and "pool" in d else "-")
        out.append(f"| {selection.name} | {m.get('kept_tokens', 0):,} | " + " | ".join(cells) + " |")
    mixes = {s.name: _json(s / "manifest.json").get("domains", {}) for s in sorted((results / "selections").glob("*"))}
    mixes = {name: mix for name, mix in mixes.items() if mix}
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
    out.append("")
    return "\n".join(out)


# the signals of v2 as `miniplm compare` sees them: (signal, its control), the control built as compare builds it
COMPARE = [("miniplm-wd", "random-wd"), ("teacher-ppl-wd", "random-wd"), ("ref-ppl-wd", "random-wd"),
           ("miniplm", "random-mix"), ("miniplm-proxy", "random-mix")]


def compare_view(results: Path) -> str:
    """v2's signals through `miniplm compare`'s statistics and report (issue 27's default rule, not v2's
    registered one): what `miniplm compare` would have printed for the reproduction."""
    arms = load(results)
    seconds = {who: _json(results / "scores" / who / "manifest.json").get("wall_seconds", 0.0)
               for who in ("teacher", "reference", "proxy")}

    def cost(signal: str) -> float:
        manifest = _json(results / "selections" / signal / "manifest.json")
        reads = NEEDS[manifest["config"]["selector"]]
        if manifest["config"].get("teacher", "").endswith("proxy"):
            reads = ("proxy", "reference")
        return sum(seconds[who] for who in reads) + manifest.get("wall_seconds", 0.0)

    signals = [Signal(signal, control, per_instance(arms.get(signal, {})), per_instance(arms.get(control, {})),
                      cost(signal)) for signal, control in COMPARE]
    rule = Rule()
    return render_report({"llama-small, bpe8k": rank(signals, rule)}, rule,
                         "Reproduction v2 through `miniplm compare`", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("document", type=Path, nargs="?", help="the document whose tables to rewrite")
    parser.add_argument("--compare", action="store_true", help="print v2's signals as `miniplm compare` reports "
                        "them (issue 27's default rule) instead of rewriting the document")
    args = parser.parse_args()
    if args.compare:
        print(compare_view(args.results))
        return
    if args.document is None:
        parser.error("give the document to rewrite, or --compare")
    text = args.document.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{args.document} has no {BEGIN} ... {END} markers to fill")
    head, rest = text.split(BEGIN, 1)
    args.document.write_text(f"{head}{BEGIN}\n{render(args.results)}\n{END}{rest.split(END, 1)[1]}")
    print(f"rendered {args.document} from {args.results}")


if __name__ == "__main__":
    main()
