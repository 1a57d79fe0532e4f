package sidecar_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	sidecar "github.com/mlx-sidecar/mlx-sidecar/clients/go"
)

// TestEveryMethod runs every method, in every framing, against the real runtime.
func TestEveryMethod(t *testing.T) {
	for _, framing := range sidecar.Framings {
		t.Run(string(framing), func(t *testing.T) {
			var mu sync.Mutex
			var progress []sidecar.Progress
			c := start(t, sidecar.Options{
				Framing: framing,
				OnProgress: func(p sidecar.Progress) {
					mu.Lock()
					progress = append(progress, p)
					mu.Unlock()
				},
			})
			ctx := testContext(t)

			init := c.InitializeResult()
			if init == nil || init.Capabilities.Framing != string(framing) || init.ProtocolVersion != sidecar.ProtocolVersion {
				t.Fatalf("initialize: %+v", init)
			}
			if err := c.Ping(ctx); err != nil {
				t.Fatalf("Ping: %v", err)
			}
			info, err := c.Info(ctx)
			if err != nil {
				t.Fatalf("Info: %v", err)
			}
			if info.PID != c.PID() || info.Framing != string(framing) {
				t.Errorf("Info: pid %d framing %s; the client says pid %d", info.PID, info.Framing, c.PID())
			}

			m := loadTiny(t, c, "m")
			if m.ID != "m" || m.Architecture != "llama" || m.ContextLength == nil || *m.ContextLength < 100 {
				t.Errorf("LoadModel: %+v", m)
			}
			// Callbacks run on their own goroutine; by now the load's progress has been queued
			// (it came before the answer), and ListModels gives the callbacks time to run.
			models, err := c.ListModels(ctx)
			if err != nil || len(models) != 1 || models[0].ID != "m" {
				t.Fatalf("ListModels: %v %+v", err, models)
			}
			metrics, err := c.Metrics(ctx)
			if err != nil || metrics.Requests["model/load"]["ok"] != 1 || metrics.Requests["runtime/ping"]["ok"] != 1 {
				t.Errorf("Metrics: %v %+v", err, metrics)
			}
			mu.Lock()
			got := append([]sidecar.Progress(nil), progress...)
			mu.Unlock()
			if len(got) < 2 || got[0].Value.Kind != "begin" || got[len(got)-1].Value.Kind != "end" {
				t.Errorf("progress: %+v", got)
			}

			tok, err := c.Tokenize(ctx, &sidecar.TokenizeParams{Model: "m", Text: "Hello world"})
			if err != nil || len(tok.Tokens) == 0 {
				t.Fatalf("Tokenize: %v %+v", err, tok)
			}
			detok, err := c.Detokenize(ctx, &sidecar.DetokenizeParams{Model: "m", Tokens: tok.Tokens})
			if err != nil || !strings.Contains(detok.Text, "Hello") {
				t.Fatalf("Detokenize: %v %+v", err, detok)
			}
			chat, err := c.Tokenize(ctx, &sidecar.TokenizeParams{Model: "m", Messages: []sidecar.Message{{Role: "user", Content: "Hi"}}})
			if err != nil || chat.Text == "" {
				t.Fatalf("Tokenize messages: %v %+v", err, chat)
			}

			// Streaming.
			st, err := c.Generate(ctx, &sidecar.GenerateParams{
				Model: "m", Prompt: "Hello", MaxTokens: 12, Temperature: sidecar.Ptr(0.0),
				StreamOptions: &sidecar.StreamOptions{ChunkTokens: 2},
			})
			if err != nil {
				t.Fatalf("Generate: %v", err)
			}
			var text strings.Builder
			tokens, index := 0, 0
			for ch, err := range st.Chunks() {
				if err != nil {
					t.Fatalf("chunk: %v", err)
				}
				if ch.Index != index {
					t.Fatalf("chunk index %d, want %d", ch.Index, index)
				}
				if ch.ID != st.ID() {
					t.Fatalf("chunk id %v, want %v", ch.ID, st.ID())
				}
				index++
				tokens += len(ch.TokenIDs)
				text.WriteString(ch.Text)
			}
			res, err := st.Result()
			if err != nil {
				t.Fatalf("Result: %v", err)
			}
			if res.FinishReason != "length" || res.Usage.CompletionTokens != 12 || tokens != 12 || res.Text != text.String() || index < 2 {
				t.Errorf("streamed %d chunks, %d tokens, %q; result %+v", index, tokens, text.String(), res)
			}

			// Not streaming, with chat messages: no chunks at all; same greedy text twice.
			var results [2]*sidecar.GenerateResult
			for i := range results {
				st, err := c.Generate(ctx, &sidecar.GenerateParams{
					Model: "m", Messages: []sidecar.Message{{Role: "user", Content: "Hi"}},
					MaxTokens: 5, Temperature: sidecar.Ptr(0.0), Stream: sidecar.Ptr(false),
				})
				if err != nil {
					t.Fatalf("Generate: %v", err)
				}
				for ch, err := range st.Chunks() {
					t.Fatalf("unexpected chunk %+v %v", ch, err)
				}
				if results[i], err = st.Result(); err != nil {
					t.Fatalf("Result: %v", err)
				}
			}
			if results[0].Text != results[1].Text || results[0].Usage.CompletionTokens != 5 {
				t.Errorf("non-streaming results: %+v %+v", results[0], results[1])
			}

			// Errors answered by the runtime.
			if st, err = c.Generate(ctx, &sidecar.GenerateParams{Model: "nope", Prompt: "x"}); err != nil {
				t.Fatalf("Generate: %v", err)
			}
			var rpc *sidecar.RPCError
			if _, err := st.Result(); !errors.As(err, &rpc) || rpc.Code != sidecar.CodeModelNotFound || rpc.Type() != "model_not_found" {
				t.Errorf("unknown model: %v", err)
			}
			err = c.Call(ctx, "generate", map[string]any{"model": "m", "prompt": "x", "temperature": "hot"}, nil)
			if !errors.As(err, &rpc) || rpc.Code != sidecar.CodeInvalidParams || rpc.Path() != "/temperature" {
				t.Errorf("bad params: %v", err)
			}
			if err := c.Call(ctx, "no/such", nil, nil); !errors.As(err, &rpc) || rpc.Code != sidecar.CodeMethodNotFound {
				t.Errorf("no such method: %v", err)
			}

			if r, err := c.UnloadModel(ctx, &sidecar.ModelUnloadParams{Model: "m"}); err != nil || r.ID != "m" {
				t.Fatalf("UnloadModel: %v %+v", err, r)
			}
			if models, err := c.ListModels(ctx); err != nil || len(models) != 0 {
				t.Fatalf("ListModels after unload: %v %+v", err, models)
			}
		})
	}
}

