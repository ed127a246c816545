#!/usr/bin/env bash
# make bench: one status command measured three ways in the same run on the
# same domain (direct go-libvirt calls, the vm executor, the whole bus round
# trip), COUNT times each, and a table of medians with the ratio to direct.
# Benchmarks, not tests: this machine is shared, so read the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${COUNT:-5}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
go test -run '^$' -bench 'BenchmarkStatus' -benchmem -benchtime 2s -count "$COUNT" ./cmd/worker/ | tee "$out" >&2
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
	base = median("direct")
	printf "\n%-10s %12s %10s %10s %12s %8s\n", "status via", "median µs", "vs direct", "cmd/s", "B/op", "allocs"
	split("direct executor bus", order, " ")
	for (i = 1; i <= 3; i++) {
		v = order[i]; if (!n[v]) continue
		m = median(v)
		printf "%-10s %12.1f %9.2fx %10.0f %12s %8s\n", v, m / 1000, m / base, 1e9 / m, bytes[v], allocs[v]
	}
}' "$out"
