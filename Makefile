bench:
	scripts/bench

test:
	scripts/test

.PHONY: bench test
