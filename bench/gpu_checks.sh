#!/usr/bin/env bash
# Every GPU check the project owes, as one command for a lent device machine (bench/gpu_checks.py says
# what runs). On the development machine first: `make gpu-wheels` (the trainer's Python packages the
# device image lacks, into .whl/). Then one device call from the repository root:
#   run(command="bash bench/gpu_checks.sh", carry=[".whl"], timeout_s=600)
# and copy what comes back (bench/results/*.json, docs/benchmarks.md) into the repository.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/loco-site .whl/*.whl \
        || { echo "gpu_checks.sh: installing .whl/ failed"; exit 1; }
    export PYTHONPATH="/tmp/loco-site${PYTHONPATH:+:$PYTHONPATH}"
fi
# the repository's packages without installing them (the trainer, and bench/ imports the trainer's config)
export PYTHONPATH="$PWD/trainer_image:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'PY' || exit 1
import importlib.util, sys
needed = ["torch", "pydantic", "click", "yaml", "prometheus_client", "rich", "numpy", "safetensors", "fsspec"]
missing = [m for m in needed if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_checks.sh: missing Python packages {missing}: run `make gpu-wheels` here and carry .whl")
PY
exec python3 bench/gpu_checks.py "$@"
