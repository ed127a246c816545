package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"
	"unicode"

	"github.com/nats-io/nuid"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/envload"
)

const defaultURL = "nats://127.0.0.1:4222"

// hostname is os.Hostname, replaceable by tests.
var hostname = os.Hostname

// config is everything the command line and the environment decided.
type config struct {
	conn    bus.ConnOptions
	host    string
	wait    bool
	timeout time.Duration
	json    bool
	id      string // command id; in load mode the prefix of the ids, or empty
	core    bool
	expires time.Duration // > 0: the command's deadline, from when it is sent

	action string
	vm     string   // single mode
	vms    []string // load mode: round-robin over these
	params json.RawMessage

	count       int // > 0: load mode
	concurrency int

	// sub is the subcommand (list, watch, get) in place of an action; vm
	// is then watch's VM (empty: all) and id get's command id.
	sub string

	envHost string // VIRTBUS_HOST
	// findHost: neither -host nor VIRTBUS_HOST named the host, so one
	// command's host is looked up in VIRTBUS_VMS (see findhost.go), and
	// host, this machine's, is only the fallback.
	findHost bool
	// stateDenied is signalled by run's error handler when the server
	// refuses that lookup.
	stateDenied chan struct{}
	// checkStream, when set, is asked before a command goes out whether
	// a stream will take its subject (see jscheck.go).
	checkStream func(ctx context.Context, subject string) error
}

const usageHead = `Usage: publish [flags] ACTION VM [key=value ...]
       publish [flags] -count N [-vms a,b,c] ACTION [VM] [key=value ...]
       publish [flags] list               the host's domains and their state
       publish [flags] watch [VM]         state changes and completions, until Ctrl-C
       publish [flags] get ID             the recorded completion of command ID
       publish [flags] hosts              the live hosts: their workers' state and load

Sends one command to virtbus.cmd.<host>.<VM>.<ACTION> and, unless -wait=false,
waits for its completion. JetStream is the default: the command is acked by the
stream (PubAck) before publish waits, so a command nobody will ever see is an
error, not a silent drop.

  ACTION     start, stop, reboot, attach-disk, detach-disk, ...; the worker
             answers an action it does not know with code=invalid
  VM         libvirt domain name or UUID; a name that is not a valid subject
             token (dots, spaces, '*', '>') must be given by its UUID
  key=value  the action's parameters, sent as one JSON object: the values true
             and false become booleans, every other value stays a string
             (timeout=90s, mode=force, target=vdb). Use -params '{...}' for
             anything else; it cannot be combined with key=value.

Without -host and VIRTBUS_HOST, the VM's host is looked up in KV bucket
VIRTBUS_VMS (stderr says which); a VM on several hosts, or on none, is refused.
When the bucket cannot be read, the host is this machine's hostname (load mode:
always).

Load mode (-count N): N commands of ACTION, round-robin over -vms (or the one
VM argument), at most -concurrency outstanding, each waiting up to -timeout;
prints sent, ok, errors by code, timeouts, wall time, throughput and latency
percentiles (from publish to completion).

For people (list, watch and get are publish's own, never sent as actions):
  list       the host's domains from KV bucket VIRTBUS_VMS, by name: VM, STATE,
             REASON, SINCE, UUID (-json: a JSON array)
  watch      prints virtbus.state.<host>.<VM> and virtbus.evt.<host>.<VM>.* as
             they come, one line each (-json: each message's JSON); no VM: all
  get        the completion recorded for command id ID in VIRTBUS_DONE, printed
             as when publish waits (-json: as recorded); what to ask after exit 3
  hosts      every worker that answers $SRV.STATS.virtbus within -timeout
             (default 1s): HOST, ROLE, VERSION, QUEUE, IN-FLIGHT, LIBVIRT,
             DOMAINS, UP (-json: a JSON array)
  -host, -json, -timeout (bounds the reads of list and get, and watch's
  subscribing) and the connection flags apply to them; those of sending do not.

Flags may stand anywhere on the line, as -flag or --flag; "--" ends them (for
a VM or value that starts with '-'). The connection, like the nats CLI's: -s,
-server or -url; -context NAME reads the nats CLI's saved context NAME. Each
setting comes from the first of: the flag, VIRTBUS_NATS_*, NATS_* (NATS_URL,
NATS_USER, NATS_PASSWORD, NATS_CREDS, NATS_NKEY, NATS_CERT, NATS_KEY,
NATS_CA), the context (-context, else $NATS_CONTEXT), the default. The way to
log in (creds, nkey, user, token) comes whole from the first of them that
names one. Without -context or $NATS_CONTEXT no context is read, not even
the one 'nats context select' chose: publish drives VMs, and should not
follow a selection made for other work.

Before sending with JetStream, publish asks the server whether a stream
takes the command's subject (when the user may ask): without JetStream, or
without such a stream, it sends nothing and exits 1 (use -core for a worker
with VIRTBUS_DELIVERY=core).

Exit status: 0 ok; 1 error completion, publish failure or interrupt;
2 usage error; 3 no completion within -timeout (outcome unknown), or for get
no completion recorded. In load mode 3 wins over 1 when both happened.

Examples:
  publish stop web-1 mode=force
  publish -json attach-disk web-1 path=/var/lib/libvirt/images/data.qcow2 format=qcow2
  publish -host hv2 -wait=false reboot 0f3c1e52-7a4b-4c8e-9d1a-2b6f5e4d3c21
  publish -user tenant-a -inbox-prefix _INBOX_tenant-a start web-1
  publish -count 1000 -vms web-1,web-2,web-3 -concurrency 32 start
  publish -host hv2 list
  publish hosts
  publish watch web-1
  publish get 2xLhV1mYr0VnJ3hQd8sK4c

Flags:
`

