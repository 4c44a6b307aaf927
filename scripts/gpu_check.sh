#!/usr/bin/env bash
# GPU check (see scripts/gpu_check.py); must finish in 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 300 "${PYTHON:-python3}" scripts/gpu_check.py "$@"
