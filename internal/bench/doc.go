// Package bench is virtbus's benchmark harness (make bench): a load
// generator that drives real worker processes over a real NATS server and
// libvirtd, and beside every virtbus row a baseline of the same work done
// by hand with go-libvirt, measured in the same run on the same domains,
// so that each row reads as a ratio to raw libvirt.
//
// The test itself is behind the build tag `bench`; the pieces it is made
// of live here untagged, so `go vet ./...` keeps them compiling.
package bench
