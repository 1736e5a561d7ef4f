"""Training throughput: `miniplm train` against the HF `Trainer` on the same model, data and batch.

    .venv/bin/python bench/train.py --corpus out/corpus --model qwen2-small --steps 20 --batch-size 8

Both train the same preset from the same seed on the same instances in stored order, with the same batch,
AdamW settings and autocast precision, for the same number of steps; the first `--skip` steps are left out
of the timing (allocation, warm-up). Prints tokens/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flops import forward_flops_per_token, mfu_line

from miniplm.core.allocator import keep_freed_memory
from miniplm.core.config import load_config
from miniplm.data.shards import PackedCorpus
from miniplm.training.train import TrainConfig, build_model, train


def miniplm_speed(args, out: Path) -> float:
    config = load_config(TrainConfig, None, {
        "corpus": args.corpus, "output": str(out), "model": args.model, "batch_size": args.batch_size,
        "max_steps": args.steps, "warmup_steps": 2, "log_every": 1, "save_every": 10**9, "progress": False,
        "precision": args.precision})
    train(config, log=lambda m: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = np.diff([0] + [r["tokens"] for r in rows])  # one row per step (log_every 1)
    seconds = sum(n / r["tokens_per_second"] for n, r in zip(per_step[args.skip:], rows[args.skip:]))
    return float(per_step[args.skip:].sum()) / seconds


def trainer_speed(args, out: Path) -> float:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    corpus = PackedCorpus(args.corpus)
    split = corpus.split("train")
    tokenizer = corpus.load_tokenizer()
    config = load_config(TrainConfig, None, {"corpus": args.corpus, "model": args.model})
    model = build_model(config, corpus, tokenizer)
    eos = corpus.eos_id

    class Instances(torch.utils.data.Dataset):
        def __len__(self):
            return len(split)

        def __getitem__(self, i):
            x = torch.from_numpy(split[i].astype(np.int64))
            labels = x.clone()
            labels[1:][x[:-1] == eos] = -100
            return {"input_ids": x, "labels": labels}

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), eos, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = r["input_ids"]
            labels[i, : len(r["labels"])] = r["labels"]
        return {"input_ids": ids, "labels": labels}

    class Clock(TrainerCallback):
        def __init__(self):
            self.start = None
            self.end = None

        def on_step_end(self, args_, state, control, **kw):
            if state.global_step == args.skip:
                self.start = time.perf_counter()
            self.end = time.perf_counter()

    clock = Clock()
    arguments = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-6, weight_decay=0.01,
        max_grad_norm=1.0, warmup_steps=2, lr_scheduler_type="cosine", logging_steps=10**9, save_strategy="no",
        report_to=[], use_cpu=not torch.cuda.is_available(), bf16=args.precision != "fp32",
        dataloader_num_workers=0, seed=10, disable_tqdm=True)
    trainer = Trainer(model=model, args=arguments, train_dataset=Instances(), data_collator=collate,
                      callbacks=[clock])
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(range(len(split)))  # stored order
    trainer.train()
    lengths = split.table.column("n_tokens").to_numpy()
    timed = lengths[args.skip * args.batch_size : args.steps * args.batch_size].sum()
    return float(timed) / (clock.end - clock.start)


def main() -> None:
    keep_freed_memory()  # as the CLI does
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="out/corpus")
    parser.add_argument("--model", default="qwen2-small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ours = miniplm_speed(args, Path(tmp) / "miniplm")
        theirs = trainer_speed(args, Path(tmp) / "trainer")
    print(f"{args.model}, batch {args.batch_size}, {args.steps} steps ({args.skip} untimed), "
          f"precision {args.precision}, threads {torch.get_num_threads()}")
    print("| trainer | tokens/s |")
    print("|---|---|")
    print(f"| miniplm train | {ours:,.0f} |")
    print(f"| HF Trainer | {theirs:,.0f} |")
    print(f"| ratio | {ours / theirs:.2f}x |")
    corpus = PackedCorpus(args.corpus)
    model = build_model(load_config(TrainConfig, None, {"corpus": args.corpus, "model": args.model}), corpus,
                         corpus.load_tokenizer())
    lengths = corpus.split("train").table.column("n_tokens").to_numpy()[: args.steps * args.batch_size]
    per_token = 3 * forward_flops_per_token(model, mean_context=float(lengths.mean()))  # forward + backward
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {per_token / 1e9:.2f} GFLOP per "
          f"training token")
    line = mfu_line(ours * per_token)
    if line:
        print(line)


if __name__ == "__main__":
    main()
