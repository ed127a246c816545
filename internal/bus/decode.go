package bus

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// job is one command on its way through the FIFO, with the message it came
// in so that it can be acked or handed back.
type job struct {
	cmd Command
	// invalid is set when the message could not be decoded: the command is
	// answered with one `invalid` completion and never reaches the handler.
	invalid *Error
	// key orders the FIFO: the VM, or the subject when there is no VM.
	key string

	js   jetstream.Msg // JetStream mode
	seq  uint64        // stream sequence, JetStream mode
	core *nats.Msg     // core mode
}

// decode turns a message into a job. It never fails: whatever cannot be
// decoded becomes an invalid job, so a bad message ends in one completion
// instead of a crash or endless redelivery.
func (w *Worker) decode(subject string, hdr nats.Header, body []byte, receivedAt time.Time) *job {
	j := &job{cmd: Command{
		ID:         hdr.Get(HeaderMsgID),
		Params:     json.RawMessage("{}"),
		Attempt:    1,
		ReceivedAt: receivedAt,
	}}
	if reply := hdr.Get(HeaderReply); reply != "" {
		if validPublishSubject(reply) {
			j.cmd.Reply = reply
		} else {
			w.log.Warn("ignoring reply header: not a subject", "subject", subject, "reply", reply)
		}
	}

	host, vm, action, err := ParseCommandSubject(subject)
	j.key = subject
	switch {
	case err != nil:
		j.invalid = &Error{Code: CodeInvalid, Message: err.Error()}
		return j
	case !ValidToken(vm) || !ValidToken(action):
		j.invalid = &Error{Code: CodeInvalid, Message: fmt.Sprintf("subject %q: empty vm or action", subject)}
		return j
	}
	j.cmd.Host, j.cmd.VM, j.cmd.Action = host, vm, action
	j.key = vm

	params, err := decodeParams(body)
	if err != nil {
		j.invalid = &Error{Code: CodeInvalid, Message: err.Error()}
		return j
	}
	j.cmd.Params = params
	return j
}

// decodeParams accepts an empty body (no parameters) or one JSON object.
func decodeParams(body []byte) (json.RawMessage, error) {
	body = bytes.TrimSpace(body)
	if len(body) == 0 {
		return json.RawMessage("{}"), nil
	}
	if body[0] != '{' || !json.Valid(body) {
		return nil, fmt.Errorf("body is not a JSON object: %.64q", body)
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
		if !ValidToken(tok) {
			return false
		}
	}
	return true
}
