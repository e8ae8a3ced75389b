# Nested hardware-KVM harness targets (owned by kvmpy/nested). Placeholder until the harness lands.
.PHONY: test-tier2 nested-run nested-shell
test-tier2: venv
	$(PYTEST) -q tests/tier2
