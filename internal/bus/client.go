package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"
)

// The errors of a Client, to branch on with errors.Is. Each wraps the
// cause as well, so that context.Canceled, say, can still be told from
// context.DeadlineExceeded.
var (
	// ErrNoStream: JetStream has no stream on the command's subject, so the
	// command was not queued, and nothing will ever run it.
	ErrNoStream = errors.New("no JetStream stream takes the subject")
	// ErrPublish: the command was not sent, for another reason than
	// ErrNoStream.
	ErrPublish = errors.New("publish failed")
	// ErrTimeout: the context ended before the server took the command
	// (PubAck, flush) or before its completion came. The command may have
	// been queued, and may still run.
	ErrTimeout = errors.New("timed out")
	// ErrNoWorker: core mode, and no worker subscribes to the subject.
	ErrNoWorker = errors.New("no worker is subscribed")
	// ErrBadReply: core mode, and the reply is not a completion.
	ErrBadReply = errors.New("not a completion")
)

// flushTimeout bounds a core-mode flush when the caller's context has no
// deadline: nats.go refuses to flush without one.
const flushTimeout = 10 * time.Second

// Cmd is one command to send.
type Cmd struct {
	VM, Action string
	// ID is the command id (Nats-Msg-Id); empty: a fresh NUID.
	ID string
	// Params is the body, sent as given; the worker reads empty as {}.
	Params json.RawMessage
	// Expires, when set, is the deadline the worker checks before it runs
	// the command (Virtbus-Expires).
	Expires time.Time
}

// Result is the completion of a command.
type Result struct {
	Completion *Completion
	// Raw is the completion as the worker published it, or re-encoded
	// when it came from the record.
	Raw []byte
	// Ack is the stream's PubAck; nil in core mode.
	Ack *jetstream.PubAck
	// FromRecord: the stream dropped the command as a duplicate of an
	// earlier one with its id, and this is the earlier one's completion.
	FromRecord bool
}

// Client sends commands to one host's workers and awaits their
// completions, the way README.md tells producers to. It is safe for
// concurrent use; Close it when done.
type Client struct {
	nc       *nats.Conn
	js       jetstream.JetStream
	host     string
	core     bool
	onEvents bool
	notice   func(error)

	// The reply inbox that all commands awaited on an inbox share, made
	// at the first one. Completions on it are routed by command id.
	mu      sync.Mutex
	inbox   string
	sub     *nats.Subscription
	waiting map[string][]*Pending
}

// ClientOption configures a Client.
type ClientOption func(*Client)

// Core sends with core NATS instead of JetStream, for workers with
// VIRTBUS_DELIVERY=core: at most once, and the completion comes back as
// the reply to the message's own reply subject.
func Core(on bool) ClientOption { return func(c *Client) { c.core = on } }

// ReplyOnEvents awaits each completion on its command's event subject
// rather than on a reply inbox, and sends no reply subject. This is for a
// connection whose inbox no worker answers, such as a worker's own, which
// deploy/nats-server.conf keeps the workers from publishing to.
func ReplyOnEvents() ClientOption { return func(c *Client) { c.onEvents = true } }

// OnNotice has f told what the client works around but a person may want
// to know. It is called only from the goroutine in Pending.Wait.
func OnNotice(f func(error)) ClientOption { return func(c *Client) { c.notice = f } }

// NewClient returns a client for the workers of host on nc.
func NewClient(nc *nats.Conn, host string, opts ...ClientOption) (*Client, error) {
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	c := &Client{nc: nc, js: js, host: host, notice: func(error) {}, waiting: map[string][]*Pending{}}
	for _, o := range opts {
		o(c)
	}
	return c, nil
}

// Close drops the shared reply inbox; Pending commands get no completion
// after it.
func (c *Client) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sub != nil {
		_ = c.sub.Unsubscribe()
		c.sub = nil
	}
}

// Send hands cmd to the bus without waiting for its completion. In
// JetStream mode it returns the stream's PubAck (Duplicate: the stream
// dropped it as a repeat of an id it already had); in core mode it returns
// a nil PubAck once the server has the message.
func (c *Client) Send(ctx context.Context, cmd Cmd) (*jetstream.PubAck, error) {
	if cmd.ID == "" {
		cmd.ID = nuid.Next()
	}
	return c.publish(ctx, c.message(cmd))
}

// Do sends cmd and returns its completion.
func (c *Client) Do(ctx context.Context, cmd Cmd) (*Result, error) {
	p, err := c.Start(ctx, cmd)
	if err != nil {
		return nil, err
	}
	defer p.Close()
	return p.Wait(ctx)
}

