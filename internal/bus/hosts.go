package bus

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
)

// HostReport is one live instance of ServiceName, as its STATS answer
// tells it: micro's identity of the instance and the worker's HostStatus.
type HostReport struct {
	HostStatus
	ID      string    `json:"id"`      // the micro instance id
	Started time.Time `json:"started"` // when the instance registered
}

// DiscoverHosts asks every instance of ServiceName for its stats
// ($SRV.STATS.virtbus; nats.go's micro has no client side) and gathers
// the answers that come within window, sorted by host. An answer that is
// not a virtbus worker's is left out. No answer is no error: no worker is
// up.
func DiscoverHosts(ctx context.Context, nc *nats.Conn, window time.Duration) ([]HostReport, error) {
	subject, err := micro.ControlSubject(micro.StatsVerb, ServiceName, "")
	if err != nil {
		return nil, err
	}
	inbox := nc.NewInbox()
	msgs := make(chan *nats.Msg, 256)
	sub, err := nc.ChanSubscribe(inbox, msgs)
	if err != nil {
		return nil, fmt.Errorf("subscribe %s: %w", inbox, err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := nc.PublishRequest(subject, inbox, nil); err != nil {
		return nil, fmt.Errorf("publish %s: %w", subject, err)
	}
	timer := time.NewTimer(window)
	defer timer.Stop()
	seen := map[string]bool{}
	var reports []HostReport
	for {
		select {
		case m := <-msgs:
			if r, ok := hostReport(m.Data); ok && !seen[r.ID] {
				seen[r.ID] = true
				reports = append(reports, r)
			}
		case <-timer.C:
			slices.SortFunc(reports, func(a, b HostReport) int {
				return cmp.Or(cmp.Compare(a.Host, b.Host), cmp.Compare(a.Role, b.Role), cmp.Compare(a.ID, b.ID))
			})
			return reports, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// hostReport decodes one STATS answer.
func hostReport(data []byte) (HostReport, bool) {
	var st micro.Stats
	if json.Unmarshal(data, &st) != nil || st.Type != micro.StatsResponseType || st.Name != ServiceName || st.ID == "" {
		return HostReport{}, false
	}
	r := HostReport{ID: st.ID, Started: st.Started}
	for _, e := range st.Endpoints {
		if e != nil && e.Name == StatusEndpoint && json.Unmarshal(e.Data, &r.HostStatus) == nil && r.Host != "" {
			return r, true
		}
	}
	return HostReport{}, false
}
