package bustest

import (
	"encoding/json"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
)

// ServiceHosts sends one request on subject (a micro PING or INFO of
// service) and returns, sorted, the "host" metadata of the answers that
// come within window. An answer that is not a typ of service fails the
// test.
func ServiceHosts(t testing.TB, nc *nats.Conn, subject, service, typ string, window time.Duration) []string {
	t.Helper()
	inbox := nc.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := nc.PublishRequest(subject, inbox, nil); err != nil {
		t.Fatal(err)
	}
	var hosts []string
	for deadline := time.Now().Add(window); ; {
		m, err := sub.NextMsg(time.Until(deadline))
		if err != nil {
			break
		}
		var a struct {
			micro.ServiceIdentity
			Type string `json:"type"`
		}
		if err := json.Unmarshal(m.Data, &a); err != nil || a.Type != typ || a.Name != service {
			t.Errorf("%s answered %s, want a %s of %s", subject, m.Data, typ, service)
			continue
		}
		hosts = append(hosts, a.Metadata["host"])
	}
	slices.Sort(hosts)
	return hosts
}
