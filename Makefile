# kvmpy — top-level entry points. `make run` boots a stock Linux guest; `make test` runs all tiers.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
PYTEST  := $(VPY) -m pytest
APT_PKGS := qemu-system-x86 busybox-static e2fsprogs iproute2 cpio gcc make acpica-tools iperf3

.PHONY: all deps venv guests test test-tier0 test-tier1 test-tier2 run bench clean fuzz fuzz-ci fuzz-deps

all: venv guests

# System packages: installed only when missing (root on CI; sudo otherwise).
deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  SUDO=$$( [ $$(id -u) -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; fi

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

venv: $(VPY) deps
	$(VPY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat  # a path .pth: no import-hook finder at start-up
	$(VPY) -m compileall -q kvmpy   # L1 sees the tree read-only: ship the bytecode

guests:
	$(MAKE) -C tests/guest

# Every test run lists its skips (-rs) and fails on a skip that is not environmental
# (tests/skipcheck.py). HYPOTHESIS_PROFILE=dev|ci|long (tests/conftest.py; CI=true means ci).
PYTEST_FLAGS ?= -rs --skip-allowlist
export HYPOTHESIS_PROFILE

test-tier0: venv
	$(PYTEST) -q $(PYTEST_FLAGS) tests/tier0

test-tier1: venv guests
	$(PYTEST) -q $(PYTEST_FLAGS) tests/tier1

include mk/nested.mk
-include mk/bench.mk

# Coverage-guided fuzzing (fuzz/, atheris): `make fuzz FUZZ_SECONDS=600 [FUZZ_TARGETS=virtqueue,qmp]
# [FUZZ_RUNS=N] [FUZZ_JOBS=J] [FUZZ_BUDGET=S]` runs each target that long (default 60 s; with
# FUZZ_RUNS alone, until N inputs), J at a time (default: CPU count), slowest first, within S
# seconds for the whole run, and prints iterations, rate, corpus and findings per target (corpora
# and findings in build/fuzz; fuzz/README.md). fuzz-ci is the short fixed-seed pass `make test`
# starts with. `make fuzz FUZZ_RUNS=1000000` is issue 13's goal.
FUZZ_SECONDS ?=
FUZZ_TARGETS ?=
FUZZ_RUNS ?=
FUZZ_JOBS ?=
FUZZ_BUDGET ?=
# setup.py's `fuzz` extra, installed on its own (no rebuild of kvmpy's C module)
FUZZ_REQ := atheris>=2.3

fuzz-deps: venv
	@$(VPY) -c "import atheris" 2>/dev/null || $(VPY) -m pip install -q '$(FUZZ_REQ)'

fuzz: fuzz-deps
	$(VPY) fuzz/run.py --targets '$(FUZZ_TARGETS)' $(if $(FUZZ_SECONDS),--seconds $(FUZZ_SECONDS)) \
		$(if $(FUZZ_RUNS),--runs $(FUZZ_RUNS)) $(if $(FUZZ_JOBS),--jobs $(FUZZ_JOBS)) \
		$(if $(FUZZ_BUDGET),--budget $(FUZZ_BUDGET))

fuzz-ci: fuzz-deps
	$(VPY) fuzz/run.py --ci

# Kernel and guest images first: tier 2 needs them, and a tier-0 check parses the real bzImage.
test: venv guests
	$(MAKE) fuzz-ci
	$(VPY) -m kvmpy.nested images >/dev/null
	$(PYTEST) -q $(PYTEST_FLAGS) tests/tier0 tests/tier1
	$(MAKE) test-tier2

# kvmpy's main job: the stock Debian guest booted by kvmpy to an interactive shell
# (inside the nested harness when this host's KVM is PVM).
run: venv
	$(VPY) -m kvmpy.nested guest-shell

bench: venv guests
	$(VPY) -m kvmpy bench exits --count 20000

clean:
	rm -rf build *.egg-info kvmpy/ioctl/_kvm*.so kvmpy/ioctl/_kvm.c
	$(MAKE) -C tests/guest clean
