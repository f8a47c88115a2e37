#!/usr/bin/env bash
# The GPU part of the benchmarks, as run on a lent H100 (see benchmarks/README.md). Writes into $OUT (or results/gpu).
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 SQUAD_V2_FILE=${SQUAD_V2_FILE:-.gpu/squad.json}
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())"
python3 benchmarks/train_throughput.py --config flan-t5-large --batch_size 8 --steps 10 \
    --setups peft_t5 peft_t5_qlora --output "$OUT/flan_t5_large_train.json"
python3 benchmarks/train_throughput.py --steps 20 --output "$OUT/train_throughput.json"
python3 benchmarks/generate_throughput.py --output "$OUT/generate_throughput.json"
python3 benchmarks/memory.py --config flan-t5-large --output "$OUT/memory_flan_t5_large.json"
