package vm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket"
	"github.com/digitalocean/go-libvirt/socket/dialers"

	"github.com/virtbus/virtbus/internal/backoff"
)

// closeWait bounds the polite close (ConnectClose) at shutdown: a daemon
// that answers at all answers it at once.
const closeWait = 2 * time.Second

// Conn keeps one live connection to libvirtd. go-libvirt has no contexts and
// no timeouts, and a client that lost its connection must not be reused
// (re-connecting it races with its own clean-up), so Conn builds a new client
// after every loss, reconnects with back-off, and makes callers wait for it
// instead of failing them.
//
// Nothing waits on libvirtd without a bound, teardown included. go-libvirt's
// Disconnect asks the daemon to close and waits for the answer, which a hung
// daemon (stopped, deadlocked) never gives. So Conn keeps the socket under
// each client and closes it outright when a call outlives its deadline: that
// fails every call pending on the client at once and ends the client, and
// Run dials a new one.
type Conn struct {
	socket  string
	uri     libvirt.ConnectURI
	timeout time.Duration
	log     *slog.Logger

	// OnState, when set before Run, is told every change of the connection
	// (true: connected). The worker turns it into a metric.
	OnState func(up bool)

	mu    sync.Mutex
	cur   *session      // nil while disconnected
	ready chan struct{} // closed while cur is usable; replaced on loss

	calls atomic.Uint64 // libvirt calls made, for measuring what an action costs
}

// Calls is how many libvirt calls the connection made so far.
func (c *Conn) Calls() uint64 { return c.calls.Load() }

// session is one go-libvirt client, the socket under it, and the device
// event subscriptions made on it, which end with it.
type session struct {
	l        *libvirt.Libvirt
	sock     *socketDialer
	removals *removalHub
}

// socketDialer dials libvirtd for one client and keeps the socket, so that
// it can be closed without asking the daemon: the client's reader then
// fails, which fails its pending calls and closes its Disconnected channel.
type socketDialer struct {
	dialer socket.Dialer
	mu     sync.Mutex
	conn   net.Conn
	closed bool
}

func (d *socketDialer) Dial() (net.Conn, error) {
	conn, err := d.dialer.Dial()
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		// Given up while the dial was under way.
		_ = conn.Close()
		return nil, net.ErrClosed
	}
	d.conn = conn
	return conn, nil
}

func (d *socketDialer) close() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed = true
	if d.conn != nil {
		_ = d.conn.Close()
	}
}

// NewConn returns a Conn for the libvirt socket at socket, speaking to the
// driver at uri. timeout bounds every call made through it, and every wait
// for a connection.
func NewConn(socket, uri string, timeout time.Duration, log *slog.Logger) *Conn {
	return &Conn{
		socket:  socket,
		uri:     libvirt.ConnectURI(uri),
		timeout: timeout,
		log:     log,
		ready:   make(chan struct{}),
	}
}

// Run connects and keeps reconnecting until ctx ends; then it disconnects,
// within a bound however the daemon behaves, and returns.
func (c *Conn) Run(ctx context.Context) {
	var wg sync.WaitGroup // the keepalives, which end with their socket
	defer wg.Wait()
	retry := backoff.Backoff{Min: 200 * time.Millisecond, Max: 10 * time.Second}
	for ctx.Err() == nil {
		s, err := c.dial(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			c.log.Warn("libvirt connect failed", "socket", c.socket, "uri", c.uri, "err", err)
			select {
			case <-ctx.Done():
			case <-time.After(retry.Next()):
			}
			continue
		}
		retry.Reset()
		c.set(s)
		c.log.Info("libvirt connected", "socket", c.socket, "uri", c.uri)
		if c.serve(ctx, s, &wg) {
			c.log.Warn("libvirt connection lost; reconnecting")
		}
	}
}

// serve keeps s until it is lost (true) or ctx ends (false), asking the
// daemon something every timeout meanwhile: a daemon that stopped answering
// is noticed, and Up turns false, without a command having to run into it.
// The event subscriptions on s end with it, and their waiters are told to
// watch on the next connection.
func (c *Conn) serve(ctx context.Context, s *session, wg *sync.WaitGroup) (lost bool) {
	defer s.removals.end()
	keepalive := time.NewTicker(c.timeout)
	defer keepalive.Stop()
	for {
		select {
		case <-ctx.Done():
			c.drop(s)
			c.hangUp(s)
			return false
		case <-s.l.Disconnected():
			c.drop(s)
			return true
		case <-keepalive.C:
			wg.Go(func() {
				_ = c.run(s, "keepalive", func(l *libvirt.Libvirt) error {
					_, err := l.ConnectGetLibVersion()
					return err
				})
			})
		}
	}
}

