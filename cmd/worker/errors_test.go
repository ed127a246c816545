package main

import (
	"errors"
	"fmt"
	"testing"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/vm"
)

func TestCompletionError(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		err           error
		code, message string
	}{
		{fmt.Errorf("%w: domain is not running", vm.ErrConflict), bus.CodeConflict, "domain is not running"},
		{fmt.Errorf("%w: no domain", vm.ErrNotFound), bus.CodeNotFound, "no domain"},
		{fmt.Errorf("%w: bad mode", vm.ErrInvalid), bus.CodeInvalid, "bad mode"},
		{fmt.Errorf("%w: /etc/shadow", vm.ErrForbidden), bus.CodeForbidden, "/etc/shadow"},
		{fmt.Errorf("%w: guest kept the disk", vm.ErrTimeout), bus.CodeTimeout, "guest kept the disk"},
		{fmt.Errorf("%w: boom", vm.ErrLibvirt), bus.CodeLibvirt, "boom"},
		{fmt.Errorf("%w: no answer", vm.ErrUnavailable), bus.CodeUnavailable, "no answer"},
		// Context added around the sentinel stays; the code still follows it.
		{fmt.Errorf("stop web-1: %w", fmt.Errorf("%w: not running", vm.ErrConflict)), bus.CodeConflict, "stop web-1: conflict: not running"},
		{errors.New("plain"), bus.CodeLibvirt, "plain"},
	} {
		got := completionError(c.err)
		if got.Code != c.code || got.Message != c.message {
			t.Errorf("completionError(%v) = %s %q, want %s %q", c.err, got.Code, got.Message, c.code, c.message)
		}
	}
	// Every sentinel has a code, and every code but expired (the bus's own)
	// has a sentinel.
	if len(errorCodes) != 7 {
		t.Errorf("%d sentinels mapped, want 7", len(errorCodes))
	}
}