// parseArgs reads flags, the environment and the positional arguments.
// Connection flags left empty fall back to the environment and a nats
// context after parsing, so -h never prints a secret taken from them.
func parseArgs(args []string, getenv func(string) string, stderr io.Writer) (*config, error) {
	c := &config{}
	fs, raw := newFlagSet(c)
	pos, err := parseInterspersed(fs, args)
	if err == flag.ErrHelp {
		fs.SetOutput(stderr)
		fs.Usage()
		return nil, err
	}
	if err != nil {
		return nil, usageErrorf("%v", err)
	}
	if err := c.fillConn(raw, getenv); err != nil {
		return nil, err
	}
	if err := c.fillHost(getenv); err != nil {
		return nil, err
	}
	if len(pos) > 0 && subcommands[pos[0]].synopsis != "" {
		return c, c.readSubcommand(fs, raw, pos)
	}
	if err := c.checkFlags(raw); err != nil {
		return nil, err
	}
	if err := c.readPositional(pos, raw); err != nil {
		return nil, err
	}
	if !flagSet(fs, "timeout") {
		c.timeout = defaultWait(c.action, c.params)
	}
	if c.findHost = c.findHost && c.count == 0; c.findHost {
		c.stateDenied = make(chan struct{}, 1)
	}
	if c.count == 0 && c.id == "" {
		c.id = nuid.Next()
	}
	return c, nil
}

// parseInterspersed parses flags anywhere on the line, as the nats CLI
// does: Go's flag package stops at the first positional argument, so it
// parses again after each one, collecting the positionals. "--" ends the
// flags; everything after it is positional.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for len(args) > 0 {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if used := len(args) - len(rest); used > 0 && args[used-1] == "--" {
			return append(pos, rest...), nil
		}
		if len(rest) == 0 {
			break
		}
		pos, args = append(pos, rest[0]), rest[1:]
	}
	return pos, nil
}

// flagSet reports whether the command line set flag name.
func flagSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

// rawFlags are the flags parsed further once the mode is known.
type rawFlags struct {
	params       string
	vms          string
	context      string
	passwordFile string
}

