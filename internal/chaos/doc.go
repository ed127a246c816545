// Package chaos is virtbus's chaos harness. It drives two real worker
// processes (one on QEMU domains, one on libvirt's test driver) with
// thousands of commands from a few producers while it kills workers,
// restarts the NATS server and libvirtd and freezes libvirtd, then checks
// the delivery promises of the README: one completion per command, each
// VM's commands in publish order, libvirt's final state, an empty stream.
//
// The test itself is behind the build tag `chaos` (`make chaos`); the
// pieces it is made of live here untagged, so `go vet ./...` keeps them
// compiling.
package chaos
