#!/usr/bin/env bash
# The prepared GPU check (DEVELOPERS.md: one short script per lent machine): scoring and training throughput
# with MFU, and the real `miniplm score` / `miniplm train` commands on CUDA.
#
#   bash bench/gpu.sh ASSETS OUT
#
# ASSETS holds `corpus/` (a `miniplm prepare` output) and `smollm2/config.json` (the teacher's config). The
# teacher is built from its config with random weights: throughput depends on shapes, not weight values,
# and the 98 MB GGUF file does not fit what travels to the lent machine. Everything prints and lands in OUT.
set -u
assets=$1
out=$2
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$out/gpu.txt"
python3 - "$assets" <<'PY'
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
assets = sys.argv[1]
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(f"{assets}/smollm2"))
model.save_pretrained("/tmp/teacher")
AutoTokenizer.from_pretrained(f"{assets}/corpus/tokenizer").save_pretrained("/tmp/teacher")
PY
timeout 180 python3 bench/score.py --corpus "$assets/corpus" --model /tmp/teacher --instances 640 \
  --batch-tokens 65536 2>&1 | tee "$out/score.txt"
timeout 120 python3 bench/score.py --corpus "$assets/corpus" --model /tmp/teacher --instances 640 \
  --batch-tokens 65536 --skip-naive --eager 2>&1 | tee "$out/score_eager.txt"
timeout 120 python3 bench/train.py --corpus "$assets/corpus" --model qwen2-200m --steps 25 --skip 5 \
  --batch-size 16 2>&1 | tee "$out/train.txt"
timeout 45 python3 -m miniplm score --model /tmp/teacher --corpus "$assets/corpus" --split heldout \
  --output /tmp/scores --progress false 2>&1 | tail -5 | tee "$out/score_cli.txt"
python3 -c "import json; m = json.load(open('/tmp/scores/manifest.json')); print({k: m.get(k) for k in ('throughput', 'precision', 'rows', 'instances')})" \
  2>&1 | tee -a "$out/score_cli.txt"