func newFlagSet(c *config) (*flag.FlagSet, *rawFlags) {
	raw := &rawFlags{}
	fs := flag.NewFlagSet("publish", flag.ContinueOnError)
	// Silent while parsing: a usage error is reported by exitCode with a
	// one-line usage; -h has parseArgs print the whole.
	fs.SetOutput(io.Discard)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usageHead)
		fs.PrintDefaults()
	}
	fs.StringVar(&c.conn.URL, "url", "", "NATS server URL(s), comma-separated (default $VIRTBUS_NATS_URL, $NATS_URL, the context's url, else "+defaultURL+")")
	fs.StringVar(&c.conn.URL, "s", "", "alias of -url, as in the nats CLI")
	fs.StringVar(&c.conn.URL, "server", "", "alias of -url, as in the nats CLI")
	fs.StringVar(&raw.context, "context", "", "nats CLI context to read the connection from, $XDG_CONFIG_HOME/nats/context/NAME.json (default $NATS_CONTEXT;"+
		" without either, the nats CLI's selected context is NOT read)")
	fs.StringVar(&c.host, "host", "", "worker host id of the subject (default $VIRTBUS_HOST, else this machine's hostname made subject-safe)")
	fs.StringVar(&c.conn.Creds, "creds", "", "NATS credentials file (default $VIRTBUS_NATS_CREDS, $NATS_CREDS, the context's creds)")
	fs.StringVar(&c.conn.NKey, "nkey", "", "NATS NKey seed file (default $NATS_NKEY, the context's nkey)")
	fs.StringVar(&c.conn.User, "user", "", "NATS user (default $VIRTBUS_NATS_USER, $NATS_USER, the context's user)")
	fs.StringVar(&c.conn.Password, "password", "", "NATS password; on the command line it shows in ps: prefer -password-file or"+
		" the environment (default $VIRTBUS_NATS_PASSWORD, $NATS_PASSWORD, the context's password)")
	fs.StringVar(&raw.passwordFile, "password-file", "", "read the NATS password from the first line of this file")
	fs.StringVar(&c.conn.Token, "token", "", "NATS token (default $VIRTBUS_NATS_TOKEN, the context's token)")
	fs.StringVar(&c.conn.TLSCA, "tls-ca", "", "CA file to verify the server (default $VIRTBUS_NATS_TLS_CA, $NATS_CA, the context's ca)")
	fs.StringVar(&c.conn.TLSCert, "tls-cert", "", "client certificate file (default $VIRTBUS_NATS_TLS_CERT, $NATS_CERT, the context's cert)")
	fs.StringVar(&c.conn.TLSKey, "tls-key", "", "client key file (default $VIRTBUS_NATS_TLS_KEY, $NATS_KEY, the context's key)")
	fs.StringVar(&c.conn.InboxPrefix, "inbox-prefix", "", "inbox prefix in place of _INBOX, for a user whose NATS permissions keep its replies apart,"+
		" such as _INBOX_tenant-a; the worker answers only under its VIRTBUS_REPLY_PREFIXES (default $VIRTBUS_NATS_INBOX_PREFIX, the context's inbox_prefix)")
	fs.BoolVar(&c.wait, "wait", true, "wait for the completion; false: print the id and stream sequence once the stream has the command")
	fs.DurationVar(&c.timeout, "timeout", minWait, "how long to wait for the PubAck and the completion (per command in load mode);"+
		" default for an action: its own timeout parameter (or the worker's default for it) plus "+waitMargin.String()+", at least "+minWait.String())
	fs.BoolVar(&c.json, "json", false, "print the completion JSON as the worker sent it (load mode: the summary as JSON; list, watch, get: see above)")
	fs.StringVar(&c.id, "id", "", "command id, the Nats-Msg-Id JetStream deduplicates on: "+idRule+" (default a fresh NUID; load mode: <id>-<n>)")
	fs.DurationVar(&c.expires, "expires", 0, "the worker runs the command only if it takes it within this long (Virtbus-Expires), else answers code=expired; 0: its own age limit only")
	fs.BoolVar(&c.core, "core", false, "core-NATS request instead of JetStream, for a worker with VIRTBUS_DELIVERY=core (at most once)")
	fs.StringVar(&raw.params, "params", "", "the parameters as one raw JSON object, instead of key=value")
	fs.IntVar(&c.count, "count", 0, "load mode: send this many commands")
	fs.StringVar(&raw.vms, "vms", "", "load mode: comma-separated VMs to spread the commands over")
	fs.IntVar(&c.concurrency, "concurrency", 8, "load mode: most commands outstanding at once")
	return fs, raw
}

