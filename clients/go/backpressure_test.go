package sidecar_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	sidecar "github.com/mlx-sidecar/mlx-sidecar/clients/go"
)

// streamParams asks for n tokens, one per chunk (the runtime merges tokens into one chunk
// while its output is blocked).
func streamParams(model string, n int) *sidecar.GenerateParams {
	return &sidecar.GenerateParams{
		Model: model, Prompt: "Hello", MaxTokens: n, Temperature: sidecar.Ptr(0.0),
		StreamOptions: &sidecar.StreamOptions{ChunkTokens: 1},
	}
}

// waitBuffered waits until the stream holds n unread chunks: the client's reader is then
// blocked on it.
func waitBuffered(t *testing.T, ctx context.Context, c *sidecar.Client, st *sidecar.Stream, n int) {
	t.Helper()
	wait, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for st.Buffered() < n {
		if st.Answered() && st.Buffered() < n {
			_, err := st.Result()
			t.Fatalf("the stream ended before it held %d chunks: %v", n, err)
		}
		if wait.Err() != nil {
			ictx, icancel := context.WithTimeout(ctx, 2*time.Second)
			info, err := c.Info(ictx)
			icancel()
			t.Fatalf("the stream never held %d chunks (holds %d, high water %d); runtime/info: %+v %v", n, st.Buffered(), st.HighWater(), info, err)
		}
		time.Sleep(time.Millisecond)
	}
}

// drainSlowly reads a stream, pausing after each chunk, and checks that nothing was lost:
// chunk indexes count up from 0, the tokens add up to usage, and the text to the result's.
func drainSlowly(t *testing.T, st *sidecar.Stream, pause time.Duration, bound int) {
	t.Helper()
	var text strings.Builder
	index, tokens := 0, 0
	for ch, err := range st.Chunks() {
		if err != nil {
			t.Fatalf("stream %v: %v", st.ID(), err)
		}
		if ch.Index != index {
			t.Fatalf("stream %v: chunk %d arrived as number %d", st.ID(), ch.Index, index)
		}
		if n := st.Buffered(); n > bound {
			t.Fatalf("stream %v holds %d chunks; the bound is %d", st.ID(), n, bound)
		}
		index++
		tokens += len(ch.TokenIDs)
		text.WriteString(ch.Text)
		time.Sleep(pause)
	}
	res, err := st.Result()
	if err != nil {
		t.Fatalf("stream %v: Result: %v", st.ID(), err)
	}
	if res.Text != text.String() || res.Usage.CompletionTokens != tokens || tokens == 0 {
		t.Errorf("stream %v: %d tokens, %q streamed; result %d tokens, %q", st.ID(), tokens, text.String(), res.Usage.CompletionTokens, res.Text)
	}
	if hw := st.HighWater(); hw > bound {
		t.Errorf("stream %v held %d chunks at once; the bound is %d", st.ID(), hw, bound)
	}
}

// TestSlowConsumer: a stream whose reader falls behind holds at most StreamBuffer chunks
// (the client stops reading the pipe and the runtime waits), yet every token arrives, in
// order, and the text equals the result's; other streams and calls are held up meanwhile,
// not lost.
func TestSlowConsumer(t *testing.T) {
	cases := []struct {
		framing sidecar.Framing
		bound   int
		tokens  int
		pauses  []time.Duration // one stream per reader, each pausing this long per chunk
	}{
		{sidecar.NDJSON, 1, 60, []time.Duration{time.Millisecond}},
		{sidecar.NDJSON, 4, 200, []time.Duration{2 * time.Millisecond, 0}},
		{sidecar.LSP, 3, 120, []time.Duration{time.Millisecond, time.Millisecond}},
		{sidecar.MsgPack, 4, 200, []time.Duration{2 * time.Millisecond, 0}},
	}
	for _, tc := range cases {
		t.Run(string(tc.framing), func(t *testing.T) {
			c := start(t, sidecar.Options{Framing: tc.framing, StreamBuffer: tc.bound})
			loadTiny(t, c, "m")
			ctx := testContext(t)
			streams := make([]*sidecar.Stream, len(tc.pauses))
			for i := range streams {
				st, err := c.Generate(ctx, streamParams("m", tc.tokens))
				if err != nil {
					t.Fatal(err)
				}
				streams[i] = st
			}
			// Nobody reads until the first stream's buffer is full: the reader is then blocked.
			waitBuffered(t, ctx, c, streams[0], tc.bound)
			// A call made now is answered once the readers catch up.
			pinged := make(chan error, 1)
			go func() { pinged <- c.Ping(ctx) }()
			var wg sync.WaitGroup
			for i, st := range streams {
				wg.Add(1)
				go func() {
					defer wg.Done()
					drainSlowly(t, st, tc.pauses[i], tc.bound)
				}()
			}
			wg.Wait()
			if err := <-pinged; err != nil {
				t.Fatalf("Ping behind a slow stream: %v", err)
			}
			if hw := streams[0].HighWater(); hw != tc.bound {
				t.Errorf("the first stream held at most %d chunks; it was filled to %d", hw, tc.bound)
			}
		})
	}
}

