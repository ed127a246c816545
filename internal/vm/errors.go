package vm

import (
	"context"
	"errors"
	"fmt"
	"unicode/utf8"

	"github.com/digitalocean/go-libvirt"
)

// Sentinel errors callers branch on: every error the executor returns
// carries one (the worker maps them to the completion's codes). Wrap them
// with fmt.Errorf("...: %w", ErrX) to add context.
var (
	ErrInvalid     = errors.New("invalid")
	ErrNotFound    = errors.New("not found")
	ErrForbidden   = errors.New("forbidden")
	ErrConflict    = errors.New("conflict")
	ErrTimeout     = errors.New("timeout")
	ErrLibvirt     = errors.New("libvirt error")
	ErrUnavailable = errors.New("libvirt unavailable")
)

// errDeviceMissing is libvirt's "device not found". For a detach it means
// the disk is already gone, or going: a first request whose answer got
// lost (the call timed out, the connection dropped) may have done the
// work. It is ErrLibvirt wherever it surfaces.
var errDeviceMissing = fmt.Errorf("%w: device not found", ErrLibvirt)

// sentinels are the errors classify leaves as they are.
var sentinels = []error{ErrInvalid, ErrNotFound, ErrForbidden, ErrConflict, ErrTimeout, ErrLibvirt, ErrUnavailable}

// classify turns an error from a go-libvirt call into one that carries a
// sentinel. libvirt's own error numbers say what went wrong on the daemon's
// side; anything that is not a libvirt.Error came from the transport, which
// means the daemon is out of reach.
func classify(err error) error {
	if err == nil {
		return nil
	}
	for _, sentinel := range sentinels {
		if errors.Is(err, sentinel) {
			return err
		}
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	var lerr libvirt.Error
	if !errors.As(err, &lerr) {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	switch libvirt.ErrorNumber(lerr.Code) {
	case libvirt.ErrNoDomain:
		return fmt.Errorf("%w: %v", ErrNotFound, err)
	case libvirt.ErrOperationInvalid:
		return fmt.Errorf("%w: %v", ErrConflict, err)
	case libvirt.ErrInvalidArg, libvirt.ErrXMLError, libvirt.ErrConfigUnsupported:
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	case libvirt.ErrAccessDenied, libvirt.ErrAuthFailed:
		return fmt.Errorf("%w: %v", ErrForbidden, err)
	case libvirt.ErrOperationTimeout:
		return fmt.Errorf("%w: %v", ErrTimeout, err)
	case libvirt.ErrDeviceMissing:
		return fmt.Errorf("%w: %v", errDeviceMissing, err)
	case libvirt.ErrNoConnect, libvirt.ErrRPC:
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	default:
		return fmt.Errorf("%w: %v", ErrLibvirt, err)
	}
}

// clipBytes bounds a client-sent value echoed in an error message: a client
// may send a megabyte of mode or path, and the completion carrying the
// message must stay small.
const clipBytes = 64

// clip shortens s for an error message to clipBytes, cut on a rune
// boundary, and says how long it was.
func clip(s string) string { return clipAt(s, clipBytes) }

// clipAt is clip at n bytes, for text that is mostly ours around a client's.
func clipAt(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n
	for i := 1; i < utf8.UTFMax && cut > 0 && !utf8.RuneStart(s[cut]); i++ {
		cut--
	}
	return fmt.Sprintf("%s… (%d bytes)", s[:cut], len(s))
}