// environment is what publish reads from VIRTBUS_* variables: the NATS
// settings are the worker's own struct, so both read the same names.
type environment struct {
	NATS struct {
		bus.NATSSettings
		InboxPrefix string `split_words:"true"`
	}
	Host string
}

// fillConn completes the connection from, in order of precedence, the
// flags, VIRTBUS_*, NATS_* and the nats context, then the default URL
// (see mergeConn).
func (c *config) fillConn(raw *rawFlags, getenv func(string) string) error {
	var env environment
	if err := envload.Load(bus.EnvPrefix, getenv, &env); err != nil {
		return err
	}
	c.envHost = env.Host
	if raw.passwordFile != "" {
		if c.conn.Password != "" {
			return usageErrorf("give -password or -password-file, not both")
		}
		pw, err := readPasswordFile(raw.passwordFile)
		if err != nil {
			return err
		}
		c.conn.Password = pw
	}
	fromEnv := env.NATS.ConnOptions("")
	fromEnv.InboxPrefix = env.NATS.InboxPrefix
	sources := []bus.ConnOptions{c.conn, fromEnv, natsEnv(getenv)}
	name := raw.context
	if name == "" {
		name = getenv("NATS_CONTEXT")
	}
	if name != "" {
		ctxConn, err := loadContext(name, getenv)
		if err != nil {
			return err
		}
		sources = append(sources, ctxConn)
	}
	c.conn = mergeConn(sources...)
	c.conn.Name = "virtbus-publish"
	if c.conn.URL == "" {
		c.conn.URL = defaultURL
	}
	return nil
}

// fillHost gives the host its default when no -host set it.
func (c *config) fillHost(getenv func(string) string) error {
	if c.host == "" {
		c.host = c.envHost
	}
	if c.host == "" {
		h, err := hostname()
		if err != nil {
			return fmt.Errorf("no -host and no VIRTBUS_HOST, and the hostname is unknown: %w", err)
		}
		c.host = bus.HostToken(h)
		c.findHost = true
	}
	return nil
}

// checkFlags refuses flag values the worker or NATS would refuse later,
// and flags that do not go together.
func (c *config) checkFlags(raw *rawFlags) error {
	switch {
	case !bus.ValidToken(c.host):
		return usageErrorf("host %s is not a subject token: want %s", quoteArg(c.host), tokenRule)
	case c.timeout <= 0:
		return usageErrorf("-timeout must be positive, not %s", c.timeout)
	case c.expires < 0:
		return usageErrorf("-expires must not be negative, not %s", c.expires)
	}
	if err := checkInboxPrefix(c.conn.InboxPrefix); err != nil {
		return err
	}
	switch {
	case c.count < 0:
		return usageErrorf("-count must not be negative")
	case c.count == 0 && raw.vms != "":
		return usageErrorf("-vms is for load mode: give -count too")
	case c.count > 0 && c.concurrency < 1:
		return usageErrorf("-concurrency must be at least 1")
	}
	return checkID(c.id, c.count)
}

// readPositional reads ACTION, the VM unless -vms names them, and the
// parameters.
func (c *config) readPositional(pos []string, raw *rawFlags) error {
	if len(pos) == 0 {
		return usageErrorf("missing ACTION")
	}
	c.action, pos = pos[0], pos[1:]
	if !bus.ValidToken(c.action) {
		return usageErrorf("action %s is not a subject token: want %s", quoteArg(c.action), tokenRule)
	}
	var err error
	if raw.vms != "" {
		err = c.readVMList(raw.vms, pos)
	} else {
		pos, err = c.readVM(pos)
	}
	if err != nil {
		return err
	}
	switch {
	case raw.params != "" && len(pos) > 0:
		return usageErrorf("-params and key=value arguments cannot be combined")
	case raw.params != "":
		c.params, err = objectParams(raw.params)
	default:
		c.params, err = keyValueParams(pos)
	}
	return err
}

