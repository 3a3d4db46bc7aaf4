# smsdrop — the two commands: `make run` and `make test`. `make bench` measures.
CARGO   ?= cargo
DEMO    := etc/smsdrop.demo.toml
BIN     := target/release/smsdrop

.PHONY: run test test-deps lint bench bench-compare build deb clean-demo torture fuzz

build:
	$(CARGO) build --release --locked

## Starts the appliance on the demo configuration (./var), creating its key and folders first.
run: build
	@mkdir -p var/drop/demo/inbox var/drop/demo/outbox
	@test -f var/master.key || $(BIN) --config $(DEMO) keygen
	@echo
	@echo "  smsdrop demo: drop a CSV file into $(CURDIR)/var/drop/demo/inbox"
	@printf '%s\n' "  e.g.  printf 'phone;message\\n06 12 34 56 78;Bonjour\\n' > /tmp/june.csv && mv /tmp/june.csv var/drop/demo/inbox/"
	@echo "  replies appear in $(CURDIR)/var/drop/demo/outbox, sent messages in var/sink.jsonl"
	@echo "  status: $(BIN) --config $(DEMO) status      stop: Ctrl-C"
	@echo
	exec $(BIN) --config $(DEMO) serve

## The Debian package: target/debian/smsdrop_<version>_<arch>.deb (packaging/build-deb.sh).
deb: build
	@sh packaging/build-deb.sh

## What the tests need beyond the Rust toolchain (see tests/peers/README.md).
test-deps:
	@bash tests/peers/install.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

## Installs what the tests need, then runs every test once (nextest builds the release binary
## the integration tests drive).
test: test-deps lint
	$(CARGO) nextest run --release --locked --no-fail-fast

## The torture suite at length (tests/torture.rs; `make test` runs its short form): SIGKILLs
## mid-ingest, mid-dispatch and among receipts, a disk that fills at random moments, a hostile
## SMSC. TORTURE_ROUNDS sets the rounds, TORTURE_SEED replays a run.
TORTURE_ROUNDS ?= 10
torture: test-deps
	TORTURE_ROUNDS=$(TORTURE_ROUNDS) $(CARGO) nextest run --release --locked --no-fail-fast --test torture --no-capture

## Every fuzz target (fuzz/, cargo-fuzz on the nightly toolchain) for FUZZ_SECONDS each.
FUZZ_SECONDS ?= 60
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) bash fuzz/run.sh

## Benchmarks (release build): ingest beside a bare CSV read of the same file; SFTP uploads beside
## OpenSSH's own sshd.
bench: test-deps
	$(CARGO) bench --locked --bench ingest
	$(CARGO) bench --locked --bench sftp
	$(CARGO) bench --locked --bench dispatch
	$(CARGO) bench --locked --bench sweep

## An older binary against this one, in turns: make bench-compare OLD=/path/to/old/smsdrop
bench-compare: build
	OLD=$(OLD) sh benches/compare.sh

clean-demo:
	rm -rf var
