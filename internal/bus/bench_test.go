package bus

import (
	"encoding/json"
	"log/slog"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

// BenchmarkDecode is the worker's decode of one command as the fetch loop
// hands it over: subject, headers (id and reply subject) and body.
func BenchmarkDecode(b *testing.B) {
	w := &Worker{log: slog.New(slog.DiscardHandler), cfg: Config{Host: "hv1", ReplyPrefixes: DefaultConfig().ReplyPrefixes}}
	hdr := nats.Header{}
	hdr.Set(HeaderMsgID, "stop-web-1-1767225600000000000")
	hdr.Set(HeaderReply, "_INBOX.abcdefghijklmnopqrstuv.1")
	body := []byte(`{"mode":"graceful","timeout":"90s"}`)
	now := time.Now()
	b.ReportAllocs()
	for b.Loop() {
		if j := w.decode("virtbus.cmd.hv1.web-1.stop", hdr, body, now); j.invalid != nil {
			b.Fatal(j.invalid)
		}
	}
}

// BenchmarkCompletion is a completion made and encoded as the worker
// publishes it: the Completion built from the command and its outcome,
// then its JSON.
func BenchmarkCompletion(b *testing.B) {
	w := &Worker{cfg: Config{Host: "hv1"}}
	now := time.Now()
	cmd := Command{ID: "stop-web-1-1767225600000000000", Host: "hv1", VM: "web-1", Action: "stop",
		Params: json.RawMessage(`{"mode":"graceful"}`), Attempt: 1, ReceivedAt: now}
	out := Outcome{Changed: true, State: "shutoff", Detail: map[string]any{"forced": true}}
	b.ReportAllocs()
	for b.Loop() {
		c := w.completion(cmd, out, now, now.Add(1606*time.Millisecond))
		if _, err := json.Marshal(c); err != nil {
			b.Fatal(err)
		}
	}
}
