package vm

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// A soft reboot is two steps, shutdown and start, and a worker that dies (or
// loses libvirtd) between them leaves the domain shut off, where a reboot
// delivered again would refuse it. So the reboot records its intent in the
// domain itself before the shutdown: libvirt metadata in the live definition
// and in the config, which outlives the shutdown. A reboot that finds a shut
// off domain with the intent finishes the job. Start, stop and every reboot
// that ends remove it: a stale intent must never start a domain an operator
// stopped.
const (
	intentURI = "https://virtbus.dev/xmlns/intent"
	intentKey = "virtbus" // the namespace prefix in the domain XML
)

// rebootIntent is the metadata element: <reboot since="…"/>.
type rebootIntent struct {
	XMLName xml.Name  `xml:"reboot"`
	Since   time.Time `xml:"since,attr"`
}

// intentDoc reads the intent element of dom's current definition (the live
// one while it is active, else the config); found is false when it has none.
func (e *Executor) intentDoc(ctx context.Context, dom libvirt.Domain) (doc string, found bool, err error) {
	err = e.conn.call(ctx, "read reboot intent of "+dom.Name, func(l *libvirt.Libvirt) error {
		var err error
		doc, err = l.DomainGetMetadata(dom, int32(libvirt.DomainMetadataElement), libvirt.OptString{intentURI}, libvirt.DomainAffectCurrent)
		var lerr libvirt.Error
		found = err == nil
		if errors.As(err, &lerr) && libvirt.ErrorNumber(lerr.Code) == libvirt.ErrNoDomainMetadata {
			return nil
		}
		return err
	})
	return doc, found, err
}

// readIntent returns the reboot intent dom carries, or nil.
func (e *Executor) readIntent(ctx context.Context, dom libvirt.Domain) (*rebootIntent, error) {
	doc, found, err := e.intentDoc(ctx, dom)
	if err != nil || !found {
		return nil, err
	}
	var in rebootIntent
	if err := xml.Unmarshal([]byte(doc), &in); err != nil {
		return nil, fmt.Errorf("%w: reboot intent of %s: %v", ErrLibvirt, dom.Name, err)
	}
	return &in, nil
}

// intentFlags says where an intent of dom lives: the live definition of an
// active domain and the config of a persistent one.
func (e *Executor) intentFlags(ctx context.Context, dom libvirt.Domain) (libvirt.DomainModificationImpact, error) {
	var active, persistent int32
	err := e.conn.call(ctx, "inspect "+dom.Name, func(l *libvirt.Libvirt) (err error) {
		if active, err = l.DomainIsActive(dom); err != nil {
			return err
		}
		persistent, err = l.DomainIsPersistent(dom)
		return err
	})
	flags := libvirt.DomainAffectCurrent
	if active == 1 {
		flags |= libvirt.DomainAffectLive
	}
	if persistent == 1 {
		flags |= libvirt.DomainAffectConfig
	}
	return flags, err
}

// setIntent records in dom, where flags say, that a reboot began at since.
func (e *Executor) setIntent(ctx context.Context, dom libvirt.Domain, since time.Time, flags libvirt.DomainModificationImpact) error {
	if _, loaded := e.intentFree.LoadAndDelete(dom.UUID); loaded {
		e.nfree.Add(-1)
	}
	doc, err := xml.Marshal(rebootIntent{Since: since.UTC()})
	if err != nil {
		return fmt.Errorf("%w: build reboot intent: %v", ErrInvalid, err)
	}
	return e.conn.call(ctx, "record reboot intent in "+dom.Name, func(l *libvirt.Libvirt) error {
		return l.DomainSetMetadata(dom, int32(libvirt.DomainMetadataElement),
			libvirt.OptString{string(doc)}, libvirt.OptString{intentKey}, libvirt.OptString{intentURI}, flags)
	})
}

// clearIntent removes the reboot intent from dom, live and config. Most
// domains have none, which costs one read; a domain that is gone (a
// transient one stopped) has none either. With a view, a domain found
// without one is remembered, and not read again while its definition is
// the same: only this worker writes intents (one worker holds a host),
// and setIntent forgets the domain first. A define or undefine event, or
// a subscription that ended, makes it read again.
func (e *Executor) clearIntent(ctx context.Context, dom libvirt.Domain) error {
	def := e.definition(dom.UUID)
	if v, ok := e.intentFree.Load(dom.UUID); ok && def != 0 && v == def {
		return nil
	}
	_, found, err := e.intentDoc(ctx, dom)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if found {
		flags, err := e.intentFlags(ctx, dom)
		if err != nil {
			return err
		}
		// No metadata text removes the element.
		err = e.conn.call(ctx, "clear reboot intent of "+dom.Name, func(l *libvirt.Libvirt) error {
			return l.DomainSetMetadata(dom, int32(libvirt.DomainMetadataElement), nil, nil, libvirt.OptString{intentURI}, flags)
		})
		if err != nil {
			return err
		}
	}
	e.rememberIntentFree(dom.UUID, def)
	return nil
}

// maxIntentFree bounds the domains remembered without an intent; past it
// they are all forgotten, and each costs one read again.
const maxIntentFree = 10000

// rememberIntentFree notes that dom carries no intent as of definition
// def; nothing is noted when nothing can be known of its definition.
func (e *Executor) rememberIntentFree(u libvirt.UUID, def uint64) {
	if def == 0 {
		return
	}
	if e.nfree.Load() >= maxIntentFree {
		e.intentFree.Clear()
		e.nfree.Store(0)
	}
	if _, loaded := e.intentFree.Swap(u, def); !loaded {
		e.nfree.Add(1)
	}
}

// definition is the view's Definition of the domain with UUID u; 0
// without a view.
func (e *Executor) definition(u libvirt.UUID) uint64 {
	if e.cfg.View == nil {
		return 0
	}
	return e.cfg.View.Definition(u)
}
