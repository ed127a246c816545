package main

import (
	"errors"
	"strings"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/vm"
)

// errorCodes maps the executor's sentinel errors to the completion's error
// codes: the one place where libvirt's side and the bus's side meet.
var errorCodes = []struct {
	err  error
	code string
}{
	{vm.ErrInvalid, bus.CodeInvalid},
	{vm.ErrNotFound, bus.CodeNotFound},
	{vm.ErrForbidden, bus.CodeForbidden},
	{vm.ErrConflict, bus.CodeConflict},
	{vm.ErrTimeout, bus.CodeTimeout},
	{vm.ErrLibvirt, bus.CodeLibvirt},
	{vm.ErrUnavailable, bus.CodeUnavailable},
}

// completionError is err as a completion reports it: the code of its
// sentinel (libvirt when it carries none), and its text without the
// sentinel's own leading words, which the code already says.
func completionError(err error) *bus.Error {
	for _, c := range errorCodes {
		if errors.Is(err, c.err) {
			return &bus.Error{Code: c.code, Message: strings.TrimPrefix(err.Error(), c.err.Error()+": ")}
		}
	}
	return &bus.Error{Code: bus.CodeLibvirt, Message: err.Error()}
}
