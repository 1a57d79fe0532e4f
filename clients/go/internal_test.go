package sidecar

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestRestartPolicyDecide(t *testing.T) {
	p := (&RestartPolicy{}).withDefaults()
	if p.MaxCrashes != 5 || p.Window != 180*time.Second || p.MinBackoff != 250*time.Millisecond ||
		p.MaxBackoff != 5*time.Second || p.Jitter != 0.2 || p.HealthyAfter != 30*time.Second {
		t.Fatalf("defaults: %+v", p)
	}
	type crash struct {
		at     time.Duration // since t0
		uptime time.Duration // of the process that crashed
		rnd    float64       // picks the jitter: 0.5 is none
		delay  time.Duration // want; -1: give up
	}
	ms := time.Millisecond
	s := time.Second
	cases := []struct {
		name    string
		policy  RestartPolicy
		crashes []crash
	}{
		{"doubling, then giving up at the fifth crash within the window", RestartPolicy{}, []crash{
			{0, s, 0.5, 250 * ms}, {s, s, 0.5, 500 * ms}, {2 * s, s, 0.5, s}, {3 * s, s, 0.5, 2 * s}, {100 * s, s, 0.5, -1},
		}},
		{"capped at MaxBackoff", RestartPolicy{MaxCrashes: 100}, []crash{
			{0, 0, 0.5, 250 * ms}, {0, 0, 0.5, 500 * ms}, {0, 0, 0.5, s}, {0, 0, 0.5, 2 * s}, {0, 0, 0.5, 4 * s}, {0, 0, 0.5, 5 * s}, {0, 0, 0.5, 5 * s},
		}},
		{"a process that ran 30 s starts the backoff over", RestartPolicy{MaxCrashes: 100}, []crash{
			{0, 0, 0.5, 250 * ms}, {s, 0, 0.5, 500 * ms}, {2 * s, 29 * s, 0.5, s}, {40 * s, 30 * s, 0.5, 250 * ms}, {41 * s, 0, 0.5, 500 * ms},
		}},
		{"crashes older than the window are forgotten", RestartPolicy{}, []crash{
			{0, 0, 0.5, 250 * ms}, {s, 0, 0.5, 500 * ms}, {2 * s, 0, 0.5, s}, {3 * s, 0, 0.5, 2 * s}, {180*s + 500*ms, 0, 0.5, 4 * s}, {180*s + 800*ms, 0, 0.5, -1},
		}},
		{"jitter spreads each wait by 20%", RestartPolicy{MaxCrashes: 100}, []crash{
			{0, 0, 0, 200 * ms}, {0, 0, 0.75, 550 * ms}, {0, 0, 0.25, 900 * ms},
		}},
		{"no jitter", RestartPolicy{MaxCrashes: 100, Jitter: -1}, []crash{
			{0, 0, 0, 250 * ms}, {0, 0, 0.99, 500 * ms},
		}},
		{"custom backoff", RestartPolicy{MaxCrashes: 100, MinBackoff: s, MaxBackoff: 3 * s, Jitter: -1}, []crash{
			{0, 0, 0, s}, {0, 0, 0, 2 * s}, {0, 0, 0, 3 * s}, {0, 0, 0, 3 * s},
		}},
	}
	t0 := time.Unix(1000, 0)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := tc.policy.withDefaults()
			var r crashRecord
			for i, c := range tc.crashes {
				delay, giveUp := p.decide(&r, t0.Add(c.at), c.uptime, c.rnd)
				if giveUp != (c.delay < 0) || (!giveUp && delay != c.delay) {
					t.Fatalf("crash %d: delay %v, give up %v; want %v", i+1, delay, giveUp, c.delay)
				}
			}
		})
	}
}

func TestTailBuffer(t *testing.T) {
	tb := &tailBuffer{max: 10}
	tb.Write([]byte("hello "))
	tb.Write([]byte("world!"))
	if got := tb.String(); got != "llo world!" {
		t.Errorf("%q", got)
	}
	tb.Write([]byte(strings.Repeat("x", 25) + "end"))
	if got := tb.String(); got != "xxxxxxxend" {
		t.Errorf("%q", got)
	}
}

func TestErrorMessages(t *testing.T) {
	ee := &ExitError{Code: 2, Stderr: "a\nb\nc\nd\ne\nf\ng\nusage: bad flag\n"}
	msg := ee.Error()
	if !strings.Contains(msg, "status 2") || !strings.Contains(msg, "usage: bad flag") || strings.Contains(msg, "\na\n") {
		t.Errorf("%q", msg)
	}
	if !errors.Is(ee, ErrProcessExited) {
		t.Error("ExitError does not wrap ErrProcessExited")
	}
	rpc := &RPCError{Code: CodeInvalidParams, Message: "bad", Data: []byte(`{"type":"invalid_params","path":"/x"}`)}
	if rpc.Error() != "sidecar: bad (code -32602, invalid_params at /x)" || rpc.Type() != "invalid_params" || rpc.Path() != "/x" {
		t.Errorf("%q", rpc.Error())
	}
	ge := &GenerateError{Text: "so far", FinishReason: "cancelled", Usage: &Usage{CompletionTokens: 3}, Err: rpc}
	var got *RPCError
	if !errors.As(ge, &got) || !strings.Contains(ge.Error(), "after 3 tokens") {
		t.Errorf("%v", ge)
	}
	id := StringID("x")
	if b, _ := id.MarshalJSON(); string(b) != `"x"` {
		t.Errorf("%s", b)
	}
	var back RequestID
	if err := back.UnmarshalJSON([]byte("12")); err != nil || back != IntID(12) {
		t.Errorf("%v %v", back, err)
	}
	if err := back.UnmarshalJSON([]byte("1.5")); err == nil {
		t.Error("a float id was accepted")
	}
}
