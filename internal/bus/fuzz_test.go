package bus

import (
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

// FuzzDecode feeds decode any subject, headers and body a publisher could
// send. Whatever comes in, decode returns a job whose every field is within
// its bounds, so nothing the worker builds from it (subjects, record keys,
// log lines, metric labels) can grow with the input. Seeds are in
// testdata/fuzz/FuzzDecode.
func FuzzDecode(f *testing.F) {
	f.Add("virtbus.cmd.hv1.web-1.stop", "id-1", "_INBOX.abc", []byte(`{"mode":"force"}`))
	f.Add("virtbus.cmd.hv1.web-1.start", "", "", []byte(``))
	f.Add("virtbus.cmd.hv1..start", "~1-2", "$KV.VIRTBUS_DONE.hv1.x", []byte(`[]`))
	w := &Worker{log: nullLogger(), cfg: Config{Host: testHost, ReplyPrefixes: DefaultConfig().ReplyPrefixes},
		m: &metrics{actions: map[string]bool{"start": true}}}
	f.Fuzz(func(t *testing.T, subject, id, reply string, body []byte) {
		hdr := nats.Header{}
		hdr.Set(HeaderMsgID, id)
		hdr.Set(HeaderReply, reply)
		j := w.decode(subject, hdr, body, time.Now())
		c := j.cmd
		if c.VM != InvalidToken && !ValidToken(c.VM) || c.Action != InvalidToken && !ValidToken(c.Action) {
			t.Fatalf("vm %q or action %q out of bounds", c.VM, c.Action)
		}
		if c.ID != "" && !ValidID(c.ID) {
			t.Fatalf("id %q out of bounds", c.ID)
		}
		if c.Reply != "" && (len(c.Reply) > MaxReplyLen || !validPublishSubject(c.Reply) || !hasAnyPrefix(c.Reply, DefaultConfig().ReplyPrefixes)) {
			t.Fatalf("reply %q allowed", c.Reply)
		}
		if l := len(EventSubject(testHost, c.VM, c.Action)); l > 300 {
			t.Fatalf("event subject of %d bytes", l)
		}
		if l := len(recordKey(testHost, c.ID)); l > 200 {
			t.Fatalf("record key of %d bytes", l)
		}
		if j.invalid == nil {
			if c.VM != subjectToken(subject, 3) || c.Action != subjectToken(subject, 4) || c.Params == nil {
				t.Fatalf("valid command %+v does not match its subject %q", c, subject)
			}
			return
		}
		if j.invalid.Code != CodeInvalid || len(j.invalid.Message) > 512 {
			t.Fatalf("invalid job error %q (%d bytes)", j.invalid.Code, len(j.invalid.Message))
		}
		if a := w.m.action(c.Action); a != "start" && a != unknownLabel {
			t.Fatalf("action label %q", a)
		}
	})
}

func nullLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

func hasAnyPrefix(s string, prefixes []string) bool {
	for _, p := range prefixes {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

func subjectToken(subject string, i int) string {
	parts := strings.Split(subject, ".")
	if i < len(parts) {
		return parts[i]
	}
	return ""
}
