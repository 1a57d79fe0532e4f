package sidecar_test

import (
	"context"
	"strings"
	"testing"
	"time"

	sidecar "github.com/mlx-sidecar/mlx-sidecar/clients/go"
)

// TestPeriodicMetrics: with OnMetrics and MetricsInterval, the runtime's $/metrics snapshots
// reach the callback, typed, and follow what the test sent.
func TestPeriodicMetrics(t *testing.T) {
	got := make(chan sidecar.Metrics, 1024)
	c := start(t, sidecar.Options{
		MetricsInterval: 50 * time.Millisecond,
		OnMetrics:       func(m sidecar.Metrics) { got <- m },
	})
	ctx := testContext(t)
	loadTiny(t, c, "m")
	st, err := c.Generate(ctx, &sidecar.GenerateParams{Model: "m", Prompt: "Hi", MaxTokens: 5})
	if err != nil {
		t.Fatal(err)
	}
	res, err := st.Result()
	if err != nil || res.Usage.CompletionTokens != 5 {
		t.Fatalf("Generate: %v %+v", err, res)
	}
	// Snapshots taken after the answer show it; earlier ones may not yet.
	for {
		select {
		case m := <-got:
			if m.Requests["generate"]["ok"] == 0 {
				continue
			}
			if m.Requests["model/load"]["ok"] != 1 || m.Requests["initialize"]["ok"] != 1 || m.Tokens.Completion != 5 ||
				m.Tokens.Prompt != int64(res.Usage.PromptTokens) || m.LatencyMs.InterToken.Count != 4 || m.Gauges.RequestsInFlight != 0 {
				t.Fatalf("$/metrics: %+v", m)
			}
			return
		case <-ctx.Done():
			t.Fatal("no $/metrics showed the generate answered")
		}
	}
}

// TestMetricsIntervalTooShort: the client refuses an interval the runtime would refuse.
func TestMetricsIntervalTooShort(t *testing.T) {
	_, err := sidecar.Start(context.Background(), sidecar.Options{
		MetricsInterval: 10 * time.Millisecond,
		OnMetrics:       func(sidecar.Metrics) {},
	})
	if err == nil || !strings.Contains(err.Error(), "50 ms") {
		t.Fatalf("Start: %v", err)
	}
}
