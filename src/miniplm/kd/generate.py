"""`miniplm generate`: the SeqKD corpus, written by the teacher, resumable, readable by `miniplm train`.

For every instance of a split (in corpus order), a prompt of 128-512 tokens (the paper's range; uniform,
fixed per instance by the seed, never more than the instance minus one token) is continued by sampling
at temperature 1 up to max_len + 1 tokens. Instances are grouped into parts of `part_instances`; each part
is generated with its own seeded RNG and written under a temporary name, so a killed run resumes by the
part and a rerun reproduces the same corpus. When all parts exist, they are packed into the `prepare`
layout (`<output>/train/` shards, the tokenizer, a manifest), so `miniplm train --corpus <output>` reads
the generated corpus like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from miniplm.core import stop
from miniplm.core.config import Compute, ConfigError, Precision, option, require_at_least_one
from miniplm.core.hashing import uniform_hash
from miniplm.core.manifest import open_parts, part_path, update_plan
from miniplm.core.models import load_causal_lm, resolve_device, resolve_precision, weights_description
from miniplm.core.progress import progress
from miniplm.core.stage import Stage, StageResult, execute
from miniplm.core.tokenizer import DEFAULT_TOKENIZER, load_tokenizer, source_fingerprint
from miniplm.core.tokens import vocab_fingerprint
from miniplm.data.packing import Instance
from miniplm.data.shards import PackedCorpus, ShardWriter, atomic_write, token_dtype

PART_SCHEMA = pa.schema([("instance_id", pa.int64()), ("prompt_tokens", pa.int32()), ("tokens", pa.list_(pa.int32()))])


@dataclass
class GenerateConfig(Compute):
    model: str = option(DEFAULT_TOKENIZER, "the teacher: local directory, hub id, .gguf file, or 'smollm2'")
    corpus: str = option("out/corpus", "a `miniplm prepare` output whose instances give the prompts")
    split: str = option("train", "split to take prompts from")
    output: str = option("out/seqkd", "output directory (a corpus in the `prepare` layout)", hashed=False)
    prompt_min: int = option(128, "shortest prompt, in tokens")
    prompt_max: int = option(512, "longest prompt, in tokens")
    temperature: float = option(1.0, "sampling temperature")
    batch_size: int = option(8, "sequences generated together")
    part_instances: int = option(64, "instances per part: the unit of resume")
    max_instances: int | None = option(None, "use only the first N instances of the split")
    seed: int = option(10, "seed of prompt lengths and sampling")
    precision: Precision = option("fp32", "autocast dtype of the teacher's matmuls (fp32: none)")

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.prompt_min <= self.prompt_max:
            raise ConfigError(f"prompt_min/prompt_max: need 1 <= {self.prompt_min} <= {self.prompt_max}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature: must be positive, got {self.temperature}")
        require_at_least_one(self, "batch_size", "part_instances", "max_instances")


def prompt_lengths(config: GenerateConfig, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    span = config.prompt_max - config.prompt_min + 1
    wanted = config.prompt_min + np.floor(uniform_hash(config.seed, ids) * span).astype(np.int64)
    return np.minimum(wanted, lengths - 1).clip(min=1)


@torch.no_grad()
def generate_part(model, split, ids: np.ndarray, prompts: np.ndarray, config: GenerateConfig, max_len: int,
                  part: int, pad_id: int) -> pa.Table:
    """Continue each prompt of the part up to max_len + 1 tokens (a row stops early at EOS)."""
    torch.manual_seed(config.seed * 1_000_003 + part)  # one RNG stream per part: resumable, reproducible
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(ids), config.batch_size):
        batch_ids = ids[start : start + config.batch_size]
        batch_prompts = prompts[start : start + config.batch_size]
        width = int(batch_prompts.max())
        tokens = torch.full((len(batch_ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
        for i, (instance, length) in enumerate(zip(batch_ids, batch_prompts)):  # left-padded prompts
            tokens[i, width - length :] = torch.from_numpy(split[int(instance)][:length].astype(np.int64))
            mask[i, width - length :] = 1
        out = model.generate(input_ids=tokens.to(device), attention_mask=mask.to(device), do_sample=True,
                             temperature=config.temperature, top_k=0, top_p=1.0,
                             max_new_tokens=max_len + 1 - int(batch_prompts.min()), pad_token_id=pad_id)
        for i, (instance, length) in enumerate(zip(batch_ids, batch_prompts)):
            continuation = out[i, width:].tolist()
            if pad_id in continuation:  # the row ended (EOS, then padding): keep its EOS
                continuation = continuation[: continuation.index(pad_id) + 1]
            seq = tokens[i, width - length :].tolist() + continuation
            rows.append({"instance_id": int(instance), "prompt_tokens": int(length), "tokens": seq[: max_len + 1]})
    return pa.Table.from_pylist(rows, schema=PART_SCHEMA)


class Generate(Stage):
    name = "generate"
    config = GenerateConfig
    in_place = True  # parts survive a kill

    def inputs(self, config: GenerateConfig, log) -> dict:
        return {"corpus": PackedCorpus(config.corpus).key, "model": source_fingerprint(config.model)}

    def run(self, config: GenerateConfig, output: Path, inputs: dict, log) -> dict:
        if config.threads:
            torch.set_num_threads(config.threads)
        corpus = PackedCorpus(config.corpus)
        split = corpus.split(config.split)
        count = len(split) if config.max_instances is None else min(config.max_instances, len(split))
        lengths = split.table.column("n_tokens").to_numpy()[:count].astype(np.int64)
        ids = np.arange(count, dtype=np.int64)
        prompts = prompt_lengths(config, ids, lengths)
        parts = [ids[a : a + config.part_instances] for a in range(0, count, config.part_instances)]
        max_len = corpus.manifest["max_len"]
        open_parts(output)
        update_plan(output, parts=len(parts), instances=count)

        tokenizer = corpus.load_tokenizer()
        if vocab_fingerprint(load_tokenizer(config.model)) != vocab_fingerprint(tokenizer):
            raise ValueError(f"teacher '{config.model}' does not share the tokenizer of {corpus.path}: SeqKD prompts "
                             f"are corpus tokens, so the teacher must read them")
        device = resolve_device(config.device)
        model = load_causal_lm(config.model, device=device)
        dtype = resolve_precision(config.precision, device)
        todo = [p for p in range(len(parts)) if not part_path(output, p).is_file()]
        if len(todo) < len(parts):
            log(f"generate: resuming {output}: {len(parts) - len(todo)} of {len(parts)} parts already done")
        with progress(config.progress, len(todo) * config.part_instances, "generate", unit="instances") as advance:
            for p in todo:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    table = generate_part(model, split, parts[p], prompts[parts[p]], config, max_len, p, corpus.eos_id)
                atomic_write(part_path(output, p), lambda path, table=table: pq.write_table(table, path))
                advance(len(parts[p]))
                stop.check()

        writer = ShardWriter(output / "train", token_dtype(len(tokenizer)), 1 << 26, shuffle=False, seed=0)
        domains = split.table.column("domain").to_pylist()
        generated = 0
        for p in range(len(parts)):
            for row in pq.read_table(part_path(output, p)).to_pylist():
                generated += len(row["tokens"]) - row["prompt_tokens"]
                writer.add(Instance(np.asarray(row["tokens"], dtype=np.int64), domains[row["instance_id"]],
                                    np.array([row["instance_id"]], dtype=np.int64)))
        summary = writer.close()
        tokenizer.save_pretrained(output / "tokenizer")
        return dict(
            max_len=max_len, tokenizer={**corpus.manifest["tokenizer"], "path": "tokenizer"},
            source={"corpus": str(corpus.path), "key": corpus.key, "split": config.split, "model": config.model},
            splits={"train": summary}, generated_tokens=generated,
            model={"spec": config.model, "weights": weights_description(config.model),
                   "parameters": sum(p.numel() for p in model.parameters())},
        )

    def summary(self, manifest: dict) -> str:
        return (f"generated {manifest['splits']['train']['instances']:,} instances "
                f"({manifest['generated_tokens']:,} new tokens) into {manifest['output']}")


def generate(config: GenerateConfig, force: bool = False, log=print) -> StageResult:
    """Write the SeqKD corpus (resuming a killed run, or reusing an up-to-date one)."""
    return execute(Generate(), config, force, log)
