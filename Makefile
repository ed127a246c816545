# virtbus: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
export PATH := $(PATH):/usr/local/go/bin
GO ?= go
BIN := bin

.PHONY: all build test unit-test fuzz demo vet fmt-check lint-deploy lint-readme libvirt-up libvirt-down bench clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -o $(BIN)/ ./cmd/worker ./cmd/publish

# Brings up libvirtd (idempotent; about a second when it is already up),
# then vets and runs every test against it with the race detector.
# CI=true turns any skipped integration test into a failure.
# Then fuzzes each target for FUZZTIME (make test FUZZTIME=2m for longer).
test: unit-test fuzz

unit-test: libvirt-up fmt-check vet
	CGO_ENABLED=1 $(GO) test -race -count=1 -timeout 20m ./...

# Fuzz targets: package and name. Their seed corpora live in each package's
# testdata/fuzz/<name>; the plain test run above replays them every time.
FUZZTIME ?= 20s
FUZZ_TARGETS := ./internal/bus:FuzzDecode ./internal/vm:FuzzParams

fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; name=$${t##*:}; \
		echo "fuzz $$name in $$pkg for $(FUZZTIME)"; \
		$(GO) test -run='^$$' -fuzz="^$$name\$$" -fuzztime=$(FUZZTIME) $$pkg; \
	done

vet:
	$(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l cmd internal); if [[ -n $$out ]]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

# Runs the whole job on this machine: libvirtd, a demo domain, the worker on
# an embedded NATS, every action through `publish`, then cleans up.
demo: libvirt-up
	scripts/demo.sh

# Benchmarks (scripts/bench.sh): the load harness (internal/bench, build
# tag bench), each virtbus row beside go-libvirt doing the same work in the
# same run, then the micro-benchmarks; prints the tables at the end.
# VIRTBUS_BENCH_SCALE=0.1 for a quick run; COUNT=n runs of BenchmarkStatus.
bench: libvirt-up
	scripts/bench.sh

# Chaos run (internal/chaos, build tag chaos): two real workers, QEMU and
# test-driver domains, thousands of commands while workers are SIGKILLed,
# NATS and libvirtd restart and libvirtd freezes; then checks and a table.
# CHAOS=short for CI (a few minutes); SEED=n repeats a run's plan and faults.
CHAOS ?= full
SEED ?=
.PHONY: chaos
chaos: libvirt-up
	VIRTBUS_CHAOS=$(CHAOS) VIRTBUS_CHAOS_SEED=$(SEED) $(GO) test -tags chaos -count=1 -v -timeout 60m ./internal/chaos -run TestChaos

# Three hosts' workers on a three-node NATS cluster (embedded servers on
# loopback), replicated stream and buckets, one node lost with its store and
# the node a worker is on restarted mid-run; checks every command completes
# once, in order per VM (cmd/worker TestCluster, about half a minute). Part
# of `make test`; this runs it alone, RUNS times (default 1).
RUNS ?= 1
.PHONY: cluster
cluster: libvirt-up
	CGO_ENABLED=1 $(GO) test -race -count=$(RUNS) -v -timeout 30m -run '^TestCluster$$' ./cmd/worker

# Fleet simulation (internal/fleet TestFleet, build tag fleet): 50 worker
# processes, each a host with 3 test-driver domains only it sees, on a
# three-node NATS cluster with 3 replicas; a mixed load from 10 producers,
# the command stream leader's node restarted halfway. Prints throughput and
# p50/p99 per host and overall; fails on a lost, duplicated, reordered or
# misrouted command.
# VIRTBUS_FLEET_HOSTS, _VMS, _COMMANDS, _PRODUCERS, _PACE, _DOWN resize it.
.PHONY: fleet
fleet: libvirt-up
	CGO_ENABLED=0 $(GO) test -tags fleet -count=1 -v -timeout 30m -run '^TestFleet$$' ./internal/fleet

# Checks deploy/ with the real tools: promtool (alert rules, their unit
# tests in deploy/alerts_test.yml, the scrape config), nats-server -t,
# systemd-analyze verify, and docker compose config where it exists. The
# first run fetches promtool and nats-server into ~/.cache (under a minute).
lint-deploy:
	scripts/lint-deploy.sh

# Runs every `nats` example of README.md verbatim with the stock nats CLI
# against real workers and a test-driver domain web-1, and checks each
# one's outcome (scripts/lint-readme.sh). The first run builds the nats CLI
# into the same cache (a minute or two); later runs take seconds.
lint-readme: libvirt-up
	scripts/lint-readme.sh

libvirt-up:
	scripts/libvirt-up.sh

libvirt-down:
	scripts/libvirt-down.sh

clean:
	rm -rf $(BIN)