// TestStalledConsumer: a stream nobody reads holds up the pipe for StallTimeout only; then it
// is cancelled and ends with ErrStreamStalled and the whole text, and the rest goes on.
func TestStalledConsumer(t *testing.T) {
	c := start(t, sidecar.Options{StreamBuffer: 2, StallTimeout: 300 * time.Millisecond})
	loadTiny(t, c, "m")
	ctx := testContext(t)
	st, err := c.Generate(ctx, longGenerate("m"))
	if err != nil {
		t.Fatal(err)
	}
	waitBuffered(t, ctx, c, st, 2)
	// This waits behind the stalled stream, then goes through.
	if err := c.Ping(ctx); err != nil {
		t.Fatalf("Ping behind a stalled stream: %v", err)
	}
	waitInFlight(t, c, 0) // the runtime stopped generating
	var chunks int
	var end error
	for _, err := range st.Chunks() {
		if err != nil {
			end = err
			break
		}
		chunks++
	}
	var ge *sidecar.GenerateError
	var rpc *sidecar.RPCError
	if !errors.Is(end, sidecar.ErrStreamStalled) || !errors.As(end, &ge) || !errors.As(end, &rpc) || rpc.Code != sidecar.CodeCancelled {
		t.Fatalf("end of a stalled stream: %v", end)
	}
	if chunks != 0 || ge.Text == "" || ge.Usage == nil || ge.Usage.CompletionTokens < 2 || ge.FinishReason != "cancelled" {
		t.Errorf("%d chunks yielded after the stall; %+v (usage %+v)", chunks, ge, ge.Usage)
	}
	// Other streams still work.
	st, err = c.Generate(ctx, streamParams("m", 5))
	if err != nil {
		t.Fatal(err)
	}
	drainSlowly(t, st, 0, 2)
}

// TestBlockedStreamEnds: while a full stream blocks the pipe, cancelling it, Close and the
// process dying each end it at once (never after StallTimeout), and calls held up behind it
// are answered or failed.
func TestBlockedStreamEnds(t *testing.T) {
	cases := []struct {
		name string
		end  func(t *testing.T, c *sidecar.Client, st *sidecar.Stream, cancel context.CancelFunc)
		want func(t *testing.T, streamErr, pingErr error)
	}{
		{"context cancelled", func(t *testing.T, c *sidecar.Client, st *sidecar.Stream, cancel context.CancelFunc) {
			cancel()
		}, func(t *testing.T, streamErr, pingErr error) {
			checkCancelled(t, streamErr, "", 0)
			if pingErr != nil {
				t.Errorf("Ping: %v", pingErr)
			}
		}},
		{"Cancel", func(t *testing.T, c *sidecar.Client, st *sidecar.Stream, cancel context.CancelFunc) {
			st.Cancel()
		}, func(t *testing.T, streamErr, pingErr error) {
			checkCancelled(t, streamErr, "", 0)
			if pingErr != nil {
				t.Errorf("Ping: %v", pingErr)
			}
		}},
		{"Close", func(t *testing.T, c *sidecar.Client, st *sidecar.Stream, cancel context.CancelFunc) {
			if err := c.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
		}, func(t *testing.T, streamErr, pingErr error) {
			var rpc *sidecar.RPCError
			if !errors.Is(streamErr, sidecar.ErrClosed) || !errors.As(streamErr, &rpc) || rpc.Code != sidecar.CodeCancelled {
				t.Errorf("stream cut by Close: %v", streamErr)
			}
			// Sent just before Close: answered (the runtime answers shutdown after it), or
			// refused if Close began first.
			if pingErr != nil && !errors.Is(pingErr, sidecar.ErrClosed) {
				t.Errorf("Ping: %v", pingErr)
			}
		}},
		{"SIGKILL", func(t *testing.T, c *sidecar.Client, st *sidecar.Stream, cancel context.CancelFunc) {
			if err := syscall.Kill(c.PID(), syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
		}, func(t *testing.T, streamErr, pingErr error) {
			checkKilled(t, streamErr)
			checkKilled(t, pingErr)
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			// A stall timeout longer than the test's context: only the event can end the wait.
			c := start(t, sidecar.Options{StreamBuffer: 2, StallTimeout: time.Hour, LogLevel: "debug"})
			loadTiny(t, c, "m")
			ctx := testContext(t)
			sctx, cancel := context.WithCancel(ctx)
			defer cancel()
			st, err := c.Generate(sctx, longGenerate("m"))
			if err != nil {
				t.Fatal(err)
			}
			waitBuffered(t, ctx, c, st, 2)
			pinged := make(chan error, 1)
			go func() { pinged <- c.Ping(ctx) }()
			tc.end(t, c, st, cancel)
			_, streamErr := st.Result()
			tc.want(t, streamErr, <-pinged)
			if st.HighWater() > 2 && tc.name != "SIGKILL" {
				t.Errorf("the stream held %d chunks", st.HighWater())
			}
		})
	}
}
