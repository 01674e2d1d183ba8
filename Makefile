# Loco: every set-up step lives here, so a fresh clone needs only `make demo` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCO := $(VENV)/bin/loco
STAMP := $(VENV)/.installed
# torch==2.13.0 from PyPI is its CUDA build (about 4.5 GB with the nvidia-* wheels; PyPI has no CPU-only wheel):
# it runs on CPU as well, and the disk check below fails early, with the numbers, where it cannot fit.
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -q
INSTALL_MIN_FREE_GB := 8

.PHONY: install tools kube test e2e demo demo-fault crds bench gpu-wheels clean help

help:
	@echo "make demo   - create .venv, install, run a real TrainingJob on the embedded local cluster"
	@echo "make test   - create .venv, install, run the whole suite (unit, multi-process, e2e)"
	@echo "make crds   - regenerate crds/trainingjob.yaml, crds/population.yaml and docs/api.md from the pydantic models"
	@echo "make kube   - build the real Kubernetes control plane (Go) into ~/.cache/loco/kube"
	@echo "make demo-fault - the demo with a straggler injected: blamed, isolated, resumed"
	@echo "make bench  - the trainer CPU benchmark (others: bench/*.py, see docs/benchmarks.md)"
	@echo "make gpu-wheels - .whl/: the wheels bench/gpu_checks.sh installs on a lent GPU machine"

$(STAMP): pyproject.toml
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); if [ "$$free" -lt $(INSTALL_MIN_FREE_GB) ]; then \
		echo "make install: $$free GB free here; the install (torch's CUDA build from PyPI) needs $(INSTALL_MIN_FREE_GB) GB" >&2; exit 1; fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[operator,trainer,dev]'
	@touch $(STAMP)

install: $(STAMP)

# Debian packages the tests use: prometheus and promtool (metrics lint, e2e/test_prometheus.py, loco local up
# --prometheus) and chromium (tests/test_local_apiserver_auth.py: a real browser page attacks the API server).
# Needs root for apt; without it, say so and go on (those tests then skip and name the reason).
TOOLS := promtool:prometheus chromium:chromium
tools:
	@missing=$$(for t in $(TOOLS); do command -v $${t%%:*} >/dev/null || echo $${t##*:}; done); \
	if [ -n "$$missing" ]; then if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
		else echo "note: missing $$missing and no root apt-get: install Debian's packages: $$missing"; fi; fi

# The real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) from the
# Go modules pinned in local/kube, built once into ~/.cache/loco/kube/<hash of its sources>/ (docs/local-cluster.md).
kube:
	@local/kube/build.sh >/dev/null
	@local/kube/kueue/build.sh >/dev/null

# The e2e scenarios run on both control planes: the embedded API server and the real Kubernetes one.
test: install tools kube
	$(PY) -m pytest -q -ra tests e2e --control-plane both

e2e: install kube
	$(PY) -m pytest -q -ra e2e --control-plane both

demo: install
	$(LOCO) local demo examples/quickstart.yaml

demo-fault: install
	$(LOCO) local demo examples/quickstart-fault.yaml

crds: install
	$(LOCO) crds --write --docs

bench: install
	$(PY) bench/bench_trainer.py

# The Python packages the trainer needs that the device machine's image lacks (Python 3.12 there; see
# bench/gpu_checks.sh), at the versions installed here: carried as .whl/ to the lent GPU machine.
GPU_WHEELS := pydantic pydantic-core annotated-types typing-inspection typing-extensions
gpu-wheels: install
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: -d .whl \
		--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		$$($(PY) -c 'import sys; from importlib.metadata import version; print(*(f"{n}=={version(n)}" for n in sys.argv[1:]))' $(GPU_WHEELS))
	@ls .whl

clean:
	rm -rf $(VENV) .loco .pytest_cache
