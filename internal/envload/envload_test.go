package envload

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

type spec struct {
	Host      string        `desc:"host id"`
	QueueSize int           `split_words:"true" default:"64"`
	Wait      time.Duration `default:"30s"`
	Roots     []string      `default:"/a,/b"`
	NATS      struct {
		URL string
		TLS struct{ CA string }
	}
	Ignored string `ignored:"true"`
}

func env(kv ...string) func(string) string {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return func(k string) string { return m[k] }
}

func TestLoad(t *testing.T) {
	var s spec
	err := Load("virtbus", env("VIRTBUS_HOST", "hv1", "VIRTBUS_QUEUE_SIZE", "8", "VIRTBUS_NATS_TLS_CA", "/ca.pem",
		"VIRTBUS_IGNORED", "x", "VIRTBUS_WAIT", ""), &s)
	if err != nil {
		t.Fatal(err)
	}
	got := fmt.Sprintf("%s %d %s %v %q %q %q", s.Host, s.QueueSize, s.Wait, s.Roots, s.NATS.URL, s.NATS.TLS.CA, s.Ignored)
	if want := `hv1 8 30s [/a /b] "" "/ca.pem" ""`; got != want {
		t.Errorf("loaded %s, want %s", got, want)
	}
}

func TestLoadNamesTheBadVariable(t *testing.T) {
	var s spec
	err := Load("virtbus", env("VIRTBUS_QUEUE_SIZE", "many"), &s)
	if err == nil || !strings.HasPrefix(err.Error(), `VIRTBUS_QUEUE_SIZE="many": `) {
		t.Errorf("error %v, want one naming VIRTBUS_QUEUE_SIZE", err)
	}
}

// The process environment does not leak in: neither the program's own
// variables nor bare names envconfig could fall back to.
func TestLoadReadsOnlyGetenv(t *testing.T) {
	t.Setenv("HOST", "leaked")
	t.Setenv("VIRTBUS_QUEUE_SIZE", "3")
	var s spec
	if err := Load("virtbus", env(), &s); err != nil {
		t.Fatal(err)
	}
	if s.Host != "" || s.QueueSize != 64 {
		t.Errorf("loaded host %q, queue size %d; want the defaults", s.Host, s.QueueSize)
	}
}

func TestLoadSideBySide(t *testing.T) {
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Go(func() {
			var s spec
			if err := Load("virtbus", env("VIRTBUS_QUEUE_SIZE", fmt.Sprint(i+1)), &s); err != nil {
				t.Error(err)
			}
			if s.QueueSize != i+1 {
				t.Errorf("call %d loaded queue size %d", i, s.QueueSize)
			}
		})
	}
	wg.Wait()
}

func TestKeys(t *testing.T) {
	keys, err := Keys("virtbus", &spec{})
	if err != nil {
		t.Fatal(err)
	}
	want := "VIRTBUS_HOST VIRTBUS_QUEUE_SIZE VIRTBUS_WAIT VIRTBUS_ROOTS VIRTBUS_NATS_URL VIRTBUS_NATS_TLS_CA"
	if got := strings.Join(keys, " "); got != want {
		t.Errorf("keys %s, want %s", got, want)
	}
}
