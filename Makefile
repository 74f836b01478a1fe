# Thin wrappers; the scripts are the source of truth (CI runs .ci/run -> scripts/check).
.PHONY: check demo bench
check:
	scripts/check
demo:
	scripts/demo
bench:
	scripts/bench
