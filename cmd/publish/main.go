// Command publish sends one virtbus command over NATS and, by default, waits
// for its completion. With -count it sends a batch spread over several VMs
// and reports throughput and latency, as a load generator for a worker.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := exitCode(run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr), os.Stderr)
	stop()
	os.Exit(code)
}

// Exit codes, part of the CLI's contract with scripts.
const (
	exitOK      = 0
	exitFailed  = 1 // error completion, or publish failed
	exitUsage   = 2
	exitTimeout = 3 // no completion in time: the outcome is unknown
)

// exitError carries the process exit code. err is nil when the output has
// already said everything (an error completion printed to stdout).
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string {
	if e.err == nil {
		return fmt.Sprintf("exit status %d", e.code)
	}
	return e.err.Error()
}

func (e *exitError) Unwrap() error { return e.err }

// usageLine follows a usage error: the whole usage would bury the error.
const usageLine = "usage: publish [flags] ACTION VM [key=value ...]; publish -h for more"

func usageErrorf(format string, a ...any) error {
	return &exitError{code: exitUsage, err: fmt.Errorf(format, a...)}
}

// exitCode prints err (when there is something left to say) and maps it to
// the process exit code.
func exitCode(err error, stderr io.Writer) int {
	if err == nil {
		return exitOK
	}
	var ee *exitError
	if errors.As(err, &ee) {
		if ee.err != nil {
			fmt.Fprintln(stderr, "publish:", ee.err)
		}
		if ee.code == exitUsage && ee.err != nil {
			fmt.Fprintln(stderr, usageLine)
		}
		return ee.code
	}
	fmt.Fprintln(stderr, "publish:", err)
	return exitFailed
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) == 1 && (args[0] == "--version" || args[0] == "-version") {
		return printVersion(stdout)
	}
	cfg, err := parseArgs(args, getenv, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}

	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	nc, err := bus.Connect(cfg.conn, log)
	if err != nil {
		return err
	}
	defer nc.Close()

	// The server refuses a subject this user may not use with an
	// asynchronous error, and the request behind it would just time out:
	// end the run at once instead, with the server's words.
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	if err := watchErrors(nc, cfg, cancel, log); err != nil {
		return err
	}

	if cfg.findHost && cfg.sub == "" {
		if err := findHost(ctx, nc, cfg, stderr); err != nil {
			return err
		}
	}
	switch {
	case cfg.sub == "hosts":
		return runHosts(ctx, nc, cfg, stdout)
	case cfg.sub == "list":
		return runList(ctx, nc, cfg, stdout, stderr)
	case cfg.sub == "watch":
		return runWatch(ctx, nc, cfg, stdout, stderr)
	case cfg.sub == "get":
		return runGet(ctx, nc, cfg, stdout)
	case cfg.count > 0:
		return runLoad(ctx, nc, cfg, stdout)
	}
	return runOne(ctx, nc, cfg, stdout, stderr)
}

// watchErrors ends the run on the server's refusal of a subject: the
// request behind it would just time out. A refused stream lookup only
// tells the lookup to stand aside (see streamChecker); that is set up
// here too, for a JetStream send.
func watchErrors(nc *nats.Conn, cfg *config, cancel context.CancelCauseFunc, log *slog.Logger) error {
	lookupDenied := make(chan struct{}, 1)
	nc.SetErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		switch {
		case errors.Is(err, nats.ErrPermissionViolation) && cfg.stateDenied != nil && strings.Contains(err.Error(), "KV_"+bus.StateBucket):
			select {
			case cfg.stateDenied <- struct{}{}:
			default:
			}
		case errors.Is(err, nats.ErrPermissionViolation) && strings.Contains(err.Error(), apiStreamNames):
			select {
			case lookupDenied <- struct{}{}:
			default:
			}
		case errors.Is(err, nats.ErrPermissionViolation):
			cancel(err)
		default:
			log.Warn("nats async error", "err", err)
		}
	})
	if cfg.sub != "" || cfg.core {
		return nil
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("jetstream: %w", err)
	}
	sc := &streamChecker{js: js, denied: lookupDenied}
	cfg.checkStream = sc.check
	return nil
}

// waitError turns the end of a wait into the right exit code: the run's
// context ending is an interruption or a refusal, the -timeout deadline a
// timeout.
func waitError(parent context.Context, err error, what string, timeout time.Duration) error {
	if parent.Err() != nil {
		return stopped(parent, what)
	}
	if errors.Is(err, bus.ErrTimeout) || errors.Is(err, context.DeadlineExceeded) {
		return &exitError{code: exitTimeout, err: fmt.Errorf("timed out after %s while %s", timeout, what)}
	}
	return fmt.Errorf("%s: %w", what, err)
}

// stopped is the error of a run whose context ended before its command did:
// NATS refused a subject (see run), or a signal came.
func stopped(ctx context.Context, what string) error {
	if cause := context.Cause(ctx); errors.Is(cause, nats.ErrPermissionViolation) {
		return &exitError{code: exitFailed, err: fmt.Errorf("%s: refused by the server: %w", what, cause)}
	}
	return &exitError{code: exitFailed, err: fmt.Errorf("interrupted while %s", what)}
}
