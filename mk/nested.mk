# Nested hardware-KVM harness (kvmpy/nested): L1 = Debian 6.1 under QEMU TCG with SVM/NPT,
# chrooted into this host's root. Included by the top-level Makefile (PY, VPY, PYTEST, venv).
NESTED      := $(VPY) -m kvmpy.nested
NESTED_OPTS ?=
TIER2_ARGS  ?=

.PHONY: test-tier2 nested-run nested-shell nested-images bench-boot

# Tier 2 alone: in L1 when the host KVM is PVM, directly with vmx/svm, else fails with a reason.
test-tier2: venv
	$(NESTED) tier2 -- $(TIER2_ARGS)

# make nested-run CMD='uname -a; ls -l /dev/kvm'   (exit status is the command's; write $$ for $)
NESTED_CMD_QUOTED = '$(subst ','\'',$(CMD))'
nested-run: venv
	@test -n $(NESTED_CMD_QUOTED) || { echo "usage: make nested-run CMD='shell command'"; exit 2; }
	$(NESTED) run $(NESTED_OPTS) -- $(NESTED_CMD_QUOTED)

# Interactive bash in L1 (leave with `exit`, or Ctrl-A x to kill QEMU).
nested-shell: venv
	$(NESTED) shell $(NESTED_OPTS)

# Fetch/unpack the kernel package and (re)build the L1 and default guest images.
nested-images: venv
	$(NESTED) images

# Boot time, kvmpy vs QEMU (pc, microvm), medians of ROUNDS runs, in one L1.
ROUNDS ?= 3
bench-boot: venv
	$(NESTED) run $(NESTED_OPTS) -- 'cd $(CURDIR) && $(abspath $(VPY)) benchmarks/boot_time.py --rounds $(ROUNDS)'
