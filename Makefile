# shoal: the two commands of the README, and helpers.
CARGO ?= cargo

.PHONY: run test lint unit-and-integration examples test-kubernetes

## run: the main job on the local backend (installs redis-server if missing): the seed's Process
## example (hello bob), then the seeds' Pool map jobs (map, starmap -> [2, 4, 6, 8], map_async)
run:
	@scripts/ensure-redis.sh
	$(CARGO) build --release -p shoal-examples --example process --example pool
	target/release/examples/process
	target/release/examples/pool

## test: the whole suite: formatting, clippy, rustdoc's link checks, unit and integration tests,
## every example
test: lint unit-and-integration examples

# The whole suite builds each crate once; incremental compilation's caches would only fill the
# disk (gigabytes for the test binaries), so it is off for it unless asked for.
test: export CARGO_INCREMENTAL ?= 0

lint:
	@scripts/ensure-redis.sh
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps --all-features

unit-and-integration:
	@scripts/ensure-redis.sh
	@scripts/ensure-netns-tools.sh
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  $(CARGO) nextest run --workspace --all-features && \
	  $(CARGO) test --doc --workspace --all-features; \
	else \
	  echo "cargo-nextest not found: running cargo test one test at a time"; \
	  $(CARGO) test --workspace --all-features -- --test-threads=1; \
	fi

examples:
	scripts/run-examples.sh

## test-kubernetes: the Kubernetes backend's tests against a real cluster (not part of `make test`,
## whose emulator runs the same scenarios). Needs KUBECONFIG, SHOAL_TEST_IMAGE (built by
## scripts/build-kubernetes-test-image.sh) and SHOAL_TEST_REDIS_URL; skips, saying so, without
## them. See scripts/test-kubernetes.sh for the optional variables.
test-kubernetes:
	@scripts/test-kubernetes.sh