// TestPipelinedPings has many requests in flight at once, in every framing.
func TestPipelinedPings(t *testing.T) {
	for _, framing := range sidecar.Framings {
		t.Run(string(framing), func(t *testing.T) {
			c := start(t, sidecar.Options{Framing: framing})
			ctx := testContext(t)
			var wg sync.WaitGroup
			var failed atomic.Int64
			for w := 0; w < 64; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; i < 20; i++ {
						if err := c.Ping(ctx); err != nil {
							failed.Add(1)
							t.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			if failed.Load() != 0 {
				t.Fatalf("%d workers failed", failed.Load())
			}
		})
	}
}

// TestPipelinedLoadThenGenerate writes model/load and generate without waiting in between:
// the runtime runs engine work in order, so the generate finds its model.
func TestPipelinedLoadThenGenerate(t *testing.T) {
	c := start(t, sidecar.Options{})
	ctx := testContext(t)
	loaded := make(chan error, 1)
	go func() {
		_, err := c.LoadModel(ctx, &sidecar.ModelLoadParams{Model: modelDir, ID: "p"})
		loaded <- err
	}()
	// Wait until the load is in flight (the runtime counts it), then generate at once.
	for {
		info, err := c.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if info.InFlight.Requests > 1 || len(info.Models) == 1 {
			break
		}
	}
	st, err := c.Generate(ctx, &sidecar.GenerateParams{Model: "p", Prompt: "Hello", MaxTokens: 3})
	if err != nil {
		t.Fatal(err)
	}
	if res, err := st.Result(); err != nil || res.Usage.CompletionTokens != 3 {
		t.Fatalf("generate after a pipelined load: %v %+v", err, res)
	}
	if err := <-loaded; err != nil {
		t.Fatal(err)
	}
}

// TestStderrAndLogLevel: the runtime's log lines reach Options.OnStderr.
func TestStderrAndLogLevel(t *testing.T) {
	lines := make(chan string, 1000)
	c := start(t, sidecar.Options{LogLevel: "debug", OnStderr: func(l string) {
		select {
		case lines <- l:
		default:
		}
	}})
	loadTiny(t, c, "m")
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	close(lines)
	n := 0
	for l := range lines {
		if strings.HasPrefix(l, "mlx-sidecar ") {
			n++
		}
	}
	if n == 0 {
		t.Fatal("no stderr line reached OnStderr")
	}
}

// TestCallContextCancel: a plain call whose context ends returns at once, and the runtime
// stops the work (nothing is left in flight).
func TestCallContextCancel(t *testing.T) {
	c := start(t, sidecar.Options{})
	loadTiny(t, c, "m")
	ctx, cancel := context.WithCancel(testContext(t))
	errc := make(chan error, 1)
	go func() {
		errc <- c.Call(ctx, "generate", &sidecar.GenerateParams{Model: "m", Prompt: "Hello", MaxTokens: 100000, Stream: sidecar.Ptr(false)}, nil)
	}()
	waitInFlight(t, c, 1)
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("Call after cancel: %v", err)
	}
	waitInFlight(t, c, 0)
}

// waitInFlight waits until runtime/info counts n generations (besides itself).
func waitInFlight(t *testing.T, c *sidecar.Client, n int) {
	t.Helper()
	ctx := testContext(t)
	for i := 0; ; i++ {
		info, err := c.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if info.InFlight.Generating+info.InFlight.Queued == n {
			return
		}
		if i > 5000 {
			t.Fatalf("in flight: %+v, want %d", info.InFlight, n)
		}
	}
}