// dial connects a new client. The handshake runs on a goroutine of its own:
// a daemon that accepts the socket but does not answer would hold it for
// good, so the socket is closed when the timeout passes or ctx ends, which
// ends the handshake too.
func (c *Conn) dial(ctx context.Context) (*session, error) {
	sock := &socketDialer{dialer: dialers.NewLocal(dialers.WithSocket(c.socket), dialers.WithLocalTimeout(c.timeout))}
	s := &session{l: libvirt.NewWithDialer(sock), sock: sock, removals: newRemovalHub()}
	done := make(chan error, 1)
	go func() { done <- s.l.ConnectToURI(c.uri) }()
	timer := time.NewTimer(c.timeout)
	defer timer.Stop()
	select {
	case err := <-done:
		if err != nil {
			sock.close()
			return nil, fmt.Errorf("connect %s via %s: %w", c.uri, c.socket, err)
		}
		return s, nil
	case <-timer.C:
		sock.close()
		return nil, fmt.Errorf("connect %s via %s: no answer within %s", c.uri, c.socket, c.timeout)
	case <-ctx.Done():
		sock.close()
		return nil, fmt.Errorf("connect %s via %s: %w", c.uri, c.socket, context.Cause(ctx))
	}
}

// hangUp ends s at shutdown: politely (ConnectClose) when the daemon answers
// within closeWait, and by closing its socket in any case. go-libvirt's
// Disconnect waits for that answer without a bound, so it runs on its own
// goroutine, which closing the socket ends.
func (c *Conn) hangUp(s *session) {
	defer s.sock.close()
	if !s.l.IsConnected() {
		return
	}
	done := make(chan struct{})
	go func() {
		_ = s.l.Disconnect()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(min(c.timeout, closeWait)):
		c.log.Warn("libvirtd did not answer the close; dropping the connection", "wait", min(c.timeout, closeWait))
	}
}

// set makes s the connection callers get.
func (c *Conn) set(s *session) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cur = s
	close(c.ready)
	if c.OnState != nil {
		c.OnState(true)
	}
}

// drop stops handing s out; callers wait for the next connection. A session
// dropped already (or never current) changes nothing.
func (c *Conn) drop(s *session) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cur != s {
		return
	}
	c.cur = nil
	c.ready = make(chan struct{})
	if c.OnState != nil {
		c.OnState(false)
	}
}

// lose gives s up at once, without asking the daemon: see socketDialer.
func (c *Conn) lose(s *session) {
	c.drop(s)
	s.sock.close()
}

// Up reports whether a connection is established right now.
func (c *Conn) Up() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cur != nil
}

// client waits for a connected client. While libvirtd is down callers wait
// here, for up to the call timeout: a longer outage ends in ErrUnavailable,
// which the worker retries with back-off rather than holding a command
// (and its VM's queue) for good.
func (c *Conn) client(ctx context.Context) (*session, error) {
	ctx, cancel := context.WithTimeoutCause(ctx, c.timeout, fmt.Errorf("libvirtd not reachable for %s", c.timeout))
	defer cancel()
	for {
		c.mu.Lock()
		s, ready := c.cur, c.ready
		c.mu.Unlock()
		if s != nil && s.l.IsConnected() {
			return s, nil
		}
		select {
		case <-ready:
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: no libvirt connection: %v", ErrUnavailable, context.Cause(ctx))
		}
	}
}

// call runs fn against a connected client under the per-call deadline (see
// run). A call that fails because the connection died under it is tried
// again on the next client: every call made through here is safe to repeat,
// and callers should not see a libvirtd restart at all. A call that got no
// answer is not: the daemon hangs, and ErrUnavailable lets the worker retry
// the command with back-off.
func (c *Conn) call(ctx context.Context, what string, fn func(l *libvirt.Libvirt) error) error {
	return c.withSession(ctx, what, func(s *session) error { return c.run(s, what, fn) })
}

// withSession is call for work that needs the session itself, not only its
// client (an event subscription belongs to one connection): fn runs its
// libvirt calls through c.run, and a failure that came with the loss of s
// is tried again on the next session.
func (c *Conn) withSession(ctx context.Context, what string, fn func(s *session) error) error {
	for {
		s, err := c.client(ctx)
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		err = fn(s)
		if err == nil {
			return nil
		}
		if errors.Is(err, ErrUnavailable) {
			return fmt.Errorf("%s: %w", what, err)
		}
		if !s.l.IsConnected() {
			c.log.Debug("libvirt call lost its connection; retrying on the next one", "call", what, "err", err)
			continue
		}
		return fmt.Errorf("%s: %w", what, classify(err))
	}
}

// run runs fn on s within c.timeout. A call that outlives it means the
// daemon hangs: s is given up (lose), which ends fn and every other call on
// s at once. run waits for fn even when the caller's context ends: a call
// in flight cannot be abandoned, fn writes what the caller reads, and the
// deadline bounds the wait. run's own error carries ErrUnavailable; fn's
// come as they are.
func (c *Conn) run(s *session, what string, fn func(l *libvirt.Libvirt) error) error {
	c.calls.Add(1)
	var fired atomic.Bool
	lost := make(chan struct{}) // closed once s is given up: Up is false by then
	deadline := time.AfterFunc(c.timeout, func() {
		fired.Store(true)
		c.log.Warn("libvirt call timed out; dropping the connection", "call", what, "timeout", c.timeout)
		c.lose(s)
		close(lost)
	})
	err := fn(s.l)
	deadline.Stop()
	if err != nil && fired.Load() {
		// It failed because the deadline closed its socket.
		<-lost
		return fmt.Errorf("%w: no answer within %s", ErrUnavailable, c.timeout)
	}
	return err
}
