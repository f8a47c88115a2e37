#!/usr/bin/env bash
# The GPU table of issue 11 in one command (~8 minutes on one H100): JSON + PNG per run under $OUT
# (default benchmarks/results/gpu), and the log beside them. A setup that fails is recorded and the rest go on.
#   bash benchmarks/gpu.sh            on any machine with a CUDA GPU
#   bash benchmarks/gpu.sh --quick    a smoke test of the same runs on t5-small shapes (CPU: ~5 minutes)
# Data: ../shared/data (or $SQUAD_V2_FILE, $JOKES_FILE), else the bundled samples.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -f .gpu/squad.json ] && export SQUAD_V2_FILE=${SQUAD_V2_FILE:-.gpu/squad.json}
[ -f .gpu/qa-jokes.csv ] && export JOKES_FILE=${JOKES_FILE:-.gpu/qa-jokes.csv}
large=flan-t5-large; steps=10; quick=(); epoch=(--epoch)
if [ "${1:-}" = "--quick" ]; then large=t5-small; steps=1; quick=(--quick); epoch=(); fi
bench() { python3 benchmarks/train_throughput.py "${quick[@]}" "$@"; }
{
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
echo "== 1 + 4: $large LoRA bf16 on SQuAD lengths (auto token budget; MFU), and QLoRA vs LoRA at a 4,096-token budget (memory)"
bench --task squad --config "$large" --batch_size 8 --steps "$steps" --budget 4096 \
    --setups hf_defaults peft_t5 peft_t5_tokens peft_t5_qlora --output "$OUT/1_squad_$large.json"
echo "== 2: $large jokes, one epoch: the toolkit (measured whole), HF defaults batch 8 and the notebook (timed steps x steps an epoch)"
bench --task jokes --config "$large" --batch_size 8 --steps "$steps" "${epoch[@]}" \
    --setups baseline hf_defaults peft_t5 --output "$OUT/2_jokes_$large.json"
echo "== 3: t5-small on SQuAD lengths, batch 16: the toolkit against HF defaults, and what each choice is worth"
bench --task squad --config t5-small --steps $((steps * 4)) \
    --setups baseline hf_defaults peft_t5 peft_t5_fp32 peft_t5_count peft_t5_hf_adafactor peft_t5_eager \
    --output "$OUT/3_squad_t5-small.json"
} 2>&1 | tee "$OUT/log.txt"
