#!/usr/bin/env bash
# One command for a GPU machine: the repository's virtualenv, offline, the SD1.5-sized check (bench/gpu_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
exec "${PYTHON:-.venv/bin/python}" bench/gpu_check.py "$@"
