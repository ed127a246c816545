package vm

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// attach hot-plugs a disk image into the live domain and, when persistent,
// into its config. The same source already attached is ok and unchanged.
func (e *Executor) attach(ctx context.Context, vm string, p AttachParams) (Result, error) {
	// The domain first: a {vm} disk root is the domain's own directory,
	// named by libvirt's name for it, also when addressed by UUID.
	dom, st, err := e.find(ctx, vm)
	if err != nil {
		return Result{}, err
	}
	src, err := e.cfg.Roots.Resolve(p.Path, dom.Name)
	if err != nil {
		return Result{}, err
	}
	live := st != libvirt.DomainShutoff
	persistent := *p.Persistent
	if !live && !persistent {
		return Result{}, fmt.Errorf("%w: domain %s is shut off: a non-persistent attach needs a running domain", ErrConflict, dom.Name)
	}
	unlock, err := e.lockAttach(ctx)
	if err != nil {
		return Result{}, err
	}
	defer unlock()
	// The live definition when the domain runs, else the config: the one
	// the attach must show up in.
	cur, err := e.domainXML(ctx, dom, 0)
	if err != nil {
		return Result{}, err
	}
	if d, ok := findDisk(cur, "", src); ok {
		return Result{State: StateName(st), Detail: map[string]any{"target": diskTarget(d), "bus": diskBus(d)}}, nil
	}
	if err := e.checkShared(ctx, dom, src, p.ReadOnly); err != nil {
		return Result{}, err
	}
	target, err := e.pickTarget(ctx, dom, cur, p, live && persistent)
	if err != nil {
		return Result{}, err
	}
	disk := libvirtxml.DomainDisk{
		Device: "disk",
		Driver: &libvirtxml.DomainDiskDriver{Name: "qemu", Type: p.Format},
		Source: &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: src}},
		Target: &libvirtxml.DomainDiskTarget{Dev: target, Bus: p.Bus},
	}
	if p.ReadOnly {
		disk.ReadOnly = &libvirtxml.DomainDiskReadOnly{}
	}
	if err := e.plug(ctx, dom, disk, deviceFlags(live, persistent)); err != nil {
		return Result{}, err
	}
	return Result{Changed: true, State: StateName(st), Detail: map[string]any{"target": target, "bus": p.Bus}}, nil
}

// lockAttach lets one attach at a time past the check that no other domain
// uses the file: two attaches of one file to two domains, run side by side
// by a worker with more than one command in flight, would both pass it.
func (e *Executor) lockAttach(ctx context.Context) (unlock func(), err error) {
	select {
	case e.attaching <- struct{}{}:
		return func() { <-e.attaching }, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("wait for another attach: %w: %v", ErrUnavailable, context.Cause(ctx))
	}
}

// pickTarget returns the asked target, or the next free one for the bus,
// after the targets in use live and, when the attach reaches the config
// too (config), there.
func (e *Executor) pickTarget(ctx context.Context, dom libvirt.Domain, cur *libvirtxml.Domain, p AttachParams, config bool) (string, error) {
	used := usedTargets(cur)
	if config {
		cfg, err := e.domainXML(ctx, dom, libvirt.DomainXMLInactive)
		if err != nil {
			return "", err
		}
		for t := range usedTargets(cfg) {
			used[t] = true
		}
	}
	if p.Target == "" {
		target := nextFreeTarget(targetPrefix(p.Bus), used)
		if target == "" {
			return "", fmt.Errorf("%w: no free %s… target left on %s", ErrConflict, targetPrefix(p.Bus), dom.Name)
		}
		return target, nil
	}
	if used[p.Target] {
		return "", fmt.Errorf("%w: target %s is already used by another disk on %s", ErrConflict, p.Target, dom.Name)
	}
	return p.Target, nil
}

// plug attaches disk and checks that the domain has it.
func (e *Executor) plug(ctx context.Context, dom libvirt.Domain, disk libvirtxml.DomainDisk, flags uint32) error {
	doc, err := disk.Marshal()
	if err != nil {
		return fmt.Errorf("%w: build disk XML: %v", ErrInvalid, err)
	}
	src, target := diskSource(disk), diskTarget(disk)
	callErr := e.conn.call(ctx, fmt.Sprintf("attach disk %s to %s", clip(src), dom.Name), func(l *libvirt.Libvirt) error {
		return l.DomainAttachDeviceFlags(dom, doc, flags)
	})
	// The domain says whether it worked, even after an error: a call
	// retried after a lost connection may have attached it on its first try.
	after, err := e.domainXML(ctx, dom, 0)
	if callErr != nil && (err != nil || !hasDisk(after, target, src)) {
		return callErr
	}
	if err != nil {
		return err
	}
	if !hasDisk(after, target, src) {
		return fmt.Errorf("%w: attach disk %s to %s: libvirt said yes but %s is not in the domain", ErrLibvirt, clip(src), dom.Name, target)
	}
	return nil
}

