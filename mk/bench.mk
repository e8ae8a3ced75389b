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

# Snapshot save/restore, kvmpy vs QEMU (exec:cat), 512 MiB and 2 GiB guests, in one L1.
SNAP_SIZES ?= 512M,2G
.PHONY: bench-snapshot
bench-snapshot: venv
	$(NESTED) run $(NESTED_OPTS) -- 'cd $(CURDIR) && $(abspath $(VPY)) benchmarks/snapshot_bench.py --sizes $(SNAP_SIZES)'

# Live migration, kvmpy vs QEMU, between two network namespaces in one L1 (benchmarks/migrate_bench.py):
# idle, 4 MiB and 32 MiB rewritten continuously.
MIG_WORKLOADS ?= idle,4,32,block
.PHONY: bench-migrate
bench-migrate: venv
	$(NESTED) run $(NESTED_OPTS) -- 'cd $(CURDIR) && $(abspath $(VPY)) benchmarks/migrate_bench.py --workloads $(MIG_WORKLOADS)'

# virtio-net, kvmpy vs QEMU, vhost-net on and off (benchmarks/net_bench.py), in one L1: iperf3
# both ways and ping over a link-local TAP. The guest initrd (with iperf3) is built on the host first.
NET_ROUNDS  ?= 3
NET_SECONDS ?= 10# iperf3's own default: 5 s runs were mostly the window's growth
NET_ARGS    ?=# more net_bench.py flags, e.g. NET_ARGS='--vmms kvmpy-vhost --kvmpy-args=--stats'
.PHONY: bench-net
bench-net: venv
	@$(VPY) benchmarks/net_bench.py --prepare >/dev/null || exit 1; \
	$(NESTED) run $(NESTED_OPTS) -- 'cd $(CURDIR) && $(abspath $(VPY)) benchmarks/net_bench.py --rounds $(NET_ROUNDS) --seconds $(NET_SECONDS) $(NET_ARGS)'

# Dirty tracking for live migration, KVM's dirty log against its dirty ring (benchmarks/dirty_track_bench.py),
# in one L1: the tracked guest's write rate and the harvest's cost, per mechanism.
DIRTY_ARGS ?= --seconds 5 --rounds 3 --period 1000 --ring-entries 4096
.PHONY: bench-dirty
bench-dirty: venv guests
	$(NESTED) run $(NESTED_OPTS) -- 'cd $(CURDIR) && $(abspath $(VPY)) benchmarks/dirty_track_bench.py $(DIRTY_ARGS)'
