"""Collect the small results of a `miniplm run` and render the tables of the first reproduction's document.

    .venv/bin/python scripts/repro_tables.py collect out/micro_repro results/micro_repro
    .venv/bin/python scripts/repro_tables.py render results/micro_repro docs/results/micro_repro.md

`collect` copies what a document needs and nothing heavy (`miniplm.evaluation.results.collect`; repro v2 uses
it too). `render` rewrites the part of the document between `<!-- tables:begin -->` and `<!-- tables:end -->`
with the first reproduction's tables (the paper's Table 1 layout), from the results folder alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from miniplm.evaluation import results as r


def render(folder: Path) -> str:
    rows = r.students(folder)
    primary, levels = r.legacy_points(r.read_json(folder / r.POINTS_FILE))
    other = [s for s in levels if s != primary]
    tables = (r.points_by_model_table(r.read_json(folder / r.POINTS_FILE)) + r.table1(rows, primary, other)
              + r.fitted_saving_table(rows) + r.mix_table(folder) + r.quoted_facts(folder, rows)
              + r.costs_table(folder))
    return "\n".join(tables)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="copy a run's small results into a results folder")
    c.add_argument("run", type=Path)
    c.add_argument("results", type=Path)
    d = sub.add_parser("render", help="rewrite the tables of a results document from a results folder")
    d.add_argument("results", type=Path)
    d.add_argument("document", type=Path)
    args = parser.parse_args()
    if args.command == "collect":
        size = r.collect(args.run, args.results)
        print(f"collected {args.results} ({size / 1e6:.1f} MB)")
        return
    r.fill(args.document, render(args.results))
    print(f"rendered {args.document} from {args.results}")


if __name__ == "__main__":
    main()
