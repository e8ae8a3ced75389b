# virtio-blk benchmark, kvmpy vs QEMU cache=none/writeback (benchmarks/blk_bench.py), in one L1.
# Included by the top-level Makefile; uses mk/nested.mk's NESTED, VPY and NESTED_OPTS.
# The test image, blkbench and the guest initrd are built on the host first (faster than in L1);
# the harness attaches the image as L1's /dev/vda so QEMU's cache=none can use O_DIRECT.
BLK_ROUNDS   ?= 3
BLK_SECONDS  ?= 5

.PHONY: bench-blk bench-vq

bench-blk: venv
	@image=$$($(VPY) benchmarks/blk_bench.py --prepare) || exit 1; \
	$(NESTED) run $(NESTED_OPTS) --disk "$$image" -- \
	  'cd $(CURDIR) && $(abspath $(VPY)) benchmarks/blk_bench.py --rounds $(BLK_ROUNDS) --seq-seconds $(BLK_SECONDS) --rand-seconds $(BLK_SECONDS)'

# Host CPU per virtio-blk request, pure-Python vs C data path (no KVM, no harness).
bench-vq: venv
	$(VPY) benchmarks/vq_bench.py
