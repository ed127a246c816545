#!/usr/bin/env bash
# make bench: the benchmarks, each beside a baseline measured in the same run.
#
#   1. internal/bench (build tag bench): real worker processes on an embedded
#      NATS server and the real libvirtd, rows of load (one at a time, 256 in
#      flight at concurrency 1 and 8, QEMU pause/resume, backlogs of 10,000 and
#      100,000 drained), each virtbus row beside go-libvirt doing the same work
#      by hand. VIRTBUS_BENCH_SCALE=0.1 for a quick run.
#   2. Go micro-benchmarks with -benchmem: the FIFO, decoding a command,
#      making and encoding a completion.
#   3. cmd/worker's BenchmarkStatus: one status command direct, through the
#      executor and through the bus, COUNT times each (default 3), medians.
#
# The tables are printed together at the end. Benchmarks, not tests: a missed
# target does not fail; a lost, duplicated or failed command does.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${COUNT:-3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS

command="scripts/bench.sh"
if [[ -n ${MAKELEVEL:-} ]]; then
	command="make bench"
fi

echo "== load harness (internal/bench)" >&2
VIRTBUS_BENCH_REPORT="$tmp/harness.md" VIRTBUS_BENCH_COMMAND="$command" \
	go test -tags bench -run TestBench -count=1 -v -timeout 30m ./internal/bench >&2

echo "== micro-benchmarks" >&2
go test -run '^$' -bench . -benchmem ./internal/queue ./internal/bus | tee "$tmp/micro.txt" >&2

echo "== BenchmarkStatus (cmd/worker), count $COUNT" >&2
go test -run '^$' -bench 'BenchmarkStatus' -benchmem -benchtime 1s -count "$COUNT" ./cmd/worker/ | tee "$tmp/status.txt" >&2

echo
echo "## Load, beside go-libvirt"
echo
cat "$tmp/harness.md"

echo
echo "## Micro-benchmarks"
echo
awk '
/^pkg: / { pkg = $2; sub(/.*\/internal\//, "internal/", pkg) }
/^Benchmark/ {
	name = $1; sub(/-[0-9]+$/, "", name)
	if (!header++) { print "| package | benchmark | ns/op | B/op | allocs/op |"; print "|---|---|---|---|---|" }
	printf "| %s | %s | %s | %s | %s |\n", pkg, name, $3, $5, $7
}' "$tmp/micro.txt"

echo
echo "## status, three ways (median of $COUNT)"
echo
awk '
/^BenchmarkStatus\// {
	split($1, p, "/"); v = p[2]; sub(/-[0-9]+$/, "", v)
	n[v]++; ns[v, n[v]] = $3; bytes[v] = $5; allocs[v] = $7
}
function median(v,   i, j, t, a, k) {
	k = n[v]; for (i = 1; i <= k; i++) a[i] = ns[v, i]
	for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
	return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
}
END {
	if (!n["direct"]) { print "(BenchmarkStatus did not run: see its output above)"; exit }
	base = median("direct")
	print "| status via | median µs | vs direct | cmd/s | B/op | allocs/op |"
	print "|---|---|---|---|---|---|"
	split("direct executor bus", order, " ")
	for (i = 1; i <= 3; i++) {
		v = order[i]; if (!n[v]) continue
		m = median(v)
		printf "| %s | %.0f | %.2fx | %.0f | %s | %s |\n", v, m / 1000, m / base, 1e9 / m, bytes[v], allocs[v]
	}
}' "$tmp/status.txt"

echo
echo "make bench took $((SECONDS - start)) s"
