package chaos

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// libvirtdPIDFile is where the test bed's libvirtd (scripts/libvirt-up.sh,
// testbed.StartLibvirtd) writes its pid.
const libvirtdPIDFile = "/run/libvirtd.pid"

// libvirtdPID names the daemon a fault hit, for the table.
func libvirtdPID() (int, error) {
	b, err := os.ReadFile(libvirtdPIDFile)
	if err != nil {
		return 0, fmt.Errorf("read libvirtd pid: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, fmt.Errorf("parse libvirtd pid %q: %w", b, err)
	}
	return pid, nil
}