// detach unplugs a disk, found by target or source path. It is ok only once
// the disk is gone from the live domain XML: a guest may ignore the unplug
// request (virtio without a driver does) while libvirt still reports
// success, so it waits for the device-removed event, asks again a bounded
// number of times, and fails with ErrTimeout when the disk is still there.
func (e *Executor) detach(ctx context.Context, vm string, p DetachParams) (Result, error) {
	dom, st, err := e.find(ctx, vm)
	if err != nil {
		return Result{}, err
	}
	live := st != libvirt.DomainShutoff
	persistent := *p.Persistent
	path := p.Path
	if path != "" {
		if real, err := filepath.EvalSymlinks(path); err == nil {
			path = real
		}
	}

	where, err := e.locateDisk(ctx, dom, live, persistent || !live, p.Target, path)
	if err != nil {
		return Result{}, err
	}
	liveDisk, inLive, cfgDisk, inCfg := where.live, where.inLive, where.cfg, where.inCfg
	if !inLive && !inCfg {
		return Result{State: StateName(st)}, nil
	}
	if !inLive {
		// Shut off, or only in the config: nothing to unplug.
		if !persistent {
			return Result{}, fmt.Errorf("%w: disk is only in the config of %s and persistent=false", ErrConflict, vm)
		}
		if err := e.detachConfig(ctx, dom, cfgDisk); err != nil {
			return Result{}, err
		}
		return Result{Changed: true, State: StateName(st), Detail: map[string]any{"target": diskTarget(cfgDisk)}}, nil
	}
	if err := e.unplug(ctx, dom, liveDisk, persistent && inCfg, time.Duration(p.Timeout)); err != nil {
		return Result{}, err
	}
	if persistent && inCfg {
		if err := e.ensureConfigDetached(ctx, dom, cfgDisk); err != nil {
			return Result{}, err
		}
	}
	st, err = e.state(ctx, dom)
	if err != nil {
		return Result{}, err
	}
	return Result{Changed: true, State: StateName(st), Detail: map[string]any{"target": diskTarget(liveDisk)}}, nil
}

// diskPlaces is where a disk to detach was found: in the live domain, in
// its config, or both.
type diskPlaces struct {
	live, cfg     libvirtxml.DomainDisk
	inLive, inCfg bool
}

// locateDisk looks the disk up in the live definition (when the domain
// runs) and in the config (when asked).
func (e *Executor) locateDisk(ctx context.Context, dom libvirt.Domain, live, config bool, target, path string) (diskPlaces, error) {
	var w diskPlaces
	if live {
		def, err := e.domainXML(ctx, dom, 0)
		if err != nil {
			return w, err
		}
		w.live, w.inLive = findDisk(def, target, path)
	}
	if config {
		def, err := e.domainXML(ctx, dom, libvirt.DomainXMLInactive)
		if err != nil {
			return w, err
		}
		w.cfg, w.inCfg = findDisk(def, target, path)
	}
	return w, nil
}

// ensureConfigDetached makes sure the config lost the disk too: that part
// of a LIVE|CONFIG detach happens with the live request.
func (e *Executor) ensureConfigDetached(ctx context.Context, dom libvirt.Domain, disk libvirtxml.DomainDisk) error {
	def, err := e.domainXML(ctx, dom, libvirt.DomainXMLInactive)
	if err != nil {
		return err
	}
	if d, still := findDisk(def, diskTarget(disk), ""); still {
		return e.detachConfig(ctx, dom, d)
	}
	return nil
}

