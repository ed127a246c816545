package bus

import (
	"bytes"
	"encoding/json"
	"fmt"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// InvalidToken stands in a completion, its event subject and the metrics
// for a vm or action token that cannot be used as sent (too long, not a
// subject token): client text that fails its bounds goes nowhere.
const InvalidToken = "~invalid"

// job is one command on its way through the FIFO, with the message it came
// in so that it can be acked or handed back.
type job struct {
	cmd Command
	// invalid is set when the message could not be decoded: the command is
	// answered with one `invalid` completion and never reaches the handler.
	invalid *Error
	// key orders the FIFO: the VM, or InvalidToken when there is no VM.
	key string

	stored streamMsg // the stream message (sequence, stored time), JetStream mode
	lookup *lookup   // its record lookup, started when it was fetched; may be nil
	core   *nats.Msg // core mode

	// mu guards js: a redelivery of a message this worker still holds
	// (after an outage longer than the ack wait) replaces the handle, so
	// that the ack goes with the server's latest delivery.
	mu sync.Mutex
	js jetstream.Msg // JetStream mode
}

func (j *job) msg() jetstream.Msg {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.js
}

func (j *job) setMsg(m jetstream.Msg) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.js = m
}

// decode turns a message into a job. It never fails and never panics:
// whatever cannot be decoded becomes an invalid job, so a bad message ends
// in one completion instead of a crash or endless redelivery. Every field
// of the job is bounded (README, "Trust model") whatever the message holds.
func (w *Worker) decode(subject string, hdr nats.Header, body []byte, receivedAt time.Time) (j *job) {
	j = &job{key: InvalidToken, cmd: Command{
		VM:         InvalidToken,
		Action:     InvalidToken,
		Params:     json.RawMessage("{}"),
		Attempt:    1,
		ReceivedAt: receivedAt,
	}}
	defer func() {
		if r := recover(); r != nil {
			w.log.Error("panic decoding a command", "panic", Clip(fmt.Sprint(r), 256), "stack", string(debug.Stack()))
			j.invalid = &Error{Code: CodeInvalid, Message: "the command could not be decoded"}
		}
	}()
	if err := w.decodeSubject(j, subject); err != nil {
		j.invalid = err
	}
	if err := w.decodeHeaders(j, hdr); err != nil && j.invalid == nil {
		j.invalid = err
	}
	if j.invalid != nil {
		return j
	}
	params, err := decodeParams(body)
	if err != nil {
		j.invalid = &Error{Code: CodeInvalid, Message: err.Error()}
		return j
	}
	j.cmd.Params = params
	return j
}

// decodeSubject takes host, vm and action from the subject; a vm or action
// token out of bounds is left as InvalidToken.
func (w *Worker) decodeSubject(j *job, subject string) *Error {
	parts := strings.SplitN(subject, ".", 6)
	if len(parts) != 5 || parts[0]+"."+parts[1] != CommandPrefix {
		return &Error{Code: CodeInvalid, Message: fmt.Sprintf("subject %s is not %s.<host>.<vm>.<action>", Clip(subject, 64), CommandPrefix)}
	}
	j.cmd.Host = parts[2]
	vm, action := parts[3], parts[4]
	var bad []string
	if ValidToken(vm) {
		j.cmd.VM, j.key = vm, vm
	} else {
		bad = append(bad, fmt.Sprintf("vm token (%d bytes)", len(vm)))
	}
	if ValidToken(action) {
		j.cmd.Action = action
	} else {
		bad = append(bad, fmt.Sprintf("action token (%d bytes)", len(action)))
	}
	if bad != nil {
		return &Error{Code: CodeInvalid, Message: fmt.Sprintf("%s: want 1 to %d bytes, no dots, spaces, control characters or wildcards",
			strings.Join(bad, " and "), MaxTokenLen)}
	}
	return nil
}

// decodeHeaders takes the command id and the reply subject. An id out of
// bounds is replaced (by the caller) with one the worker makes; a reply
// subject out of bounds is dropped, so the completion goes only to the
// event subject.
func (w *Worker) decodeHeaders(j *job, hdr nats.Header) *Error {
	var err *Error
	if id := hdr.Get(HeaderMsgID); id != "" {
		if ValidID(id) {
			j.cmd.ID = id
		} else {
			err = &Error{Code: CodeInvalid, Message: fmt.Sprintf("%s header (%d bytes): want 1 to %d bytes of [A-Za-z0-9._:-]",
				HeaderMsgID, len(id), MaxIDLen)}
		}
	}
	if exp := hdr.Get(HeaderExpires); exp != "" {
		t, perr := time.Parse(time.RFC3339, exp)
		if len(exp) > 64 || perr != nil {
			if err == nil {
				err = &Error{Code: CodeInvalid, Message: fmt.Sprintf("%s header %s: want an RFC 3339 time such as 2026-01-02T15:04:05Z", HeaderExpires, Clip(exp, 64))}
			}
		} else {
			j.cmd.Expires = t
		}
	}
	if reply := hdr.Get(HeaderReply); reply != "" {
		if rerr := w.checkReply(reply); rerr != nil {
			if err == nil {
				err = rerr
			}
		} else {
			j.cmd.Reply = reply
		}
	}
	return err
}

// checkReply allows a reply subject only when it is a publishable subject
// of at most MaxReplyLen bytes under one of the configured prefixes, and
// not in the worker's own inbox.
func (w *Worker) checkReply(reply string) *Error {
	switch {
	case len(reply) > MaxReplyLen || !validPublishSubject(reply):
		return &Error{Code: CodeInvalid, Message: fmt.Sprintf("reply subject (%d bytes): want a subject of at most %d bytes without wildcards", len(reply), MaxReplyLen)}
	case strings.HasPrefix(reply, WorkerInboxPrefix(w.cfg.Host)+"."):
		return &Error{Code: CodeInvalid, Message: "reply subject is in the worker's own inbox"}
	}
	for _, p := range w.cfg.ReplyPrefixes {
		if strings.HasPrefix(reply, p) {
			return nil
		}
	}
	return &Error{Code: CodeInvalid, Message: fmt.Sprintf("reply subject %s is not under any of the allowed prefixes %s",
		Clip(reply, 64), strings.Join(w.cfg.ReplyPrefixes, ","))}
}

// decodeParams accepts an empty body (no parameters) or one JSON object.
func decodeParams(body []byte) (json.RawMessage, error) {
	body = bytes.TrimSpace(body)
	if len(body) == 0 {
		return json.RawMessage("{}"), nil
	}
	if body[0] != '{' || !json.Valid(body) {
		return nil, fmt.Errorf("body (%d bytes) is not a JSON object", len(body))
	}
	return json.RawMessage(bytes.Clone(body)), nil
}

// validPublishSubject reports whether s can be published to: dot-separated
// tokens, none empty, no wildcards or white space. A bad reply header must
// not make every publish of the completion fail.
func validPublishSubject(s string) bool {
	if s == "" {
		return false
	}
	for tok := range strings.SplitSeq(s, ".") {
		if tok == "" || strings.ContainsFunc(tok, notInToken) {
			return false
		}
	}
	return true
}
