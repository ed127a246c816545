#!/usr/bin/env bash
# Runs every `nats` example of README.md as written, with the stock nats
# CLI, against real workers (make lint-readme): cmd/worker's
# TestREADMENatsExamples (build tag readme) pulls each line that starts
# with `nats ` out of README.md's code blocks, runs it through bash, and
# checks its exit status, its output and the completion it should bring.
# So the README and the check cannot drift apart. Needs libvirtd, for a
# test-driver domain web-1 (the Makefile runs scripts/libvirt-up.sh first).
#
# The nats CLI is built once from the Go module proxy into the cache that
# scripts/lint-deploy.sh uses (VIRTBUS_TOOLS, default
# ~/.cache/virtbus-lint-deploy); the first run takes a minute or two,
# later ones a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
GO=${GO:-go}
tools=${VIRTBUS_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/virtbus-lint-deploy}

# The version the README's examples are checked with; its output is what
# the test's patterns match.
natscli_version=v0.5.0
nats=$tools/natscli-$natscli_version/nats
if [[ ! -x $nats ]]; then
	echo "lint-readme: building the nats CLI $natscli_version (Go module proxy)"
	GOBIN="$tools/natscli-$natscli_version" GOFLAGS= \
		$GO install "github.com/nats-io/natscli/nats@$natscli_version"
fi

VIRTBUS_NATS_CLI=$nats $GO test -tags readme -count=1 -timeout 5m \
	-run '^TestREADMENatsExamples$' -v ./cmd/worker