func (e *Executor) detachConfig(ctx context.Context, dom libvirt.Domain, d libvirtxml.DomainDisk) error {
	doc, err := d.Marshal()
	if err != nil {
		return fmt.Errorf("%w: build disk XML: %v", ErrInvalid, err)
	}
	err = e.conn.call(ctx, fmt.Sprintf("detach disk %s from the config of %s", diskTarget(d), dom.Name), func(l *libvirt.Libvirt) error {
		return l.DomainDetachDeviceFlags(dom, doc, uint32(libvirt.DomainDeviceModifyConfig))
	})
	if err != nil {
		return err
	}
	def, err := e.domainXML(ctx, dom, libvirt.DomainXMLInactive)
	if err != nil {
		return err
	}
	if _, still := findDisk(def, diskTarget(d), ""); still {
		return fmt.Errorf("%w: detach %s from the config of %s: still there", ErrLibvirt, diskTarget(d), dom.Name)
	}
	return nil
}

// unplugAsks bounds how often the unplug request is sent: a guest that
// ignored it three times will not change its mind.
const unplugAsks = 3

// unplugging is one disk's way out of the live domain.
type unplugging struct {
	dom    libvirt.Domain
	target string
	doc    string // the disk's XML, as the request carries it
	flags  uint32
}

// unplug removes d from the live domain and waits until it is gone. Only a
// disk that libvirt still shows in the live XML at the deadline is a
// timeout; a daemon that does not answer ends it unavailable.
func (e *Executor) unplug(ctx context.Context, dom libvirt.Domain, d libvirtxml.DomainDisk, config bool, timeout time.Duration) error {
	alias := ""
	if d.Alias != nil {
		alias = d.Alias.Name
	}
	doc, err := d.Marshal()
	if err != nil {
		return fmt.Errorf("%w: build disk XML: %v", ErrInvalid, err)
	}
	u := unplugging{dom: dom, target: diskTarget(d), doc: doc, flags: deviceFlags(true, config)}
	deadline := time.Now().Add(timeout)
	// Watch before asking: the event may come before the request returns.
	w, err := e.watchRemoval(ctx, dom, alias)
	if err != nil {
		return err
	}
	defer func() { w.close() }()
	if done, err := e.askUnplug(ctx, &u, true); done || err != nil {
		return err
	}
	nextAsk := time.Now().Add(timeout / unplugAsks)
	for asks := 1; ; {
		until := deadline
		if asks < unplugAsks && nextAsk.Before(deadline) {
			until = nextAsk
		}
		switch w.wait(ctx, time.Until(until)) {
		case removalFailed:
			return fmt.Errorf("%w: detach disk %s from %s: the guest refused the unplug (device-removal-failed)", ErrConflict, u.target, dom.Name)
		case ctxDone:
			return fmt.Errorf("detach disk %s from %s: %w: %v", u.target, dom.Name, ErrUnavailable, context.Cause(ctx))
		case watchLost:
			// The connection went, and the event with it. Watch on the next
			// one before looking at the XML, so that nothing falls between.
			w.close()
			next, err := e.watchRemoval(ctx, dom, alias)
			if err != nil {
				return err
			}
			w = next
		}
		gone, err := e.diskGone(ctx, dom, u.target)
		if err != nil || gone {
			return err
		}
		if !time.Now().Before(deadline) {
			return fmt.Errorf("%w: detach disk %s from %s: still in the live domain after %s (the guest did not release it)", ErrTimeout, u.target, dom.Name, timeout)
		}
		if asks < unplugAsks && !time.Now().Before(nextAsk) {
			asks++
			if _, err := e.askUnplug(ctx, &u, false); err != nil {
				return err
			}
			nextAsk = time.Now().Add(timeout / unplugAsks)
		}
	}
}

// askUnplug sends the unplug request; done says the disk is gone already.
// ErrUnavailable ends the unplug: libvirtd did not answer, and waiting on
// would blame the guest for it. A repeated request while QEMU still waits
// on the guest is refused ("already in the process of unplug"), which is
// fine; a refused first one is the answer, unless the disk is gone anyway
// (a request retried after a lost connection may have got through before).
func (e *Executor) askUnplug(ctx context.Context, u *unplugging, first bool) (done bool, err error) {
	err = e.requestUnplug(ctx, u)
	if errors.Is(err, errDeviceMissing) && u.flags&uint32(libvirt.DomainDeviceModifyConfig) != 0 {
		// libvirt checks the config first: when an earlier request whose
		// answer was lost took the disk out of it, every LIVE|CONFIG request
		// fails there and never reaches QEMU. Ask for the live one alone.
		if def, derr := e.domainXML(ctx, u.dom, libvirt.DomainXMLInactive); derr == nil {
			if _, inCfg := findDisk(def, u.target, ""); !inCfg {
				u.flags &^= uint32(libvirt.DomainDeviceModifyConfig)
				err = e.requestUnplug(ctx, u)
			}
		}
	}
	if err == nil || errors.Is(err, ErrUnavailable) {
		return false, err
	}
	if !first {
		return false, nil
	}
	if gone, gerr := e.diskGone(ctx, u.dom, u.target); gerr == nil && gone {
		return true, nil
	}
	if errors.Is(err, errDeviceMissing) {
		// Still in the live XML, yet libvirt no longer has it: an earlier
		// request is being carried out. Wait for it like for our own.
		return false, nil
	}
	return false, err
}

