package sidecar_test

import (
	"context"
	"errors"
	"strings"
	"syscall"
	"testing"
	"time"

	sidecar "github.com/mlx-sidecar/mlx-sidecar/clients/go"
)

// longGenerate asks for far more tokens than the tiny model's context allows, two per chunk.
func longGenerate(model string) *sidecar.GenerateParams {
	return &sidecar.GenerateParams{
		Model: model, Prompt: "Hello", MaxTokens: 100000, Temperature: sidecar.Ptr(0.0),
		StreamOptions: &sidecar.StreamOptions{ChunkTokens: 2},
	}
}

// TestCancelMidStream cancels the context after a few chunks, in every framing: the
// iteration stops with an error wrapping context.Canceled that carries the text so far and
// usage, and the client goes on working.
func TestCancelMidStream(t *testing.T) {
	for _, framing := range sidecar.Framings {
		t.Run(string(framing), func(t *testing.T) {
			c := start(t, sidecar.Options{Framing: framing})
			loadTiny(t, c, "m")
			ctx, cancel := context.WithCancel(testContext(t))
			defer cancel()
			st, err := c.Generate(ctx, longGenerate("m"))
			if err != nil {
				t.Fatal(err)
			}
			var text strings.Builder
			chunks, tokens := 0, 0
			var end error
			for ch, err := range st.Chunks() {
				if err != nil {
					end = err
					break
				}
				chunks++
				tokens += len(ch.TokenIDs)
				text.WriteString(ch.Text)
				if chunks == 3 {
					cancel()
				}
				if chunks > 3 {
					t.Fatalf("chunk %d yielded after the context was cancelled", chunks)
				}
			}
			checkCancelled(t, end, text.String(), tokens)
			_, err = st.Result()
			if err != end {
				t.Errorf("Result: %v; the iteration ended with %v", err, end)
			}
			// The client still works, and nothing is left generating.
			waitInFlight(t, c, 0)
			st, err = c.Generate(testContext(t), &sidecar.GenerateParams{Model: "m", Prompt: "Hi", MaxTokens: 2})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := st.Result(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func checkCancelled(t *testing.T, err error, seen string, tokens int) {
	t.Helper()
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("end of a cancelled stream: %v, want an error wrapping context.Canceled", err)
	}
	var ge *sidecar.GenerateError
	if !errors.As(err, &ge) {
		t.Fatalf("end of a cancelled stream: %T, want *GenerateError", err)
	}
	var rpc *sidecar.RPCError
	if !errors.As(err, &rpc) || rpc.Code != sidecar.CodeCancelled {
		t.Errorf("the runtime's answer: %v, want code %d", err, sidecar.CodeCancelled)
	}
	if ge.FinishReason != "cancelled" || ge.Usage == nil || ge.Usage.CompletionTokens < tokens || !strings.HasPrefix(ge.Text, seen) || ge.Text == "" {
		t.Errorf("GenerateError %+v (usage %+v); %d tokens and %q seen", ge, ge.Usage, tokens, seen)
	}
	if ge.Usage != nil && ge.Usage.CompletionTokens >= 1000 {
		t.Errorf("the generation ran to the end (%d tokens): it was not cancelled", ge.Usage.CompletionTokens)
	}
}

// TestBreakCancels: leaving the range loop early cancels the generation.
func TestBreakCancels(t *testing.T) {
	c := start(t, sidecar.Options{})
	loadTiny(t, c, "m")
	st, err := c.Generate(testContext(t), longGenerate("m"))
	if err != nil {
		t.Fatal(err)
	}
	var text strings.Builder
	tokens := 0
	for ch, err := range st.Chunks() {
		if err != nil {
			t.Fatal(err)
		}
		text.WriteString(ch.Text)
		tokens += len(ch.TokenIDs)
		break
	}
	_, err = st.Result()
	checkCancelled(t, err, text.String(), tokens)
	waitInFlight(t, c, 0)
}

// TestStreamCancel: Cancel from another goroutine while Result waits.
func TestStreamCancel(t *testing.T) {
	c := start(t, sidecar.Options{})
	loadTiny(t, c, "m")
	st, err := c.Generate(testContext(t), longGenerate("m"))
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		time.Sleep(50 * time.Millisecond)
		st.Cancel()
	}()
	_, err = st.Result()
	checkCancelled(t, err, "", 0)
}

// TestCancelUnread: a cancelled context stops the runtime's work even when nobody reads the
// stream.
func TestCancelUnread(t *testing.T) {
	c := start(t, sidecar.Options{})
	loadTiny(t, c, "m")
	ctx, cancel := context.WithCancel(testContext(t))
	if _, err := c.Generate(ctx, longGenerate("m")); err != nil {
		t.Fatal(err)
	}
	waitInFlight(t, c, 1)
	cancel()
	waitInFlight(t, c, 0)
}

// TestKillMidStream: SIGKILL the runtime while it streams: the stream and every other pending
// call end at once with the exit error; later calls get it too.
func TestKillMidStream(t *testing.T) {
	for _, framing := range sidecar.Framings {
		t.Run(string(framing), func(t *testing.T) {
			c := start(t, sidecar.Options{Framing: framing, LogLevel: "debug"})
			loadTiny(t, c, "m")
			ctx := testContext(t)
			st, err := c.Generate(ctx, longGenerate("m"))
			if err != nil {
				t.Fatal(err)
			}
			other, err := c.Generate(ctx, longGenerate("m")) // queued behind the first
			if err != nil {
				t.Fatal(err)
			}
			var end error
			chunks := 0
			var killedAt time.Time
			for _, err := range st.Chunks() {
				if err != nil {
					end = err
					break
				}
				if chunks++; chunks == 3 {
					killedAt = time.Now()
					if err := syscall.Kill(c.PID(), syscall.SIGKILL); err != nil {
						t.Fatal(err)
					}
				}
			}
			if d := time.Since(killedAt); d > 3*time.Second {
				t.Errorf("the stream ended %v after the kill", d)
			}
			checkKilled(t, end)
			_, err = other.Result()
			checkKilled(t, err)
			err = c.Ping(ctx)
			checkKilled(t, err)
			if c.PID() != 0 {
				t.Errorf("PID after death: %d", c.PID())
			}
		})
	}
}

func checkKilled(t *testing.T, err error) {
	t.Helper()
	var ee *sidecar.ExitError
	if !errors.Is(err, sidecar.ErrProcessExited) || !errors.As(err, &ee) {
		t.Fatalf("after SIGKILL: %v, want an *ExitError", err)
	}
	if ee.Signal != "killed" || ee.Code != -1 {
		t.Errorf("exit error: code %d signal %q", ee.Code, ee.Signal)
	}
	if !strings.Contains(ee.Stderr, "mlx-sidecar") {
		t.Errorf("stderr tail: %q", ee.Stderr)
	}
}

// TestRestartAfterKill: with a restart policy the runtime comes back after SIGKILL with its
// models loaded again, and a generate then works.
func TestRestartAfterKill(t *testing.T) {
	c := start(t, sidecar.Options{Restart: &sidecar.RestartPolicy{MinBackoff: 10 * time.Millisecond}})
	loadTiny(t, c, "m")
	loadTiny(t, c, "gone")
	ctx := testContext(t)
	if _, err := c.UnloadModel(ctx, &sidecar.ModelUnloadParams{Model: "gone"}); err != nil {
		t.Fatal(err)
	}
	st, err := c.Generate(ctx, longGenerate("m"))
	if err != nil {
		t.Fatal(err)
	}
	first := c.PID()
	killed := false
	for _, err := range st.Chunks() {
		if err != nil {
			checkKilled(t, err)
			break
		}
		if !killed {
			killed = true
			if err := syscall.Kill(first, syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Generate waits for the new process and its models.
	st, err = c.Generate(ctx, &sidecar.GenerateParams{Model: "m", Prompt: "Hello", MaxTokens: 4})
	if err != nil {
		t.Fatal(err)
	}
	res, err := st.Result()
	if err != nil || res.Usage.CompletionTokens != 4 {
		t.Fatalf("generate after the restart: %v %+v", err, res)
	}
	if pid := c.PID(); pid == first || pid == 0 {
		t.Errorf("pid %d after the restart; %d before", pid, first)
	}
	models, err := c.ListModels(ctx)
	if err != nil || len(models) != 1 || models[0].ID != "m" {
		t.Errorf("models after the restart: %v %+v", err, models)
	}
}

// TestRestartGivesUp: the fifth crash within the window is the last.
func TestRestartGivesUp(t *testing.T) {
	c := start(t, sidecar.Options{Restart: &sidecar.RestartPolicy{MinBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond}})
	ctx := testContext(t)
	for i := 1; i <= 5; i++ {
		if err := c.Ping(ctx); err != nil { // waits for the restart
			t.Fatalf("ping before crash %d: %v", i, err)
		}
		pid := c.PID()
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		for c.PID() == pid { // until the client has seen the death
			time.Sleep(time.Millisecond)
		}
	}
	err := c.Ping(ctx)
	if !errors.Is(err, sidecar.ErrTooManyCrashes) || !errors.Is(err, sidecar.ErrProcessExited) {
		t.Fatalf("after five crashes: %v", err)
	}
}
