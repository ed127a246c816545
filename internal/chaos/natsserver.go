package chaos

import (
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/virtbus/virtbus/internal/bus"
)

// natsServer is the run's embedded NATS server with JetStream. A restart
// shuts it down and brings up a new one on the same port and store, as an
// operator's restart of the service would.
type natsServer struct {
	dir  string
	port int

	mu  sync.Mutex
	srv *server.Server
}

// startNATS runs the server with its store under dir on a free loopback
// port.
func startNATS(dir string) (*natsServer, error) {
	srv, err := bus.RunEmbedded(dir, "127.0.0.1", -1)
	if err != nil {
		return nil, err
	}
	addr, ok := srv.Addr().(*net.TCPAddr)
	if !ok {
		srv.Shutdown()
		return nil, fmt.Errorf("embedded nats server: no TCP address (%v)", srv.Addr())
	}
	return &natsServer{dir: dir, port: addr.Port, srv: srv}, nil
}

// URL is where clients reach it, the same across restarts.
func (n *natsServer) URL() string { return "nats://127.0.0.1:" + strconv.Itoa(n.port) }

// restart shuts the server down and starts a new one on the same port and
// store; it returns how long no server was there.
func (n *natsServer) restart() (time.Duration, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	down := time.Now()
	n.srv.Shutdown()
	n.srv.WaitForShutdown()
	srv, err := bus.RunEmbedded(n.dir, "127.0.0.1", n.port)
	if err != nil {
		return time.Since(down), fmt.Errorf("restart nats on port %d: %w", n.port, err)
	}
	n.srv = srv
	return time.Since(down), nil
}

func (n *natsServer) shutdown() {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.srv.Shutdown()
	n.srv.WaitForShutdown()
}
