"""Retrain v2's no-kd (seed 10) from configs/repro_v2.yaml and compare it with its committed evaluation
(docs/results/repro_v3.md, "Reproducibility check"): prepare, the bpe8k tokenizer, the pool's export and the
student, then the final losses side by side. The export reads v2's committed `miniplm` selection (its subset
`all` is the pool), so neither the teacher's nor the reference's pass is needed. About 9 minutes on 2 cores.

    .venv/bin/python scripts/repro_v2_rerun.py . out/v2_rerun
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from miniplm.core.config import load_config
from miniplm.core.stage import execute
from miniplm.pipeline import Pipeline, RunConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="the repository (its configs/ and results/)")
    parser.add_argument("out", type=Path, help="where the rerun writes (a run directory)")
    args = parser.parse_args()
    root, out = args.root, args.out
    config = load_config(RunConfig, str(root / "configs" / "repro_v2.yaml"), {"output": str(out)})
    pipeline = Pipeline(config)
    student = next(s for s in config.students if s.name == "no-kd")
    selection = pipeline.selection("miniplm")
    if not (selection / "manifest.json").is_file():
        shutil.copytree(root / "results" / "repro_v2" / "selections" / "miniplm", selection)
    wanted = {"prepare", "tokenizer train bpe8k", f"export {pipeline.data(student).name}", "train no-kd",
              "evaluate no-kd"}
    for step in pipeline.steps():
        if step.label in wanted:
            print(step.label, "...", flush=True)
            result = execute(step.stage, step.config(), log=print)
            print("   ", result.summary, flush=True)
    new = json.loads((out / "students" / "no-kd" / "evaluation" / "eval_splits.json").read_text())["splits"]
    old = json.loads((root / "results" / "repro_v2" / "students" / "no-kd" / "eval_splits.json").read_text())["splits"]
    for split in old:
        same = new[split]["per_instance"]["nats"] == old[split]["per_instance"]["nats"]
        print(f"{split}: committed {old[split]['loss_per_token']:.4f}, rerun {new[split]['loss_per_token']:.4f}, "
              f"difference {new[split]['loss_per_token'] - old[split]['loss_per_token']:+.4f}; per-instance losses "
              + ("identical" if same else "differ"))
    curves = [[json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (root / "results" / "repro_v2" / "students" / "no-kd", out / "students" / "no-kd")]
    print(f"training curve: {len(curves[1])} logged losses, " + ("identical" if curves[0] == curves[1] else "differ"))


if __name__ == "__main__":
    main()