// Start sends cmd and returns once the bus has it (as Send does), ready to
// Wait for its completion. It listens before it publishes, so a fast
// worker's answer is not missed. Close the Pending when done.
func (c *Client) Start(ctx context.Context, cmd Cmd) (*Pending, error) {
	if cmd.ID == "" {
		cmd.ID = nuid.Next()
	}
	msg := c.message(cmd)
	p := &Pending{c: c, cmd: cmd, subject: msg.Subject, answer: make(chan answer, 1)}
	if err := p.listen(msg); err != nil {
		return nil, fmt.Errorf("%w: %s: listen for the completion: %w", ErrPublish, msg.Subject, err)
	}
	ack, err := c.publish(ctx, msg)
	if err != nil {
		p.Close()
		return nil, err
	}
	p.ack = ack
	return p, nil
}

func (c *Client) message(cmd Cmd) *nats.Msg {
	m := nats.NewMsg(CommandSubject(c.host, cmd.VM, cmd.Action))
	m.Header.Set(HeaderMsgID, cmd.ID)
	if !cmd.Expires.IsZero() {
		m.Header.Set(HeaderExpires, cmd.Expires.UTC().Format(time.RFC3339))
	}
	m.Data = cmd.Params
	return m
}

// publish sends msg: to the stream, for its PubAck; in core mode, then
// flushed, because nothing else would say that the server has it.
func (c *Client) publish(ctx context.Context, msg *nats.Msg) (*jetstream.PubAck, error) {
	if !c.core {
		ack, err := c.js.PublishMsg(ctx, msg)
		if err != nil {
			return nil, sendError(ctx, msg.Subject, err)
		}
		return ack, nil
	}
	if err := c.nc.PublishMsg(msg); err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrPublish, msg.Subject, err)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, flushTimeout)
		defer cancel()
	}
	if err := c.nc.FlushWithContext(ctx); err != nil {
		return nil, sendError(ctx, msg.Subject, err)
	}
	return nil, nil
}

func sendError(ctx context.Context, subject string, err error) error {
	switch {
	case errors.Is(err, jetstream.ErrNoStreamResponse):
		return fmt.Errorf("%w: %s: %w", ErrNoStream, subject, err)
	case ctx.Err() != nil, errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled), errors.Is(err, nats.ErrTimeout):
		return fmt.Errorf("%w waiting for the server to take %s: %w", ErrTimeout, subject, err)
	}
	return fmt.Errorf("%w: %s: %w", ErrPublish, subject, err)
}

// expect adds p to the commands awaited on the shared inbox, and returns
// the inbox.
func (c *Client) expect(p *Pending) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sub == nil {
		inbox := c.nc.NewInbox()
		sub, err := c.nc.Subscribe(inbox, c.route)
		if err != nil {
			return "", err
		}
		c.inbox, c.sub = inbox, sub
	}
	c.waiting[p.cmd.ID] = append(c.waiting[p.cmd.ID], p)
	return c.inbox, nil
}

func (c *Client) forget(p *Pending) {
	c.mu.Lock()
	defer c.mu.Unlock()
	id := p.cmd.ID
	c.waiting[id] = slices.DeleteFunc(c.waiting[id], func(q *Pending) bool { return q == p })
	if len(c.waiting[id]) == 0 {
		delete(c.waiting, id)
	}
}

// route hands a completion on the shared inbox to every command awaiting
// its id: commands that share an id share their completion. Anything else
// on the inbox (late, repeated, not a completion) is dropped.
func (c *Client) route(m *nats.Msg) {
	var comp Completion
	if json.Unmarshal(m.Data, &comp) != nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, p := range c.waiting[comp.ID] {
		own := comp
		p.offer(answer{res: &Result{Completion: &own, Raw: m.Data}})
	}
}

// Pending is a command sent by Start, whose completion Wait returns.
type Pending struct {
	c       *Client
	cmd     Cmd
	subject string
	ack     *jetstream.PubAck
	// answer holds the first completion (or core-mode failure) to come.
	answer chan answer
	// sub is the command's own subscription (event subject, core reply);
	// nil when it waits on the shared inbox.
	sub    *nats.Subscription
	closed sync.Once
}

type answer struct {
	res *Result
	err error
}

// ID is the command id.
func (p *Pending) ID() string { return p.cmd.ID }

// Ack is the stream's PubAck; nil in core mode.
func (p *Pending) Ack() *jetstream.PubAck { return p.ack }

