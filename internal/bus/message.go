// Package bus carries virtbus commands over NATS: it connects, owns the
// JetStream stream and this host's consumer, decodes commands, runs them
// through a bounded FIFO and publishes one completion per command before
// acking it. It knows nothing of libvirt: the worker hands it a Handler.
package bus

import (
	"encoding/json"
	"fmt"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Subject prefixes and headers of the wire contract (README.md, "Subjects and headers").
const (
	CommandPrefix = "virtbus.cmd"
	EventPrefix   = "virtbus.evt"

	// HeaderMsgID is the command id; JetStream drops a duplicate inside the
	// stream's duplicate window.
	HeaderMsgID = "Nats-Msg-Id"
	// HeaderReply names a subject for the completion, for JetStream
	// publishers that cannot use the message's own reply subject.
	HeaderReply = "Virtbus-Reply"
	// HeaderExpires is an RFC 3339 deadline: a command taken off the FIFO
	// after it is not run and ends in CodeExpired.
	HeaderExpires = "Virtbus-Expires"
)

// Status of a completion.
const (
	StatusOK    = "ok"
	StatusError = "error"
)

// Error codes of a failed completion (README.md, "Completion").
const (
	CodeInvalid     = "invalid"
	CodeNotFound    = "not_found"
	CodeForbidden   = "forbidden"
	CodeConflict    = "conflict"
	CodeTimeout     = "timeout"
	CodeLibvirt     = "libvirt"
	CodeUnavailable = "unavailable"
	CodeExpired     = "expired"
)

// CommandSubject is the subject a command for vm on host is published to.
func CommandSubject(host, vm, action string) string {
	return CommandPrefix + "." + host + "." + vm + "." + action
}

// EventSubject is the subject the worker publishes a completion to.
func EventSubject(host, vm, action string) string {
	return EventPrefix + "." + host + "." + vm + "." + action
}

// Bounds on what a client sends (README, "Trust model"). They keep every
// subject, KV key and header the worker builds from client input far below
// the server's control-line limit (4 KiB by default), whatever the input.
const (
	MaxIDLen    = 128 // Nats-Msg-Id, Idempotency-Key
	MaxTokenLen = 128 // <vm> and <action> (and <host>) subject tokens
	MaxReplyLen = 256 // Virtbus-Reply
)

// ValidToken reports whether s can stand as one subject token: 1 to
// MaxTokenLen bytes of UTF-8, no dots, no white space or control
// characters, no wildcards.
func ValidToken(s string) bool {
	return s != "" && len(s) <= MaxTokenLen && utf8.ValidString(s) && !strings.ContainsFunc(s, notInToken)
}

// notInToken reports the runes a subject token may not hold: separators,
// wildcards, white space and control characters.
func notInToken(r rune) bool {
	return r <= ' ' || r == 0x7f || r == '.' || r == '*' || r == '>' || unicode.IsSpace(r)
}

// Clip bounds client text before it reaches a message, an answer or a log
// line: quoted, and cut at n bytes with its whole length said.
func Clip(s string, n int) string {
	if len(s) <= n {
		return fmt.Sprintf("%q", s)
	}
	return fmt.Sprintf("%q… (%d bytes)", strings.ToValidUTF8(s[:n], ""), len(s))
}

// ValidID reports whether s can be a client's command id: 1 to MaxIDLen
// bytes of [A-Za-z0-9._:-]. Ids the worker makes start with '~', so no
// client id can ever equal one.
func ValidID(s string) bool {
	if s == "" || len(s) > MaxIDLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '_', c == ':', c == '-':
		default:
			return false
		}
	}
	return true
}

// ParseCommandSubject splits virtbus.cmd.<host>.<vm>.<action>.
func ParseCommandSubject(subject string) (host, vm, action string, err error) {
	parts := strings.Split(subject, ".")
	if len(parts) != 5 || parts[0]+"."+parts[1] != CommandPrefix {
		return "", "", "", fmt.Errorf("subject %q is not %s.<host>.<vm>.<action>", subject, CommandPrefix)
	}
	return parts[2], parts[3], parts[4], nil
}

// Command is one decoded command as the handler sees it.
type Command struct {
	ID     string          // Nats-Msg-Id, or the stream sequence when the publisher set none
	Host   string          // from the subject
	VM     string          // domain name or UUID, from the subject
	Action string          // from the subject; the handler decides whether it knows it
	Params json.RawMessage // the body: a JSON object, never nil (an empty body is "{}")
	Reply  string          // where the completion goes besides the event subject; may be empty

	Attempt    int       // delivery count, 1 on the first delivery
	ReceivedAt time.Time // when this worker took the message off NATS
	// Expires is when the command stops being worth running: the
	// Virtbus-Expires header or its age limit, whichever comes first.
	Expires time.Time
}

// Outcome is what a handler reports for one command.
type Outcome struct {
	Changed bool
	State   string
	Detail  map[string]any
	Err     *Error // nil on success
}

// Error is the error object of a failed completion.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

func (e *Error) Error() string { return e.Code + ": " + e.Message }

// Completion is the message published once per command, to the event
// subject and to the command's reply subject.
type Completion struct {
	ID         string         `json:"id"`
	Host       string         `json:"host"`
	VM         string         `json:"vm"`
	Action     string         `json:"action"`
	Status     string         `json:"status"`
	Changed    bool           `json:"changed"`
	State      string         `json:"state,omitempty"`
	Detail     map[string]any `json:"detail,omitempty"`
	Error      *Error         `json:"error,omitempty"`
	Attempt    int            `json:"attempt"`
	ReceivedAt time.Time      `json:"received_at"`
	StartedAt  time.Time      `json:"started_at"`
	FinishedAt time.Time      `json:"finished_at"`
	DurationMS float64        `json:"duration_ms"`
}

// HostToken turns a hostname into a host id: lower case, and anything but
// [a-z0-9_-] becomes '-', so "HV1.example.com" is "hv1-example-com".
// The worker's default VIRTBUS_HOST and publish's default -host both come
// from here, so the two always agree.
func HostToken(h string) string {
	return strings.Map(func(r rune) rune {
		r = unicode.ToLower(r)
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '_' || r == '-' {
			return r
		}
		return '-'
	}, h)
}
