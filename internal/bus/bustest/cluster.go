package bustest

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// clusterReadyTimeout bounds the wait for a node to take connections and
// for the cluster's JetStream to agree on a leader. Raft elections after a
// node loss take seconds, more on a loaded machine.
const clusterReadyTimeout = 60 * time.Second

// globalAccount is the account of every client of a server without
// accounts configured.
const globalAccount = "$G"

// Cluster is a NATS cluster of embedded servers with JetStream on
// loopback, each node with a store directory of its own. A node can be shut
// down, its store removed, and started again on the same client and route
// ports, as an operator would replace a lost machine.
type Cluster struct {
	t    testing.TB
	name string

	mu    sync.Mutex
	nodes []*clusterNode
}

type clusterNode struct {
	name       string
	port       int // clients
	routePort  int
	storeDir   string
	srv        *server.Server // nil while down
	routeLinks string
}

// RunCluster starts n clustered nodes and waits until their JetStream has
// a leader and every node is current. They are shut down when the test
// ends.
func RunCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	c := &Cluster{t: t, name: "virtbus-test-cluster"}
	routes := make([]string, n)
	for i := range n {
		c.nodes = append(c.nodes, &clusterNode{
			name:      "n" + strconv.Itoa(i),
			port:      FreePort(t),
			routePort: FreePort(t),
			storeDir:  t.TempDir(),
		})
		routes[i] = "nats://127.0.0.1:" + strconv.Itoa(c.nodes[i].routePort)
	}
	for _, nd := range c.nodes {
		nd.routeLinks = strings.Join(routes, ",")
	}
	t.Cleanup(func() {
		for i := range c.nodes {
			c.Stop(i)
		}
	})
	// All at once: a JetStream node waits for its peers before it elects.
	errs := make(chan error, n)
	for i := range n {
		go func() { errs <- c.start(i) }()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	c.WaitCurrent(t)
	return c
}

// Len is the number of nodes.
func (c *Cluster) Len() int { return len(c.nodes) }

// Name is node i's server name.
func (c *Cluster) Name(i int) string { return c.nodes[i].name }

// URL is node i's client URL, the same across restarts.
func (c *Cluster) URL(i int) string { return "nats://127.0.0.1:" + strconv.Itoa(c.nodes[i].port) }

// URLs is every node's client URL, comma-separated, node first's first.
func (c *Cluster) URLs(first int) string {
	urls := []string{c.URL(first)}
	for i := range c.nodes {
		if i != first {
			urls = append(urls, c.URL(i))
		}
	}
	return strings.Join(urls, ",")
}

// Server is node i's running server, nil while it is down.
func (c *Cluster) Server(i int) *server.Server {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nodes[i].srv
}

func (c *Cluster) start(i int) error {
	nd := c.nodes[i]
	opts := &server.Options{
		ServerName: nd.name,
		Host:       "127.0.0.1",
		Port:       nd.port,
		JetStream:  true,
		StoreDir:   nd.storeDir,
		Cluster:    server.ClusterOpts{Name: c.name, Host: "127.0.0.1", Port: nd.routePort},
		Routes:     server.RoutesFromStr(nd.routeLinks),
		NoLog:      true,
		NoSigs:     true,
	}
	s, err := server.NewServer(opts)
	if err != nil {
		return fmt.Errorf("nats node %s: %w", nd.name, err)
	}
	go s.Start()
	if !s.ReadyForConnections(clusterReadyTimeout) {
		s.Shutdown()
		return fmt.Errorf("nats node %s on port %d not ready after %s", nd.name, nd.port, clusterReadyTimeout)
	}
	c.mu.Lock()
	nd.srv = s
	c.mu.Unlock()
	return nil
}

// Stop shuts node i down, if it runs, and waits until it is gone.
func (c *Cluster) Stop(i int) {
	c.mu.Lock()
	s := c.nodes[i].srv
	c.nodes[i].srv = nil
	c.mu.Unlock()
	if s != nil {
		s.Shutdown()
		s.WaitForShutdown()
	}
}

// Wipe removes the store of node i, which must be down: it comes back as
// a new machine would, knowing nothing.
func (c *Cluster) Wipe(i int) {
	c.t.Helper()
	if c.Server(i) != nil {
		c.t.Fatalf("wipe the store of nats node %s while it runs", c.nodes[i].name)
	}
	dir := c.nodes[i].storeDir
	if err := os.RemoveAll(dir); err != nil {
		c.t.Fatalf("remove the store of nats node %s: %v", c.nodes[i].name, err)
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		c.t.Fatal(err)
	}
}

// Start starts node i again on its ports and store.
func (c *Cluster) Start(i int) {
	c.t.Helper()
	if err := c.start(i); err != nil {
		c.t.Fatal(err)
	}
}

// NodeOf is the index of the running node that has a client connection
// named name, or -1.
func (c *Cluster) NodeOf(name string) int {
	c.t.Helper()
	for i := range c.nodes {
		s := c.Server(i)
		if s == nil {
			continue
		}
		conns, err := s.Connz(&server.ConnzOptions{Limit: 10000})
		if err != nil {
			c.t.Fatalf("connections of nats node %s: %v", c.nodes[i].name, err)
		}
		for _, ci := range conns.Conns {
			if ci.Name == name {
				return i
			}
		}
	}
	return -1
}

// WaitCurrent waits until JetStream's meta group has a leader among the
// running nodes and every running node is current in it and in each of
// streams (of the global account): a node brought back has caught up.
func (c *Cluster) WaitCurrent(t testing.TB, streams ...string) {
	t.Helper()
	Eventually(t, clusterReadyTimeout, "every running nats node current in JetStream and in "+strings.Join(streams, ", "), func() bool {
		leader := false
		for i := range c.nodes {
			s := c.Server(i)
			if s == nil {
				continue
			}
			if !s.JetStreamIsCurrent() {
				return false
			}
			leader = leader || s.JetStreamIsLeader()
			for _, st := range streams {
				if !s.JetStreamIsStreamAssigned(globalAccount, st) || !s.JetStreamIsStreamCurrent(globalAccount, st) {
					return false
				}
			}
		}
		return leader
	})
}

// StreamLeader is the index of the node that leads stream (of the global
// account), once one does.
func (c *Cluster) StreamLeader(t testing.TB, stream string) int {
	t.Helper()
	leader := -1
	Eventually(t, clusterReadyTimeout, "a leader of stream "+stream, func() bool {
		for i := range c.nodes {
			if s := c.Server(i); s != nil && s.JetStreamIsStreamLeader(globalAccount, stream) {
				leader = i
				return true
			}
		}
		return false
	})
	return leader
}
