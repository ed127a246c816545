package bus

import (
	"fmt"
	"maps"
	"slices"
	"sync"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/virtbus/virtbus/internal/queue"
)

// durationBuckets span a status query (milliseconds) to a reboot that
// falls back to a hard reset after its timeout (minutes).
var durationBuckets = []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300}

type metrics struct {
	received     *prometheus.CounterVec
	completed    *prometheus.CounterVec
	errors       *prometheus.CounterVec
	duration     *prometheus.HistogramVec
	queueWait    *prometheus.HistogramVec
	redeliveries prometheus.Counter
	duplicates   prometheus.Counter
	reconnects   *prometheus.CounterVec

	// actions are the label values the action label may take besides
	// unknownLabel: the handler's actions, never client text.
	actions map[string]bool
}

// unknownLabel stands for any action (or error code) outside the known set,
// so a client cannot grow the number of series.
const unknownLabel = "unknown"

// codes are the error codes a completion may carry.
var codes = []string{CodeInvalid, CodeNotFound, CodeForbidden, CodeConflict, CodeTimeout, CodeLibvirt, CodeUnavailable, CodeExpired}

// action is the label value for a command's action.
func (m *metrics) action(a string) string {
	if m.actions[a] {
		return a
	}
	return unknownLabel
}

// metricCode is the label value for an error code.
func metricCode(c string) string {
	if slices.Contains(codes, c) {
		return c
	}
	return unknownLabel
}

// initLabels creates every series of the known label sets at zero, so that
// rate() and increase() see a command's first error, not just its second.
func (m *metrics) initLabels() {
	for _, a := range append(slices.Sorted(maps.Keys(m.actions)), unknownLabel) {
		m.received.WithLabelValues(a)
		m.duration.WithLabelValues(a)
		m.queueWait.WithLabelValues(a)
		for _, st := range []string{StatusOK, StatusError} {
			m.completed.WithLabelValues(a, st)
		}
		for _, c := range codes {
			m.errors.WithLabelValues(a, c)
		}
	}
	m.reconnects.WithLabelValues("nats")
}

// newMetrics builds the bus's metrics and registers them on reg (none when
// reg is nil). The names are a contract with the dashboards and alerts in
// deploy/.
func newMetrics(reg prometheus.Registerer, nc *nats.Conn, q *queue.Queue[*job], actions []string) (*metrics, error) {
	m := &metrics{
		actions: make(map[string]bool, len(actions)),
		received: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "virtbus_commands_received_total",
			Help: "Command messages taken off NATS, redeliveries included.",
		}, []string{"action"}),
		completed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "virtbus_commands_completed_total",
			Help: "Commands answered with a final completion, by status.",
		}, []string{"action", "status"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "virtbus_command_errors_total",
			Help: "Commands whose final completion is an error, by error code.",
		}, []string{"action", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "virtbus_command_duration_seconds",
			Help:    "Time the handler took for a command's final attempt.",
			Buckets: durationBuckets,
		}, []string{"action"}),
		queueWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "virtbus_queue_wait_seconds",
			Help:    "Time from taking a command off NATS to starting it.",
			Buckets: durationBuckets,
		}, []string{"action"}),
		redeliveries: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "virtbus_redeliveries_total",
			Help: "Command messages delivered more than once (retries, expired ack waits, restarts).",
		}),
		duplicates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "virtbus_duplicates_suppressed_total",
			Help: "Commands answered from their recorded completion instead of being run again.",
		}),
		reconnects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "virtbus_reconnects_total",
			Help: "Reconnections of the worker's connections, by target.",
		}, []string{"target"}),
	}
	for _, a := range actions {
		m.actions[a] = true
	}
	m.initLabels()
	if reg == nil {
		return m, nil
	}
	collectors := append([]prometheus.Collector{
		m.received, m.completed, m.errors, m.duration, m.queueWait, m.redeliveries, m.duplicates,
		&natsReconnects{vec: m.reconnects, nc: nc},
	}, gauges(nc, q)...)
	for _, c := range collectors {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register bus metrics: %w", err)
		}
	}
	return m, nil
}

// gauges read the FIFO and the connection at each scrape.
func gauges(nc *nats.Conn, q *queue.Queue[*job]) []prometheus.Collector {
	return []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "virtbus_queue_depth",
			Help: "Commands held by the FIFO, queued plus running.",
		}, func() float64 { return float64(q.Len()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "virtbus_queue_parked",
			Help: "Commands held beyond their VM's share of the FIFO, so that other VMs' commands behind them can run.",
		}, func() float64 { return float64(q.Parked()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "virtbus_queue_capacity",
			Help: "Most commands the FIFO holds, queued plus running.",
		}, func() float64 { return float64(q.Cap()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "virtbus_in_flight",
			Help: "Commands being run right now.",
		}, func() float64 { return float64(q.Running()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "virtbus_nats_up",
			Help: "1 while the NATS connection is up.",
		}, func() float64 {
			if nc.IsConnected() {
				return 1
			}
			return 0
		}),
	}
}

// natsReconnects fills target="nats" of virtbus_reconnects_total from the
// connection's own count at each scrape: the reconnect callback belongs to
// whoever dialled the connection, and other targets share the vector.
type natsReconnects struct {
	vec *prometheus.CounterVec
	nc  *nats.Conn

	mu   sync.Mutex
	seen uint64
}

func (r *natsReconnects) Describe(ch chan<- *prometheus.Desc) { r.vec.Describe(ch) }

func (r *natsReconnects) Collect(ch chan<- prometheus.Metric) {
	r.mu.Lock()
	n := r.nc.Stats().Reconnects
	r.vec.WithLabelValues("nats").Add(float64(n - r.seen))
	r.seen = n
	r.mu.Unlock()
	r.vec.Collect(ch)
}
