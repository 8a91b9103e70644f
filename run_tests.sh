#!/usr/bin/env bash
# Install into ./.venv (if needed) and run the test suite on the CPU, one thread per process.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements-test.txt
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Two workers (the CI machine has 2 cores); the tests that start several processes run on one of them, in turn
# (xdist_group "processes"). PYTEST_WORKERS=0 runs everything in this process. Then the tests marked "alone", with
# nothing beside them. Exit status 5 (none of the selected tests is of that kind) counts as success.
set +e
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadgroup -m "not alone" "$@"
together=$?
.venv/bin/python -m pytest -n 0 -m alone "$@"
alone=$?
[ "$together" -eq 5 ] && [ "$alone" -ne 5 ] && together=0
[ "$alone" -eq 5 ] && alone=0
[ "$together" -ne 0 ] && exit "$together"
exit "$alone"
