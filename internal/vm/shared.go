package vm

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// checkShared refuses a disk image another domain uses, unless that use
// and the new one are both read-only. This is stricter than refusing only
// a file another domain writes: a read-write attach next to a reader
// changes the disk under a guest that caches it, which corrupts as surely
// as two writers. libvirt's <shareable/> does not lift the rule: it is safe
// only with a cluster file system in the guests, which virtbus cannot see.
//
// Every domain libvirt knows counts, running or shut off: its current
// definition and, for a running persistent one, also its config (a disk
// attached there only comes back at the next boot). Files are compared by
// identity, so another spelling of the path (a symlink) is caught too.
func (e *Executor) checkShared(ctx context.Context, dom libvirt.Domain, src string, readonly bool) error {
	want, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("%w: stat disk image %s: %v", ErrNotFound, clip(src), pathErr(err))
	}
	all, err := e.listDomains(ctx, 0)
	if err != nil {
		return err
	}
	withConfig, err := e.listDomains(ctx, libvirt.ConnectListDomainsActive|libvirt.ConnectListDomainsPersistent)
	if err != nil {
		return err
	}
	for _, other := range all {
		if other.UUID == dom.UUID {
			continue
		}
		flags := []libvirt.DomainXMLFlags{0}
		if _, running := withConfig[other.UUID]; running {
			flags = append(flags, libvirt.DomainXMLInactive)
		}
		for _, f := range flags {
			def, err := e.domainXML(ctx, other, f)
			if errors.Is(err, ErrNotFound) {
				break // undefined since the listing: it uses nothing now
			}
			if err != nil {
				return err
			}
			used, writable := fileUse(def, want)
			if !used || (readonly && !writable) {
				continue
			}
			e.log.Debug("disk image in use by another domain", "path", src, "domain", dom.Name, "other", other.Name, "other_writable", writable)
			if writable {
				return fmt.Errorf("%w: disk image %s is attached read-write to another domain", ErrForbidden, clip(src))
			}
			return fmt.Errorf("%w: disk image %s is attached to another domain: only read-only attaches may share it", ErrForbidden, clip(src))
		}
	}
	return nil
}

// listDomains lists the domains libvirt knows that match flags (0: all),
// by UUID when the caller asks whether one is among them.
func (e *Executor) listDomains(ctx context.Context, flags libvirt.ConnectListAllDomainsFlags) (map[libvirt.UUID]libvirt.Domain, error) {
	var doms []libvirt.Domain
	err := e.conn.call(ctx, "list domains", func(l *libvirt.Libvirt) (err error) {
		doms, _, err = l.ConnectListAllDomains(1, flags)
		return err
	})
	if err != nil {
		return nil, err
	}
	out := make(map[libvirt.UUID]libvirt.Domain, len(doms))
	for _, d := range doms {
		out[d.UUID] = d
	}
	return out, nil
}

// fileUse reports whether a disk of def reads the file want, directly or
// as a backing file (which QEMU opens read-only), and whether any such use
// may write it. A cdrom is read-only without saying so.
func fileUse(def *libvirtxml.Domain, want fs.FileInfo) (used, writable bool) {
	if def == nil || def.Devices == nil {
		return false, false
	}
	for _, d := range def.Devices.Disks {
		if isFile(d.Source, want) {
			used = true
			writable = writable || (d.ReadOnly == nil && d.Device != "cdrom")
		}
		for b := d.BackingStore; b != nil; b = b.BackingStore {
			used = used || isFile(b.Source, want)
		}
	}
	return used, writable
}

func isFile(s *libvirtxml.DomainDiskSource, want fs.FileInfo) bool {
	if s == nil || s.File == nil || s.File.File == "" {
		return false
	}
	fi, err := os.Stat(s.File.File)
	return err == nil && os.SameFile(fi, want)
}
