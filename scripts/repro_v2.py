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
from pathlib import Path

import numpy as np

from miniplm.evaluation import results as r
from miniplm.evaluation.comparison import Rule, Signal, compare, rank, render_report
from miniplm.evaluation.comparison import decide as decide_rule

PRIMARY, SPLITS, SEEDS = "heldout", ("heldout", "heldout_hq", "heldout_unseen"), (10, 11, 12)
WORKS, DOES_NOT, NOT_WORSE, TIER_CPU, TIER_SCALE = 0.03, 0.02, -0.02, 1.0, 0.2
# (control, arm): the comparisons the rule and the text use, by arm name (a student `<arm>-s<seed>` is its seed)
PAIRS = [("random-wd", "miniplm-wd"), ("no-kd", "miniplm"), ("random-mix", "miniplm"), ("no-kd", "random-wd"),
         ("no-kd", "miniplm-wd"), ("no-kd", "random-mix"), ("teacher-ppl-wd", "miniplm-wd"),
         ("ref-ppl-wd", "miniplm-wd"), ("miniplm", "miniplm-proxy"), ("no-kd", "miniplm-proxy"),
         ("mini-random-wd", "mini-miniplm-wd"), ("mini-no-kd", "mini-miniplm"),
         ("neox-random-wd", "neox-miniplm-wd"), ("neox-no-kd", "neox-miniplm-wd"), ("tt-no-kd", "tt-kd"),
         ("tt-first-160", "tt-seqkd")]


def load(results: Path) -> dict:
    """{arm: {seed: student}} of the finished students (a name without a seed suffix is seed 10)."""
    return r.arms(results, default_seed=SEEDS[0])


def per_instance(seeds: dict) -> dict[int, dict[str, dict]]:
    return r.per_instance(seeds, SPLITS)


def differences(arms: dict, control: str, arm: str) -> dict[int, dict[str, dict]]:
    return r.differences(arms, control, arm, SPLITS)


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
    points = r.read_json(results / r.POINTS_FILE).get("levels", {})
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

    out += (r.students_table(arms, SPLITS) + r.each_student_table(arms, SPLITS) + r.paired_table(arms, PAIRS, SPLITS)
            + r.domain_table(results / "corpus" / f"{PRIMARY}.parquet", arms, PAIRS[:3], PRIMARY)
            + r.kept_dropped_table(results, "miniplm-wd") + r.saving_table(arms) + r.points_table(points, SPLITS)
            + r.selections_table(results, SPLITS))
    return "\n".join(out)


# the signals of v2 as `miniplm compare` sees them: (signal, its control), the control built as compare builds it
COMPARE = [("miniplm-wd", "random-wd"), ("teacher-ppl-wd", "random-wd"), ("ref-ppl-wd", "random-wd"),
           ("miniplm", "random-mix"), ("miniplm-proxy", "random-mix")]


def compare_view(results: Path) -> str:
    """v2's signals through `miniplm compare`'s statistics and report (issue 27's default rule, not v2's
    registered one): what `miniplm compare` would have printed for the reproduction."""
    arms = load(results)
    seconds = {who: r.read_json(results / "scores" / who / "manifest.json").get("wall_seconds", 0.0)
               for who in ("teacher", "reference", "proxy")}

    def cost(signal: str) -> float:
        return r.signal_seconds(r.read_json(results / "selections" / signal / "manifest.json"), seconds)

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
    r.fill(args.document, render(args.results))
    print(f"rendered {args.document} from {args.results}")


if __name__ == "__main__":
    main()
