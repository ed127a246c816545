package testdriver

import (
	"encoding/xml"
	"fmt"
	"os"
)

// hostNode is a test driver's node file: its domains, as libvirt's test
// driver reads them at connect time.
type hostNode struct {
	XMLName xml.Name     `xml:"node"`
	Domains []hostDomain `xml:"domain"`
}

type hostDomain struct {
	Type      string `xml:"type,attr"`
	Namespace string `xml:"xmlns:test,attr"`
	Name      string `xml:"name"`
	MemoryKiB int    `xml:"memory"`
	OSType    string `xml:"os>type"`
	// RunState is a virDomainState: 5 is shut off (the driver would start
	// the file's domains running otherwise).
	RunState int `xml:"test:runstate"`
}

// testNamespace is where the test driver's own domain elements live.
const testNamespace = "http://libvirt.org/schemas/domain/test/1.0"

// HostURI writes to path a test driver node file holding one shut-off
// domain per name, and returns the URI that opens it (test:///path).
// Unlike test:///default, whose state every connection shares, each
// connection to such a URI gets a driver of its own, seeded from the file:
// a worker on it sees its own domains and no one else's, as a worker on a
// hypervisor host does, so many simulated hosts can share one libvirtd.
// The driver's state lives as long as the connection: a worker that
// reconnects finds the file's domains again, shut off.
func HostURI(path string, names []string) (string, error) {
	n := hostNode{}
	for _, name := range names {
		n.Domains = append(n.Domains, hostDomain{Type: "test", Namespace: testNamespace, Name: name, MemoryKiB: 65536, OSType: "hvm", RunState: 5})
	}
	doc, err := xml.MarshalIndent(n, "", "  ")
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(path, doc, 0o644); err != nil {
		return "", fmt.Errorf("write test driver node file: %w", err)
	}
	return "test://" + path, nil
}
