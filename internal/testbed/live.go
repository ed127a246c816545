package testbed

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
	"libvirt.org/go/libvirtxml"
)

// restartWait is how long Live waits for libvirtd to answer again.
const restartWait = time.Minute

// Live is a test's own connection to libvirtd that outlives a restart of
// the daemon. `go test ./...` runs the packages' test binaries side by
// side, and a test of one package may restart the test bed's libvirtd
// (StopLibvirtd, StartLibvirtd) while another package's test is checking
// its domains: a plain connection dies with the daemon, and every later
// check on it fails although nothing the test looks at went wrong.
type Live struct {
	t  testing.TB
	mu sync.Mutex
	l  *libvirt.Libvirt
}

// Require connects to libvirtd and returns the test's connection, closed
// when the test ends; it skips (or fails under CI=true) when there is none.
// When the test bed's own libvirtd is not answering, another test may be
// restarting it: that is waited for before the test is given up. A
// hypervisor's own daemon gets one try, as it is not restarted by tests.
func Require(t testing.TB) *Live {
	t.Helper()
	var wait time.Duration
	if ownDaemon() {
		wait = restartWait
	}
	l, err := dial(wait)
	if err != nil {
		Unavailable(t, "no libvirtd: "+err.Error())
	}
	t.Cleanup(func() { _ = l.Disconnect() })
	return &Live{t: t, l: l}
}

// Conn returns a connected client; after the daemon went away it dials
// again, for up to a minute. A client returned earlier may be dead: ask
// again for every use.
func (c *Live) Conn() *libvirt.Libvirt {
	c.t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.l.IsConnected() {
		return c.l
	}
	l, err := dial(restartWait)
	if err != nil {
		c.t.Fatalf("libvirtd did not come back within %s: %v", restartWait, err)
	}
	c.t.Cleanup(func() { _ = l.Disconnect() })
	c.l = l
	return l
}

