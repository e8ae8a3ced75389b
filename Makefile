# kvmpy — top-level entry points. `make run` boots a stock Linux guest; `make test` runs all tiers.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
PYTEST  := $(VPY) -m pytest
APT_PKGS := qemu-system-x86 busybox-static e2fsprogs iproute2 cpio gcc make acpica-tools

.PHONY: all deps venv guests test test-tier0 test-tier1 test-tier2 run bench clean

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

test-tier0: venv
	$(PYTEST) -q tests/tier0

test-tier1: venv guests
	$(PYTEST) -q tests/tier1

include mk/nested.mk
-include mk/bench.mk

# Kernel and guest images first: tier 2 needs them, and a tier-0 check parses the real bzImage.
test: venv guests
	$(VPY) -m kvmpy.nested images >/dev/null
	$(PYTEST) -q -rs tests/tier0 tests/tier1
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
