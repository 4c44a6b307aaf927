#!/usr/bin/env bash
# GPU check, one run, at most 8 minutes, installs nothing. On a machine with an NVIDIA GPU and
# onnxruntime-gpu (docs/gpu-machine.md), it prints:
#   1. the provider the service uses, and its parity with CPU onnxruntime (benchmarks/gpu_check.py);
#   2. at concurrency 64 with the bench's 640x480 JPEGs, requests/s, p50/p99 and errors of
#      (a) the CPU-only service, one worker per core, (b) today's per-worker CUDA topology,
#      (c) the owner topology (one CUDA context fed by every worker) (benchmarks/topology.py).
#   3. GPU training: one epoch of the paper model on 10,000 generated COYO-sized samples with
#      --device cuda (bfloat16 autocast, pinned memory): time to first batch, whole run, peak RSS.
# GPU decode (nvImageCodec) is not built: there is no row for it.
# Figures land in ${OUT:-.}/gpu_check.json and ${OUT:-.}/topology_c64.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-.}"
timeout 120 "$PY" benchmarks/gpu_check.py --requests 1000 --concurrency 64 --server-log "$OUT/gpu_check_server.log" \
  | tee "$OUT/gpu_check.json" || echo "gpu_check.py failed (exit $?): see $OUT/gpu_check_server.log"
timeout 240 "$PY" -m benchmarks.topology --configs cpu-workers,cuda-workers,cuda-owner --concurrency 64 \
  --requests 3000 --out "$OUT/topology_c64.json" || echo "topology benchmark failed (exit $?)"
timeout 110 "$PY" -m benchmarks.train_data --sizes 10000 --rate-samples 2000 --device cuda --workers 8 \
  --out "$OUT/train_data_cuda.json" || echo "GPU training check failed (exit $?)"