// dial is the package's one way to connect to libvirtd: it tries once,
// and again until d has passed.
func dial(d time.Duration) (*libvirt.Libvirt, error) {
	deadline := time.Now().Add(d)
	for {
		l := libvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(Socket()), dialers.WithLocalTimeout(5*time.Second)))
		err := l.ConnectToURI(libvirt.QEMUSystem)
		if err == nil {
			return l, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("connect to %s: %w", Socket(), err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// retry runs fn on a connected client, and again on a new one while it
// fails in transport (the daemon went away) rather than with an error
// libvirtd answered, which it returns.
func (c *Live) retry(fn func(l *libvirt.Libvirt) error) error {
	c.t.Helper()
	deadline := time.Now().Add(restartWait)
	for {
		l := c.Conn()
		err := fn(l)
		if err == nil || !transportError(err) || time.Now().After(deadline) {
			return err
		}
		// The client may not have noticed yet that its socket is gone.
		_ = l.Disconnect()
	}
}

// transportError tells a failed connection from an error libvirtd answered.
func transportError(err error) bool {
	var lerr libvirt.Error
	return err != nil && !errors.As(err, &lerr)
}

// Call runs fn on a connected client, again on the next one when
// libvirtd went away under it (another package's test may restart the
// daemon), and fails the test on an error libvirtd answered. fn may run
// twice: write it so that a second run after a first that got through is
// fine (look at the state before changing it).
func (c *Live) Call(what string, fn func(l *libvirt.Libvirt) error) {
	c.t.Helper()
	c.call(what, fn)
}

func (c *Live) call(what string, fn func(l *libvirt.Libvirt) error) {
	c.t.Helper()
	if err := c.retry(fn); err != nil {
		c.t.Fatalf("%s: %v", what, err)
	}
}

// Domain defines a QEMU (TCG) domain with no OS under a unique name: it
// starts in about half a second and ignores ACPI shutdown and reboot. A
// define or start cut off by libvirtd going away is tried again on the
// next connection, and the domain is destroyed and undefined at the end of
// the test whatever happened meanwhile. Guest is one with an OS that
// answers ACPI.
func (c *Live) Domain(purpose string, o DomainOptions) libvirt.Domain {
	c.t.Helper()
	return c.DomainNamed(Name(purpose), o)
}

// DomainNamed is Domain under a name the test chose, which must be one of
// its own (from Name): a test that defines a domain again under the same
// name, say.
func (c *Live) DomainNamed(name string, o DomainOptions) libvirt.Domain {
	c.t.Helper()
	def := domainDef(name)
	if o.Unbootable {
		def.QEMUCommandline = &libvirtxml.DomainQEMUCommandline{
			Args: []libvirtxml.DomainQEMUCommandlineArg{{Value: "-no-such-option-virtbus-test"}}}
	}
	return c.define(def, o)
}

// define defines def (or creates it, transient) and starts it as o asks;
// see Domain.
func (c *Live) define(def libvirtxml.Domain, o DomainOptions) libvirt.Domain {
	c.t.Helper()
	name := def.Name
	doc, err := def.Marshal()
	if err != nil {
		c.t.Fatalf("build domain XML: %v", err)
	}
	var dom libvirt.Domain
	c.call("define test domain "+name, func(l *libvirt.Libvirt) error {
		// A try cut off by a restart may have got through.
		d, err := l.DomainLookupByName(name)
		if err == nil {
			dom = d
			return nil
		}
		if !libvirt.IsNotFound(err) {
			return err
		}
		if o.Transient {
			dom, err = l.DomainCreateXML(doc, 0)
		} else {
			dom, err = l.DomainDefineXML(doc)
		}
		return err
	})
	// Registered before the start, so a failed start leaves nothing behind.
	c.t.Cleanup(func() { c.remove(dom) })
	if o.Running && !o.Transient {
		c.call("start test domain "+name, func(l *libvirt.Libvirt) error {
			st, _, err := l.DomainGetState(dom, 0)
			if err != nil || libvirt.DomainState(st) == libvirt.DomainRunning {
				return err
			}
			return l.DomainCreate(dom)
		})
	}
	return dom
}

// domainDef is the definition Domain makes: QEMU (TCG), no OS, ACPI for
// virtio hot-plug, a virtio-scsi controller.
func domainDef(name string) libvirtxml.Domain {
	return libvirtxml.Domain{
		Type:   "qemu",
		Name:   name,
		Memory: &libvirtxml.DomainMemory{Value: 64, Unit: "MiB"},
		VCPU:   &libvirtxml.DomainVCPU{Value: 1},
		OS: &libvirtxml.DomainOS{
			Type: &libvirtxml.DomainOSType{Arch: "x86_64", Machine: "pc", Type: "hvm"},
		},
		Features: &libvirtxml.DomainFeatureList{ACPI: &libvirtxml.DomainFeature{}},
		Devices: &libvirtxml.DomainDeviceList{
			Controllers: []libvirtxml.DomainController{{Type: "scsi", Model: "virtio-scsi"}},
		},
	}
}

// Remove destroys and undefines dom now, rather than at the end of the
// test.
func (c *Live) Remove(dom libvirt.Domain) {
	c.t.Helper()
	c.remove(dom)
}

// remove destroys and undefines dom, tolerating that it is gone already.
func (c *Live) remove(dom libvirt.Domain) {
	c.t.Helper()
	err := c.retry(func(l *libvirt.Libvirt) error {
		st, _, err := l.DomainGetState(dom, 0)
		if err != nil {
			return err
		}
		if libvirt.DomainState(st) != libvirt.DomainShutoff {
			if err := l.DomainDestroy(dom); transportError(err) {
				return err
			}
		}
		return l.DomainUndefine(dom)
	})
	if err != nil && !libvirt.IsNotFound(err) {
		c.t.Errorf("clean up %s: %v", dom.Name, err)
	}
}

// State is dom's state as libvirt reports it, asked again across a
// restart.
func (c *Live) State(dom libvirt.Domain) libvirt.DomainState {
	c.t.Helper()
	var st int32
	c.call("state of "+dom.Name, func(l *libvirt.Libvirt) (err error) {
		st, _, err = l.DomainGetState(dom, 0)
		return err
	})
	return libvirt.DomainState(st)
}

// Disks maps target to source file of dom's disks: the live definition
// (inactive=false) or the config; read again across a restart.
func (c *Live) Disks(dom libvirt.Domain, inactive bool) map[string]string {
	c.t.Helper()
	var flags libvirt.DomainXMLFlags
	if inactive {
		flags = libvirt.DomainXMLInactive
	}
	var doc string
	c.call("XML of "+dom.Name, func(l *libvirt.Libvirt) (err error) {
		doc, err = l.DomainGetXMLDesc(dom, flags)
		return err
	})
	out, err := disksOf(doc)
	if err != nil {
		c.t.Fatalf("parse XML of %s: %v", dom.Name, err)
	}
	return out
}
