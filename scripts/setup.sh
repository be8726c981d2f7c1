#!/usr/bin/env bash
# Create .venv (if absent) and install zimage-trt with the pinned dependencies of requirements-ci.txt.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
# torch first and alone: with it in place no other package pulls a multi-GB CUDA build.
# --no-compile: pip would byte-compile every installed file (torch alone has thousands), one at a time; Python
# compiles what is imported, once, on first use (fresh clone on 2 cores: setup 68 s instead of 174 s).
.venv/bin/python -m pip install -q --no-compile "$(grep '^torch==' requirements-ci.txt)"
.venv/bin/python -m pip install -q --no-compile -r requirements-ci.txt -c constraints-ci.txt
.venv/bin/python -m pip install -q --no-deps -e .
.venv/bin/zimage-trt --help >/dev/null
echo "setup done: .venv/bin/zimage-trt is ready"
