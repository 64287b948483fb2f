# fededge: `make demo` runs a real federation; `make test` runs the test suite;
# `make bench` regenerates the strategy benchmarks; `make wheel` builds the wheel a device
# installs (devices/install.sh --from dist/fededge-<version>-py3-none-any.whl).
# Everything either target needs is installed here, into .venv (torch first, from TORCH_SPEC,
# so pip never resolves a bare `torch` to a multi-GB CUDA build).
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed-stamp
DEMO_OUT   ?= runs/demo

.PHONY: demo test bench mosquitto chromium systemd-analyze screenshot clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[train,test]"
	touch $@

# The wheel `pip install` and devices/install.sh --from take: pure Python, one for every device
# (`pip install dist/fededge-*.whl` is the edge runtime and agent; add `[train]` to train).
DIST       ?= dist
VERSION    := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
WHEEL      := $(DIST)/fededge-$(VERSION)-py3-none-any.whl
.PHONY: wheel
wheel: $(WHEEL)
$(WHEEL): pyproject.toml $(shell find fededge devices export -type f -not -name '*.pyc')
	rm -f $(DIST)/fededge-*.whl
	$(PYTHON) -m pip wheel --quiet --no-deps --wheel-dir $(DIST) .
	@echo "built $@"

# Integration tests run a real Mosquitto. As root we install the Debian package; otherwise we say how.
mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing mosquitto (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
	else \
		echo "mosquitto is missing; its tests will be skipped. Install it with: sudo apt-get install -y mosquitto"; \
	fi

# tests/test_dashboard.py renders the dashboard in headless Chromium (Debian package chromium;
# no browser is downloaded). As root we install it; otherwise we say how.
chromium:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium (Debian package, for the dashboard's browser test)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "chromium is missing; the dashboard's browser test will be skipped. Install it with: sudo apt-get install -y chromium"; \
	fi

# tests/test_install_assets.py checks the systemd units with `systemd-analyze verify` (package
# systemd; present on most Debian machines, installed here as root when missing).
systemd-analyze:
	@if command -v systemd-analyze >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing systemd (for systemd-analyze)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; \
	else \
		echo "systemd-analyze is missing; unit files are only parsed. Install it with: sudo apt-get install -y systemd"; \
	fi

FEDEDGE    := $(VENV)/bin/fededge

# simulate → export every student (with int8) → run one exported model with onnxruntime only.
demo: $(STAMP)
	$(FEDEDGE) devices
	$(FEDEDGE) simulate --out $(DEMO_OUT)
	$(FEDEDGE) export $(DEMO_OUT) --all --quantize int8
	$(FEDEDGE) infer "$$(ls -d $(DEMO_OUT)/export/*/ | head -n 1)" $(DEMO_OUT)/test.npz

# lint-imports checks the layer contracts of pyproject.toml ([tool.importlinter]).
test: $(STAMP) mosquitto chromium systemd-analyze
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

# The strategy suite behind BENCHMARKS.md: fedmd vs FedAvg vs fedavg-kd on digits and wine,
# 3 label skews x 3 seeds, codecs, aggregators, and 10/50/100 clients in one process: ~4 hours
# on an idle 2-core machine; it resumes where it stopped (benchmarks/results/suite.jsonl).
# BENCH_ARGS=--quick is the CI smoke (digits, alpha 0.5, seed 0, 3 rounds, ~2 minutes; .ci/run
# runs it after the tests and it fails when fedmd stops learning or int8 loses its 50x traffic cut).
bench: $(STAMP)
	$(PY) benchmarks/bench_suite.py $(BENCH_ARGS)

# The edge agent on an emulated arm64 Debian (debootstrap + qemu-user-static, as root; not part
# of `make test`): deploy over a real Mosquitto, agent and infer in the chroot, logits compared
# with x86 onnxruntime. The rootfs and wheels are cached in ARM64_CACHE: ~7 minutes cold (quiet),
# ~2 minutes cached (BENCHMARKS.md). ARM64_ARGS: --rebuild, --skip-delivery, --samples N.
ARM64_CACHE ?= $(HOME)/.cache/fededge/arm64
ARM64_ARGS  ?=
.PHONY: test-arm64
test-arm64: $(STAMP) mosquitto
	$(PY) tests/arm64/run_arm64.py --cache "$(ARM64_CACHE)" $(ARM64_ARGS)

# docs/dashboard.png: the dashboard of a demo-sized simulation, taken by headless Chromium
# halfway through its rounds.
screenshot: $(STAMP) chromium
	$(PY) docs/dashboard_screenshot.py docs/dashboard.png

clean:
	rm -rf runs .pytest_cache dist
