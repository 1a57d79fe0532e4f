package sidecar

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestRestartPolicyDecide(t *testing.T) {
	p := (&RestartPolicy{}).withDefaults()
	if p.MaxCrashes != 5 || p.Window != 180*time.Second {
		t.Fatalf("defaults: %+v", p)
	}
	t0 := time.Unix(1000, 0)
	var crashes []time.Time
	var delays []time.Duration
	for i := 0; i < 4; i++ {
		var delay time.Duration
		var giveUp bool
		crashes, delay, giveUp = p.decide(crashes, t0.Add(time.Duration(i)*time.Second))
		if giveUp {
			t.Fatalf("gave up after %d crashes", i+1)
		}
		delays = append(delays, delay)
	}
	if want := []time.Duration{100, 200, 400, 800}; !equalDurations(delays, want, time.Millisecond) {
		t.Errorf("backoff %v, want %v ms", delays, want)
	}
	// The fifth crash within 180 s gives up.
	if _, _, giveUp := p.decide(crashes, t0.Add(100*time.Second)); !giveUp {
		t.Error("did not give up at the fifth crash within the window")
	}
	// A fifth crash after the first ones left the window does not.
	recent, delay, giveUp := p.decide(crashes, t0.Add(181*time.Second+500*time.Millisecond))
	if giveUp || len(recent) != 3 || delay != 400*time.Millisecond {
		t.Errorf("after the window: %d recent, %v, give up %v", len(recent), delay, giveUp)
	}
	// The backoff stops growing at MaxBackoff.
	q := (&RestartPolicy{MaxCrashes: 100, MinBackoff: time.Second, MaxBackoff: 3 * time.Second}).withDefaults()
	crashes = nil
	for i := 0; i < 10; i++ {
		crashes, delay, _ = q.decide(crashes, t0)
	}
	if delay != 3*time.Second {
		t.Errorf("capped backoff: %v", delay)
	}
}

func equalDurations(got []time.Duration, want []time.Duration, unit time.Duration) bool {
	if len(got) != len(want) {
		return false
	}
	for i := range got {
		if got[i] != want[i]*unit {
			return false
		}
	}
	return true
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
