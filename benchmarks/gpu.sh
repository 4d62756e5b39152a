#!/usr/bin/env bash
# Issue 17's GPU benchmarks in one command, each goal checked, and a Markdown table for BENCHMARKS.md:
#   * CLIP scoring (benchmarks/clip.py): ViT-B-32, random weights, 256 px JPEGs, nvJPEG decode, bf16;
#     the clip_score stage against a plain webdataset + DataLoader + open_clip loop.
#     Goals: >= 20,000 samples/s and >= 3x the plain loop.
#   * Tokenization (benchmarks/tokenization.py): the tokenize_image stage with a VQ of the released
#     Emu3 vision tokenizer's shape (built from its config, random weights: nothing is downloaded)
#     on tar shards of 256 px JPEGs, against the model alone on tensors already on the GPU.
#     Goal: the stage >= 60% of the model alone.
#
#   benchmarks/gpu.sh              # full counts
#   benchmarks/gpu.sh --quick      # smaller counts: meant to stay under ~8 min on one H200, model build included
#   benchmarks/gpu.sh --cpu-smoke  # tiny models on the CPU: every step in a minute or two; figures mean nothing
#
# Options: --out PATH (default benchmarks/gpu_results.md; benchmarks/gpu_results.cpu-smoke.md with --cpu-smoke).
# Environment: PYTHON (default .venv/bin/python, made with `make venv` when missing);
# MMCURATE_GPU_BENCH_CPU_SMOKE=1 is the same as --cpu-smoke.
# Exits 2 with one line when no CUDA device is visible (unless in CPU smoke mode).
set -euo pipefail

mode=full
smoke="${MMCURATE_GPU_BENCH_CPU_SMOKE:-0}"
out=""
invocation="benchmarks/gpu.sh${*:+ $*}"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) mode=quick ;;
    --cpu-smoke) smoke=1 ;;
    --out) [ $# -ge 2 ] || { echo "gpu.sh: --out needs a path" >&2; exit 2; }; out="$2"; shift ;;
    --out=*) out="${1#--out=}" ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$out" in
  ""|/*) ;;
  *) out="$PWD/$out" ;;  # a path given is the caller's, not the repository's
esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "$smoke" = 1 ]; then
  mode=cpu-smoke
  out="${out:-benchmarks/gpu_results.cpu-smoke.md}"  # never over a GPU run's table
else
  out="${out:-benchmarks/gpu_results.md}"
fi

PY="${PYTHON:-.venv/bin/python}"
if [ -z "${PYTHON:-}" ] && [ ! -x "$PY" ]; then
  make venv >&2
fi

if [ "$smoke" != 1 ] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo "gpu.sh: no CUDA device visible (torch.cuda.is_available() is False in $PY); use --cpu-smoke for a CPU check" >&2
  exit 2
fi

# The machine, by its facts.
gpu="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)"
torch_facts="$("$PY" -c 'import torch
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), torch.cuda.get_device_name(): "
      + (torch.cuda.get_device_name() if cuda else "none (no CUDA device)"))')"
cpu="$(grep -m 1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ *//' || true)"
cpus="$(nproc)"
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
echo "device: ${gpu:-no nvidia-smi output} · $torch_facts · ${cpu:-CPU} x $cpus · load average $load_before"

# Decode threads (mmcurate) and DataLoader workers (the plain loop): half the cores, at most 8.
threads=$(( cpus / 2 > 8 ? 8 : (cpus / 2 < 1 ? 1 : cpus / 2) ))
# Shards of 5 batches of 512: several shards per DataLoader worker set, whole shards for the stage.
case "$mode" in
  full) clip_n=51200; vq_batches=20; vq_repeats=3 ;;
  quick) clip_n=20480; vq_batches=8; vq_repeats=2 ;;
esac
if [ "$smoke" = 1 ]; then
  clip_args=(--model pipeline/testing/models/tiny-clip/tiny-clip.json --pretrained random --n 64 --per-shard 32
             --image-size 64 --batch-size 16 --device cpu --decode torch --threads 1 --workers 1)
  vq_args=(--device cpu --preset emu3-tiny --resolution 64 --batch-size 2 --batches 2 --repeats 1 --skip-text)
else
  clip_args=(--model ViT-B-32 --pretrained random --n "$clip_n" --per-shard 2560 --image-size 256 --batch-size 512
             --device cuda --decode torch --precision bf16 --threads "$threads" --workers "$threads")
  vq_args=(--device cuda --preset emu3 --resolution 256 --batch-size 64 --batches "$vq_batches"
           --repeats "$vq_repeats" --dtype bfloat16 --skip-text)
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/mmcurate-gpu-bench.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$(dirname "$out")"
{
  if [ "$smoke" = 1 ]; then
    echo "## GPU benchmarks (issue 17): CPU smoke run"
    echo
    echo "A CPU smoke run with tiny models: it checks that every step runs and that this table is written;"
    echo "its figures say nothing about the goals, which are for one GPU."
  else
    echo "## GPU benchmarks (issue 17): ${gpu%%,*}"
  fi
  echo
  echo "\`$invocation\`, $(date -u '+%Y-%m-%d %H:%M UTC')."
  echo "GPU (nvidia-smi name, memory, driver): ${gpu:-none}. $torch_facts."
  echo "CPU: ${cpu:-unknown} x $cpus visible, load average $load_before before the run."
} > "$out"

start=$SECONDS
echo "== CLIP scoring: python -m benchmarks.clip ${clip_args[*]}"
"$PY" -m benchmarks.clip "${clip_args[@]}" --shards "$work/clip-shards" --markdown "$out"
clip_s=$(( SECONDS - start ))
rm -rf "$work/clip-shards"

start=$SECONDS
echo "== tokenization: python benchmarks/tokenization.py ${vq_args[*]}"
"$PY" benchmarks/tokenization.py "${vq_args[@]}" --markdown "$out"
vq_s=$(( SECONDS - start ))

{
  echo
  echo "Wall time: CLIP scoring ${clip_s} s, tokenization ${vq_s} s (shard writing and model build included);"
  echo "load average $(cut -d' ' -f1-3 /proc/loadavg) after the run."
} >> "$out"

echo
cat "$out"
echo
echo "wrote $out"
