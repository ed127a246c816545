//go:build bench

package bench

import (
	"bytes"
	"fmt"
	"os"
	"testing"
)

// TestBench measures every row and prints one table (make bench). Sizes
// scale with VIRTBUS_BENCH_SCALE; VIRTBUS_BENCH_REPORT names a file that
// gets the table too; VIRTBUS_BENCH_COMMAND is the command the header
// names. A missed target does not fail the test: the machine is shared
// and noisy. A lost, duplicated or failed command does.
func TestBench(t *testing.T) {
	s, err := LoadSizes(os.Getenv)
	if err != nil {
		t.Fatal(err)
	}
	command := os.Getenv("VIRTBUS_BENCH_COMMAND")
	if command == "" {
		command = "go test -tags bench -run TestBench -count=1 -v ./internal/bench"
	}
	if s.Scale != 1 {
		command = fmt.Sprintf("VIRTBUS_BENCH_SCALE=%g %s", s.Scale, command)
	}
	b := New(t, s)
	rows, err := b.Run()
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	Report(&out, b.Header(command), rows, b.Notes(rows))
	fmt.Print("\n", out.String())
	if path := os.Getenv("VIRTBUS_BENCH_REPORT"); path != "" {
		if err := os.WriteFile(path, out.Bytes(), 0o644); err != nil {
			t.Error(err)
		}
	}
}