// readVMList reads -vms; the positional arguments after ACTION must then
// be parameters only.
func (c *config) readVMList(list string, pos []string) error {
	for v := range strings.SplitSeq(list, ",") {
		v = strings.TrimSpace(v)
		if v == "" {
			continue
		}
		if !bus.ValidToken(v) {
			return usageErrorf("vm %s in -vms is not a subject token (%s): address it by its UUID", quoteArg(v), tokenRule)
		}
		c.vms = append(c.vms, v)
	}
	if len(c.vms) == 0 {
		return usageErrorf("-vms names no VM")
	}
	if len(pos) > 0 && !strings.Contains(pos[0], "=") {
		return usageErrorf("give the VMs either with -vms or as the VM argument, not both (%q)", pos[0])
	}
	return nil
}

// readVM reads the VM argument and returns the arguments after it.
func (c *config) readVM(pos []string) ([]string, error) {
	if len(pos) == 0 {
		return nil, usageErrorf("missing VM after ACTION %q", c.action)
	}
	vm := pos[0]
	if !bus.ValidToken(vm) {
		return nil, usageErrorf("vm %s is not a subject token (%s): address it by its UUID", quoteArg(vm), tokenRule)
	}
	c.vm, c.vms = vm, []string{vm}
	return pos[1:], nil
}

// command is the bus command for vm with id; its deadline, when -expires
// asks for one, counts from now.
func (c *config) command(vm, id string) bus.Cmd {
	cmd := bus.Cmd{VM: vm, Action: c.action, ID: id, Params: c.params}
	if c.expires > 0 {
		cmd.Expires = time.Now().Add(c.expires)
	}
	return cmd
}

// keyValueParams builds the JSON params object from key=value arguments:
// true and false become booleans, every other value a string. No action
// parameter (README.md, "Actions") is a number (timeout is a Go duration
// string), so guessing numbers would only turn a VM-ish "007" into 7.
func keyValueParams(args []string) (json.RawMessage, error) {
	params := make(map[string]any, len(args))
	for _, a := range args {
		k, v, ok := strings.Cut(a, "=")
		if !ok || k == "" {
			return nil, usageErrorf("parameter %q is not key=value", a)
		}
		if _, dup := params[k]; dup {
			return nil, usageErrorf("parameter %q given twice", k)
		}
		switch v {
		case "true":
			params[k] = true
		case "false":
			params[k] = false
		default:
			params[k] = v
		}
	}
	b, err := json.Marshal(params)
	if err != nil {
		return nil, fmt.Errorf("encode params: %w", err)
	}
	return b, nil
}

// objectParams checks that -params is one JSON object and sends it as given.
func objectParams(raw string) (json.RawMessage, error) {
	b := bytes.TrimSpace([]byte(raw))
	var obj map[string]json.RawMessage
	if len(b) == 0 || b[0] != '{' || json.Unmarshal(b, &obj) != nil {
		return nil, usageErrorf("-params must be one JSON object, like '{\"mode\":\"force\"}'")
	}
	return b, nil
}

// The rules of bus.ValidID and bus.ValidToken, for usage errors.
var (
	idRule    = fmt.Sprintf("at most %d bytes of [A-Za-z0-9._:-]", bus.MaxIDLen)
	tokenRule = fmt.Sprintf("1 to %d bytes, no dots, spaces, control characters, '*' or '>'", bus.MaxTokenLen)
)

// checkID refuses an -id the worker would refuse: it answers such a
// command `invalid` instead of running it. In load mode the longest id
// sent, <id>-<count>, must pass too.
func checkID(id string, count int) error {
	switch {
	case id == "":
		return nil
	case !bus.ValidID(id):
		return usageErrorf("-id %s: want %s", quoteArg(id), idRule)
	case count > 0 && !bus.ValidID(nuidOr(id, count-1)):
		return usageErrorf("-id %s: load mode sends ids up to %s, and an id is %s", quoteArg(id), quoteArg(nuidOr(id, count-1)), idRule)
	}
	return nil
}

