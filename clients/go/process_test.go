package sidecar_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	sidecar "github.com/mlx-sidecar/mlx-sidecar/clients/go"
)

// TestStartFails: a runtime that cannot start, or exits before answering, makes Start fail
// with its exit status and stderr tail, and leaves nothing behind.
func TestStartFails(t *testing.T) {
	argv, err := sidecar.DefaultCommand()
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name   string
		opts   sidecar.Options
		code   int
		stderr string
	}{
		// The real runtime refusing an unknown flag (argparse: status 2, usage on stderr).
		{"bad flag", sidecar.Options{Args: []string{"--no-such-flag"}}, 2, "unrecognized arguments: --no-such-flag"},
		// A log level the runtime does not know.
		{"bad log level", sidecar.Options{LogLevel: "loud"}, 2, "invalid choice: 'loud'"},
		// Something that exits at once without a word of JSON-RPC.
		{"exits", sidecar.Options{Command: []string{argv[0], "-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)", "--"}}, 3, "boom"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := sidecar.Start(testContext(t), tc.opts)
			if err == nil {
				c.Close()
				t.Fatal("Start succeeded")
			}
			var ee *sidecar.ExitError
			if !errors.As(err, &ee) || !errors.Is(err, sidecar.ErrProcessExited) {
				t.Fatalf("Start: %v, want an *ExitError", err)
			}
			if ee.Code != tc.code || !strings.Contains(ee.Stderr, tc.stderr) || !strings.Contains(err.Error(), tc.stderr) {
				t.Errorf("exit error: code %d, stderr %q; message %q", ee.Code, ee.Stderr, err)
			}
		})
	}
	t.Run("not found", func(t *testing.T) {
		t.Setenv("MLX_SIDECAR_PYTHON", filepath.Join(t.TempDir(), "no-python"))
		_, err := sidecar.Start(testContext(t), sidecar.Options{})
		if err == nil || !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("Start: %v, want an error wrapping os.ErrNotExist", err)
		}
	})
	t.Run("hangs", func(t *testing.T) {
		// A process that never answers initialize: Start honours its context.
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		_, err := sidecar.Start(ctx, sidecar.Options{Command: []string{argv[0], "-c", "import time; time.sleep(60)", "--"}})
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Start: %v, want context.DeadlineExceeded", err)
		}
	})
	t.Run("bad framing", func(t *testing.T) {
		if _, err := sidecar.Start(testContext(t), sidecar.Options{Framing: "xml"}); err == nil {
			t.Fatal("Start accepted framing xml")
		}
	})
	if leaked := waitNoClientGoroutines(2 * time.Second); leaked != "" {
		t.Fatalf("goroutines left after failed starts:\n%s", leaked)
	}
}

// TestCloseConcurrent: Close is idempotent and safe concurrently with itself and with calls
// and streams in flight; afterwards calls fail with ErrClosed, and no goroutine is left.
func TestCloseConcurrent(t *testing.T) {
	before := runtime.NumGoroutine()
	c, err := sidecar.Start(testContext(t), sidecar.Options{})
	if err != nil {
		t.Fatal(err)
	}
	loadTiny(t, c, "m")
	ctx := testContext(t)

	st, err := c.Generate(ctx, longGenerate("m"))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	// Callers hammering the client while it closes.
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				err := c.Ping(ctx)
				if err == nil {
					continue
				}
				if !errors.Is(err, sidecar.ErrClosed) {
					t.Errorf("Ping during Close: %v, want ErrClosed", err)
				}
				return
			}
		}()
	}
	// A stream being read while it closes.
	streamErr := make(chan error, 1)
	go func() {
		_, err := st.Result()
		streamErr <- err
	}()
	time.Sleep(50 * time.Millisecond)
	errs := make([]error, 8)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = c.Close()
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("Close %d: %v", i, err)
		}
	}
	if err := c.Close(); err != nil {
		t.Errorf("Close again: %v", err)
	}
	// The stream ended with Close's cancellation.
	err = <-streamErr
	var rpc *sidecar.RPCError
	if !errors.As(err, &rpc) || rpc.Code != sidecar.CodeCancelled || !errors.Is(err, sidecar.ErrClosed) {
		t.Errorf("stream in flight during Close: %v", err)
	}
	for _, call := range []func() error{
		func() error { return c.Ping(ctx) },
		func() error { _, err := c.Generate(ctx, longGenerate("m")); return err },
		func() error { return c.Notify(ctx, "exit", nil) },
		func() error { return c.WriteRaw(ctx, []byte("\n")) },
	} {
		if err := call(); !errors.Is(err, sidecar.ErrClosed) {
			t.Errorf("call after Close: %v, want ErrClosed", err)
		}
	}
	if leaked := clientGoroutines(); leaked != "" {
		t.Fatalf("goroutines outlived Close:\n%s", leaked)
	}
	// Nothing else is left either (the test's own goroutines have ended).
	deadline := time.Now().Add(time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		t.Errorf("%d goroutines before Start, %d after Close", before, n)
	}
}

