#!/usr/bin/env bash
# Set up (venv, torch==2.13.0 CPU when no torch is installed, Prism) and then:
#   bash scripts/dev.sh demo   -> the demo (tiny random-weight model, embedded and split)
#   bash scripts/dev.sh test   -> the whole test suite
#   bash scripts/dev.sh setup  -> only the set-up
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PY=.venv/bin/python
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  # Pinned: an unpinned torch would pull a multi-GB CUDA build.
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e '.[test]'
case "${1:-setup}" in
  demo) exec .venv/bin/prism demo ;;
  test) shift; exec "$PY" -m pytest -q -p no:cacheprovider tests --ignore=tests/gpu "$@" ;;
  setup) ;;
  *) echo "usage: bash scripts/dev.sh [setup|demo|test]" >&2; exit 2 ;;
esac