// inboxSuffixLen is the most nats.go appends to an inbox prefix: a dot and
// a NUID, and for a request (-core) a dot and eight more characters.
const inboxSuffixLen = 1 + 22 + 1 + 8

// checkInboxPrefix refuses what nats.go would refuse at connect, and a
// prefix so long that the worker would refuse the reply subjects made from
// it (bus.MaxReplyLen).
func checkInboxPrefix(p string) error {
	if p == "" {
		return nil
	}
	if len(p)+inboxSuffixLen > bus.MaxReplyLen {
		return usageErrorf("-inbox-prefix %s: at most %d bytes, so that its reply subjects fit the worker's %d", quoteArg(p), bus.MaxReplyLen-inboxSuffixLen, bus.MaxReplyLen)
	}
	for tok := range strings.SplitSeq(p, ".") {
		if tok == "" || strings.ContainsFunc(tok, func(r rune) bool { return r <= ' ' || r == 0x7f || r == '*' || r == '>' || unicode.IsSpace(r) }) {
			return usageErrorf("-inbox-prefix %s: want subject tokens without wildcards or white space, not ending in a dot", quoteArg(p))
		}
	}
	return nil
}

// quoteArg quotes a command-line value for an error message, cut short
// when it is long.
func quoteArg(s string) string { return bus.Clip(s, 64) }

// sendFlags are the flags only sending a command reads: with a
// subcommand they would be silently ignored, so they are refused.
var sendFlags = []string{"wait", "id", "expires", "core", "params", "count", "vms", "concurrency"}

// subcommands are publish's own commands for people, read where ACTION
// would be: each with the most positional arguments it takes, and its
// synopsis to say so. No worker action has these names (README.md,
// "Actions"), so reserving them takes nothing from a producer.
var subcommands = map[string]struct {
	max      int
	synopsis string
}{"list": {0, "list"}, "watch": {1, "watch [VM]"}, "get": {1, "get ID"}, "hosts": {0, "hosts"}}

// readSubcommand reads the arguments of subcommand pos[0]. Its
// VM and ID go into a subject and a KV key, so they are bounded here as
// an action's are.
func (c *config) readSubcommand(fs *flag.FlagSet, raw *rawFlags, pos []string) error {
	sub := pos[0]
	var refused []string
	fs.Visit(func(f *flag.Flag) {
		if slices.Contains(sendFlags, f.Name) {
			refused = append(refused, "-"+f.Name)
		}
	})
	if len(refused) > 0 {
		return usageErrorf("%s sends no command: %s cannot go with it", sub, strings.Join(refused, ", "))
	}
	if err := c.checkFlags(raw); err != nil {
		return err
	}
	c.sub = sub
	args := pos[1:]
	if a := subcommands[sub]; len(args) > a.max {
		return usageErrorf("%s: unexpected argument %s", a.synopsis, quoteArg(args[a.max]))
	}
	switch {
	case sub == "hosts" && !flagSet(fs, "timeout"):
		c.timeout = hostsWindow
	case sub == "watch" && len(args) == 1:
		if !bus.ValidToken(args[0]) {
			return usageErrorf("vm %s is not a subject token (%s): watch it by its UUID", quoteArg(args[0]), tokenRule)
		}
		c.vm = args[0]
	case sub == "get" && len(args) == 0:
		return usageErrorf("missing ID after get")
	case sub == "get":
		if !validRecordID(args[0]) {
			return usageErrorf("id %s: want %s, or '~' and that for an id the worker made", quoteArg(args[0]), idRule)
		}
		c.id = args[0]
	}
	return nil
}

// validRecordID reports whether id can have a record: a client's id, or
// one the worker made for a command without a usable id ('~' and then
// stream sequence and time, or a NUID), which its completion shows.
func validRecordID(id string) bool {
	return bus.ValidID(id) || strings.HasPrefix(id, "~") && bus.ValidID(id[1:])
}
