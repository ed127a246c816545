// Package testdriver holds libvirt's test driver (test:///default, served
// by the same libvirtd as QEMU) open for the whole of a harness run and
// defines shut-off domains in it: domains that start and stop in a
// fraction of a millisecond, for load that real QEMU domains could not
// take. The chaos and bench harnesses use it.
package testdriver

import (
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
	"libvirt.org/go/libvirtxml"
)

// URI is libvirt's test driver, served by the same libvirtd.
const URI = "test:///default"

// Driver holds a connection to the test driver for the whole run.
// libvirtd keeps the driver's state (the domains defined in it) only while
// some connection to it is open: a worker's connection dies with every
// SIGKILL or restart, and without this one the next worker would find a
// driver that forgot the harness's domains. A libvirtd restart wipes the
// state anyway: the holder sees its connection drop, connects again and
// defines the domains again, shut off. Each such reset is kept.
type Driver struct {
	socket string
	stop   chan struct{}
	done   chan struct{}

	mu     sync.Mutex
	l      *libvirt.Libvirt
	names  []string
	resets []Reset
	errs   []string
}

// Reset is one loss of the holder's connection.
type Reset struct {
	Lost      time.Time // the connection dropped
	Recreated time.Time // connected again and the domains defined again
	Missing   int       // domains the driver had forgotten
}

// Dial opens a connection of its own to the test driver through the
// libvirtd listening on socket.
func Dial(socket string) (*libvirt.Libvirt, error) {
	l := libvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(socket), dialers.WithLocalTimeout(5*time.Second)))
	if err := l.ConnectToURI(URI); err != nil {
		return nil, fmt.Errorf("connect %s via %s: %w", URI, socket, err)
	}
	return l, nil
}

// Open connects the holder; Close lets go of it.
func Open(socket string) (*Driver, error) {
	l, err := Dial(socket)
	if err != nil {
		return nil, err
	}
	d := &Driver{socket: socket, l: l, stop: make(chan struct{}), done: make(chan struct{})}
	go d.watch()
	return d, nil
}

func domainXML(name string) (string, error) {
	def := libvirtxml.Domain{
		Type:   "test",
		Name:   name,
		Memory: &libvirtxml.DomainMemory{Value: 64, Unit: "MiB"},
		OS:     &libvirtxml.DomainOS{Type: &libvirtxml.DomainOSType{Type: "hvm"}},
	}
	return def.Marshal()
}

// Define makes a shut-off domain named name in the test driver. Close
// removes it again.
func (d *Driver) Define(name string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := defineOn(d.l, name); err != nil {
		return err
	}
	d.names = append(d.names, name)
	return nil
}

func defineOn(l *libvirt.Libvirt, name string) error {
	doc, err := domainXML(name)
	if err != nil {
		return err
	}
	if _, err := l.DomainDefineXML(doc); err != nil {
		return fmt.Errorf("define %s in %s: %w", name, URI, err)
	}
	return nil
}

// watch reconnects after every loss of the connection and defines again
// the domains the driver forgot, until Close.
func (d *Driver) watch() {
	defer close(d.done)
	for {
		d.mu.Lock()
		gone := d.l.Disconnected()
		d.mu.Unlock()
		select {
		case <-d.stop:
			return
		case <-gone:
		}
		r := Reset{Lost: time.Now()}
		l := d.redial()
		if l == nil {
			return
		}
		d.mu.Lock()
		d.l = l
		r.Missing = d.recreate(l)
		r.Recreated = time.Now()
		d.resets = append(d.resets, r)
		d.mu.Unlock()
	}
}

// redial connects again, trying every 20 ms; nil once Close was called.
func (d *Driver) redial() *libvirt.Libvirt {
	for {
		if l, err := Dial(d.socket); err == nil {
			return l
		}
		select {
		case <-d.stop:
			return nil
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// recreate defines again every domain l does not know; d.mu is held.
func (d *Driver) recreate(l *libvirt.Libvirt) int {
	missing := 0
	for _, name := range d.names {
		if _, err := l.DomainLookupByName(name); err == nil {
			continue
		} else if !libvirt.IsNotFound(err) {
			d.errs = append(d.errs, fmt.Sprintf("look up %s after a reconnect: %v", name, err))
			continue
		}
		missing++
		if err := defineOn(l, name); err != nil {
			d.errs = append(d.errs, err.Error())
		}
	}
	return missing
}

// State is the domain's state as the test driver reports it.
func (d *Driver) State(name string) (libvirt.DomainState, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	dom, err := d.l.DomainLookupByName(name)
	if err != nil {
		return 0, fmt.Errorf("look up %s: %w", name, err)
	}
	st, _, err := d.l.DomainGetState(dom, 0)
	return libvirt.DomainState(st), err
}

// History is the resets so far and the errors met re-creating domains.
func (d *Driver) History() ([]Reset, []string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.resets), slices.Clone(d.errs)
}

// Close removes the domains Define made and lets go of the driver.
func (d *Driver) Close() error {
	close(d.stop)
	<-d.done
	d.mu.Lock()
	defer d.mu.Unlock()
	var errs []error
	for _, name := range d.names {
		dom, err := d.l.DomainLookupByName(name)
		if err != nil {
			continue
		}
		if st, _, err := d.l.DomainGetState(dom, 0); err == nil && libvirt.DomainState(st) != libvirt.DomainShutoff {
			_ = d.l.DomainDestroy(dom)
		}
		if err := d.l.DomainUndefine(dom); err != nil {
			errs = append(errs, fmt.Errorf("undefine %s: %w", name, err))
		}
	}
	_ = d.l.Disconnect()
	if len(errs) > 0 {
		return fmt.Errorf("clean up the test driver: %v", errs)
	}
	return nil
}