// TestCloseAfterDeath: Close after the process died on its own returns nil at once.
func TestCloseAfterDeath(t *testing.T) {
	c, err := sidecar.Start(testContext(t), sidecar.Options{})
	if err != nil {
		t.Fatal(err)
	}
	pid := c.PID()
	p, _ := os.FindProcess(pid)
	_ = p.Kill()
	for c.PID() == pid {
		time.Sleep(time.Millisecond)
	}
	start := time.Now()
	if err := c.Close(); err != nil || time.Since(start) > time.Second {
		t.Fatalf("Close: %v after %v", err, time.Since(start))
	}
	if leaked := clientGoroutines(); leaked != "" {
		t.Fatalf("goroutines outlived Close:\n%s", leaked)
	}
}

// TestCloseEscalates: a runtime that ignores stdin EOF and SIGTERM is killed.
func TestCloseEscalates(t *testing.T) {
	argv, _ := sidecar.DefaultCommand()
	// A runtime behind a shim that survives the runtime: it forwards stdin/stdout, ignores
	// SIGTERM, and keeps running after its stdin closes.
	shim := `
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.PIPE, stdout=sys.stdout.fileno(), stderr=sys.stderr.fileno())
while True:
    data = os.read(0, 65536)
    if not data:
        break
    child.stdin.write(data); child.stdin.flush()
time.sleep(60)
`
	cmd := append([]string{argv[0], "-c", shim}, argv...)
	c, err := sidecar.Start(testContext(t), sidecar.Options{Command: cmd, ShutdownTimeout: 300 * time.Millisecond, TermTimeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err = c.Close()
	var ee *sidecar.ExitError
	if !errors.As(err, &ee) || ee.Signal != "killed" {
		t.Fatalf("Close: %v, want the *ExitError of a SIGKILL", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Close took %v", d)
	}
}

// TestCloseCancelsGenerates: Close cancels every generate in flight, streamed or sent through
// Call, waits for their cancellation answers, and lets other calls finish.
func TestCloseCancelsGenerates(t *testing.T) {
	c, err := sidecar.Start(testContext(t), sidecar.Options{})
	if err != nil {
		t.Fatal(err)
	}
	loadTiny(t, c, "m")
	ctx := testContext(t)
	st, err := c.Generate(ctx, longGenerate("m"))
	if err != nil {
		t.Fatal(err)
	}
	called := make(chan error, 1)
	go func() {
		called <- c.Call(ctx, "generate", &sidecar.GenerateParams{Model: "m", Prompt: "Hi", MaxTokens: 100000, Stream: sidecar.Ptr(false)}, nil)
	}()
	waitInFlight(t, c, 2)
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	_, err = st.Result()
	var ge *sidecar.GenerateError
	var rpc *sidecar.RPCError
	if !errors.As(err, &ge) || !errors.Is(err, sidecar.ErrClosed) || !errors.As(err, &rpc) || rpc.Code != sidecar.CodeCancelled || ge.FinishReason != "cancelled" {
		t.Errorf("stream cut by Close: %v", err)
	}
	if err := <-called; !errors.As(err, &rpc) || rpc.Code != sidecar.CodeCancelled {
		t.Errorf("generate through Call, cut by Close: %v", err)
	}
}
