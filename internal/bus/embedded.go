package bus

import (
	"fmt"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// embeddedReadyTimeout is how long RunEmbedded waits for the server to take
// connections; recovering a large store takes a while.
const embeddedReadyTimeout = 30 * time.Second

// RunEmbedded starts a NATS server with JetStream in this process, its
// state under storeDir, listening on host:port (port -1 picks a free one),
// and returns once it accepts connections. It serves a single host that
// runs no NATS of its own, and the tests. Connect to s.ClientURL(); stop it
// with Shutdown and WaitForShutdown.
func RunEmbedded(storeDir, host string, port int) (*server.Server, error) {
	opts := &server.Options{
		ServerName: "virtbus-embedded",
		Host:       host,
		Port:       port,
		JetStream:  true,
		StoreDir:   storeDir,
		NoLog:      true,
		// The worker owns the process's signals.
		NoSigs: true,
	}
	s, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("embedded nats server: %w", err)
	}
	go s.Start()
	if !s.ReadyForConnections(embeddedReadyTimeout) {
		s.Shutdown()
		return nil, fmt.Errorf("embedded nats server on %s:%d not ready after %s", host, port, embeddedReadyTimeout)
	}
	if !s.JetStreamEnabled() {
		s.Shutdown()
		return nil, fmt.Errorf("embedded nats server: jetstream did not start (store %s)", storeDir)
	}
	return s, nil
}