// Duplicate reports whether the stream dropped the command as a repeat of
// an id it already had.
func (p *Pending) Duplicate() bool { return p.ack != nil && p.ack.Duplicate }

// Close stops listening for the completion.
func (p *Pending) Close() {
	p.closed.Do(func() {
		if p.sub != nil {
			_ = p.sub.Unsubscribe()
			return
		}
		p.c.forget(p)
	})
}

// listen sets up where the completion will come, and says so in msg.
func (p *Pending) listen(msg *nats.Msg) error {
	c := p.c
	var err error
	switch {
	case c.onEvents:
		p.sub, err = c.nc.Subscribe(EventSubject(c.host, p.cmd.VM, p.cmd.Action), p.onEvent)
	case c.core:
		msg.Reply = c.nc.NewInbox()
		p.sub, err = c.nc.Subscribe(msg.Reply, p.onCoreReply)
	default:
		var inbox string
		if inbox, err = c.expect(p); err == nil {
			msg.Header.Set(HeaderReply, inbox)
		}
	}
	return err
}

func (p *Pending) offer(a answer) {
	select {
	case p.answer <- a:
	default: // a second answer: the first one counts
	}
}

// onEvent takes this command's completion from the event subject, which
// carries those of every command for the VM and action.
func (p *Pending) onEvent(m *nats.Msg) {
	var comp Completion
	if json.Unmarshal(m.Data, &comp) == nil && comp.ID == p.cmd.ID {
		p.offer(answer{res: &Result{Completion: &comp, Raw: m.Data}})
	}
}

func (p *Pending) onCoreReply(m *nats.Msg) {
	// What nats.go's requests look for: the server's no-responders status.
	if len(m.Data) == 0 && m.Header.Get("Status") == "503" {
		p.offer(answer{err: fmt.Errorf("%w: %s (core mode)", ErrNoWorker, p.subject)})
		return
	}
	comp, err := decodeCoreReply(m.Data)
	if err != nil {
		p.offer(answer{err: err})
		return
	}
	p.offer(answer{res: &Result{Completion: comp, Raw: m.Data}})
}

// decodeCoreReply reads the reply to a core-mode command. When a
// JetStream stream captures the subject too, the stream's PubAck wins the
// race to the reply: say so instead of returning an empty completion.
func decodeCoreReply(data []byte) (*Completion, error) {
	var reply struct {
		Completion
		Stream string `json:"stream"`
	}
	if err := json.Unmarshal(data, &reply); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadReply, err)
	}
	if reply.ID == "" && reply.Stream != "" {
		return nil, fmt.Errorf("%w: the reply is a PubAck of stream %s: a stream takes this subject, so send with JetStream, not core NATS", ErrBadReply, reply.Stream)
	}
	if reply.ID == "" || reply.Status == "" {
		return nil, fmt.Errorf("%w: %.200s", ErrBadReply, data)
	}
	return &reply.Completion, nil
}

// Wait returns the command's completion, or an ErrTimeout when ctx ends
// first. For a command the stream dropped as a duplicate, no completion
// will come to this one's reply subject: the answer is the first
// command's, from the record (VIRTBUS_DONE), and when the record is out of
// reach (a notice says so) Wait listens on all the same. Call it once.
func (p *Pending) Wait(ctx context.Context) (*Result, error) {
	if p.Duplicate() {
		res, err := p.fromRecord(ctx)
		if err == nil {
			return res, nil
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%w waiting for the recorded completion of %s (id %s): %w", ErrTimeout, p.subject, p.cmd.ID, ctx.Err())
		}
		p.c.notice(fmt.Errorf("the completion records are out of reach (%v); waiting on the reply subject", err))
	}
	select {
	case a := <-p.answer:
		if a.err != nil {
			return nil, a.err
		}
		a.res.Ack = p.ack
		return a.res, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("%w waiting for the completion of %s (id %s): %w", ErrTimeout, p.subject, p.cmd.ID, ctx.Err())
	}
}

func (p *Pending) fromRecord(ctx context.Context) (*Result, error) {
	comp, err := AwaitCompletion(ctx, p.c.js, p.c.host, p.cmd.VM, p.cmd.Action, p.cmd.ID)
	if err != nil {
		return nil, err
	}
	raw, err := json.Marshal(comp)
	if err != nil {
		return nil, fmt.Errorf("encode completion %s: %w", p.cmd.ID, err)
	}
	return &Result{Completion: comp, Raw: raw, Ack: p.ack, FromRecord: true}, nil
}