func (e *Executor) requestUnplug(ctx context.Context, u *unplugging) error {
	if e.beforeUnplugAsk != nil {
		e.beforeUnplugAsk()
	}
	return e.conn.call(ctx, fmt.Sprintf("detach disk %s from %s", u.target, u.dom.Name), func(l *libvirt.Libvirt) error {
		return l.DomainDetachDeviceFlags(u.dom, u.doc, u.flags)
	})
}

func (e *Executor) diskGone(ctx context.Context, dom libvirt.Domain, target string) (bool, error) {
	def, err := e.domainXML(ctx, dom, 0)
	if err != nil {
		return false, err
	}
	_, still := findDisk(def, target, "")
	return !still, nil
}

// deviceFlags says where a device change applies.
func deviceFlags(live, config bool) uint32 {
	var f libvirt.DomainDeviceModifyFlags
	if live {
		f |= libvirt.DomainDeviceModifyLive
	}
	if config {
		f |= libvirt.DomainDeviceModifyConfig
	}
	return uint32(f)
}

// domainXML reads and parses the domain definition: live (flags 0) or the
// config (DomainXMLInactive).
func (e *Executor) domainXML(ctx context.Context, dom libvirt.Domain, flags libvirt.DomainXMLFlags) (*libvirtxml.Domain, error) {
	var doc string
	err := e.conn.call(ctx, "get XML of "+dom.Name, func(l *libvirt.Libvirt) (err error) {
		doc, err = l.DomainGetXMLDesc(dom, flags)
		return err
	})
	if err != nil {
		return nil, err
	}
	var def libvirtxml.Domain
	if err := def.Unmarshal(doc); err != nil {
		return nil, fmt.Errorf("%w: parse XML of %s: %v", ErrLibvirt, dom.Name, err)
	}
	return &def, nil
}

// findDisk finds a disk by target (when given) or by source file.
func findDisk(def *libvirtxml.Domain, target, src string) (libvirtxml.DomainDisk, bool) {
	if def == nil || def.Devices == nil {
		return libvirtxml.DomainDisk{}, false
	}
	for _, d := range def.Devices.Disks {
		if target != "" && diskTarget(d) == target {
			return d, true
		}
		if target == "" && src != "" && sameFile(diskSource(d), src) {
			return d, true
		}
	}
	return libvirtxml.DomainDisk{}, false
}

func hasDisk(def *libvirtxml.Domain, target, src string) bool {
	d, ok := findDisk(def, target, "")
	return ok && sameFile(diskSource(d), src)
}

func sameFile(a, b string) bool {
	if a == "" || b == "" {
		return false
	}
	if filepath.Clean(a) == filepath.Clean(b) {
		return true
	}
	ra, err := filepath.EvalSymlinks(a)
	return err == nil && ra == b
}

func usedTargets(def *libvirtxml.Domain) map[string]bool {
	used := map[string]bool{}
	if def != nil && def.Devices != nil {
		for _, d := range def.Devices.Disks {
			used[diskTarget(d)] = true
		}
	}
	return used
}

// nextFreeTarget returns the first of prefix+a … prefix+z not in used.
func nextFreeTarget(prefix string, used map[string]bool) string {
	for c := 'a'; c <= 'z'; c++ {
		if t := prefix + string(c); !used[t] {
			return t
		}
	}
	return ""
}

func diskTarget(d libvirtxml.DomainDisk) string {
	if d.Target == nil {
		return ""
	}
	return d.Target.Dev
}

func diskBus(d libvirtxml.DomainDisk) string {
	if d.Target == nil {
		return ""
	}
	return d.Target.Bus
}

func diskSource(d libvirtxml.DomainDisk) string {
	if d.Source == nil || d.Source.File == nil {
		return ""
	}
	return d.Source.File.File
}

// UUIDString is u in libvirt's 36-character form, as completions, the
// domain states and virsh show it.
func UUIDString(u libvirt.UUID) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}
