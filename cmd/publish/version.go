package main

import (
	"fmt"
	"io"

	"github.com/virtbus/virtbus/internal/buildinfo"
)

// printVersion prints the line `worker -version` prints, for publish. run
// calls it before parsing flags when -version is the only argument: it
// needs no NATS settings and no subcommand.
func printVersion(stdout io.Writer) error {
	_, err := fmt.Fprintln(stdout, buildinfo.Read().Line("publish"))
	return err
}
