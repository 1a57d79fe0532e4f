package sidecar_test

// Replays protocol/vectors/*.json against the real runtime through the client's own pipe and
// framing (SendMessage, WriteRaw and OnMessage), in every framing a vector allows. The
// matcher follows protocol/vectors/README.md.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	sidecar "github.com/mlx-sidecar/mlx-sidecar/clients/go"
)

type vector struct {
	Name       string            `json:"name"`
	NeedsModel bool              `json:"needs_model"`
	Framings   []sidecar.Framing `json:"framings"`
	Steps      []map[string]json.RawMessage
}

var stepKeys = []string{"send", "send_raw", "expect", "expect_batch", "chunks", "progress"}

func TestVectors(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(repoRoot, "protocol", "vectors", "*.json"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no vectors: %v", err)
	}
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		var v vector
		if err := json.Unmarshal(data, &v); err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		framings := v.Framings
		if len(framings) == 0 {
			framings = sidecar.Framings
		}
		for _, framing := range sidecar.Framings {
			name := strings.TrimSuffix(filepath.Base(file), ".json") + "/" + string(framing)
			t.Run(name, func(t *testing.T) {
				if !slices.Contains(framings, framing) {
					t.Skipf("the vector is limited to %v", framings)
				}
				replay(t, v, framing)
			})
		}
	}
}

// inbox collects every message the client reads.
type inbox chan json.RawMessage

func (in inbox) next(t *testing.T) map[string]any {
	t.Helper()
	select {
	case raw := <-in:
		return decode(t, raw)
	case <-time.After(60 * time.Second):
		t.Fatal("no message from the runtime within 60 s")
		return nil
	}
}

func (in inbox) nextAny(t *testing.T) any {
	t.Helper()
	select {
	case raw := <-in:
		return decodeAny(t, raw)
	case <-time.After(60 * time.Second):
		t.Fatal("no message from the runtime within 60 s")
		return nil
	}
}

func decodeAny(t *testing.T, raw []byte) any {
	t.Helper()
	d := json.NewDecoder(bytes.NewReader(raw))
	d.UseNumber()
	var v any
	if err := d.Decode(&v); err != nil {
		t.Fatalf("undecodable message %s: %v", raw, err)
	}
	return v
}

func decode(t *testing.T, raw []byte) map[string]any {
	t.Helper()
	m, _ := decodeAny(t, raw).(map[string]any)
	return m
}

func replay(t *testing.T, v vector, framing sidecar.Framing) {
	in := make(inbox, 1<<16)
	c := start(t, sidecar.Options{Framing: framing, OnMessage: func(m json.RawMessage) { in <- m }})
	ctx := testContext(t)
	// Drop the answer to the client's own initialize.
	for len(in) > 0 {
		<-in
	}
	for i, step := range v.Steps {
		for k := range step {
			if !slices.Contains(stepKeys, k) {
				t.Fatalf("step %d: unknown key %q (the runner needs updating)", i, k)
			}
		}
		var wantChunks, wantProgress bool
		_ = json.Unmarshal(step["chunks"], &wantChunks)
		_ = json.Unmarshal(step["progress"], &wantProgress)
		expect, hasExpect := step["expect"]
		expectBatch, hasBatch := step["expect_batch"]

		if raw, ok := step["send_raw"]; ok {
			var text string
			if err := json.Unmarshal(raw, &text); err != nil {
				t.Fatalf("step %d: send_raw: %v", i, err)
			}
			if len(v.Framings) != 1 {
				t.Fatalf("step %d: send_raw in a vector not limited to one framing", i)
			}
			if err := c.WriteRaw(ctx, []byte(text)); err != nil {
				t.Fatal(err)
			}
			if !hasExpect {
				continue
			}
			var got map[string]any
			for {
				got = in.next(t)
				if _, isNote := got["method"]; !isNote {
					break
				}
			}
			if err := match(decodeAny(t, expect), got, ""); err != nil {
				t.Fatalf("step %d (send_raw %q): %v\ngot %s", i, text, err, show(got))
			}
			continue
		}

		send := substitute(decodeAny(t, step["send"]), "${MODEL}", modelDir)
		msg, _ := json.Marshal(send)
		if err := c.SendMessage(ctx, msg); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		if !hasExpect && !hasBatch {
			continue // a notification
		}
		if batch, ok := send.([]any); ok {
			var got []any
			for got == nil {
				got, _ = in.nextAny(t).([]any)
			}
			var err error
			if hasBatch {
				err = matchMultiset(decodeAny(t, expectBatch).([]any), got)
			} else {
				err = match(decodeAny(t, expect), got, "")
			}
			if err != nil {
				t.Fatalf("step %d (batch of %d): %v\ngot %s", i, len(batch), err, show(got))
			}
			continue
		}
		id := send.(map[string]any)["id"]
		var notes []map[string]any
		var answer map[string]any
		for answer == nil {
			m := in.next(t)
			if _, isNote := m["method"]; isNote {
				if _, hasID := m["id"]; !hasID {
					notes = append(notes, m)
					continue
				}
			}
			if gotID, ok := m["id"]; ok && equal(gotID, id) {
				answer = m
			}
		}
		if err := match(decodeAny(t, expect), answer, ""); err != nil {
			t.Fatalf("step %d (%v): %v\ngot %s", i, send.(map[string]any)["method"], err, show(answer))
		}
		if err := checkChunks(notes, id, answer, wantChunks); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		if err := checkProgress(notes, id, wantProgress); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
	}
}

func show(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// substitute replaces old with new in every string (and object key) of v.
func substitute(v any, old, new string) any {
	switch v := v.(type) {
	case string:
		return strings.ReplaceAll(v, old, new)
	case []any:
		for i := range v {
			v[i] = substitute(v[i], old, new)
		}
		return v
	case map[string]any:
		out := make(map[string]any, len(v))
		for k, x := range v {
			out[strings.ReplaceAll(k, old, new)] = substitute(x, old, new)
		}
		return out
	}
	return v
}

// checkChunks: with want, generate/chunk for id arrived with index 0, 1, ... in order, their
// text joined is the answer's text and their tokens count its completion tokens; without,
// none arrived.
func checkChunks(notes []map[string]any, id any, answer map[string]any, want bool) error {
	var chunks []map[string]any
	for _, n := range notes {
		p, _ := n["params"].(map[string]any)
		if n["method"] == "generate/chunk" && p != nil && equal(p["id"], id) {
			chunks = append(chunks, p)
		}
	}
	if !want {
		if len(chunks) > 0 {
			return fmt.Errorf("%d generate/chunk arrived; none expected", len(chunks))
		}
		return nil
	}
	if len(chunks) == 0 {
		return fmt.Errorf("no generate/chunk arrived")
	}
	var text strings.Builder
	tokens := 0
	for i, ch := range chunks {
		if !equal(ch["index"], json.Number(fmt.Sprint(i))) {
			return fmt.Errorf("chunk %d has index %v", i, ch["index"])
		}
		s, _ := ch["text"].(string)
		text.WriteString(s)
		ids, _ := ch["token_ids"].([]any)
		tokens += len(ids)
	}
	body, _ := answer["result"].(map[string]any)
	if body == nil {
		errObj, _ := answer["error"].(map[string]any)
		body, _ = errObj["data"].(map[string]any)
	}
	usage, _ := body["usage"].(map[string]any)
	if got, _ := body["text"].(string); got != text.String() {
		return fmt.Errorf("chunks joined are %q; the answer's text is %q", text.String(), got)
	}
	if !equal(usage["completion_tokens"], json.Number(fmt.Sprint(tokens))) {
		return fmt.Errorf("chunks carry %d tokens; usage says %v", tokens, usage["completion_tokens"])
	}
	return nil
}

// checkProgress: with want, at least one $/progress for id arrived, the first of kind begin and
// the last of kind end.
func checkProgress(notes []map[string]any, id any, want bool) error {
	if !want {
		return nil
	}
	var kinds []any
	for _, n := range notes {
		p, _ := n["params"].(map[string]any)
		if n["method"] == "$/progress" && p != nil && equal(p["token"], id) {
			value, _ := p["value"].(map[string]any)
			kinds = append(kinds, value["kind"])
		}
	}
	if len(kinds) == 0 || kinds[0] != "begin" || kinds[len(kinds)-1] != "end" {
		return fmt.Errorf("$/progress kinds %v; want begin ... end", kinds)
	}
	return nil
}

// ---- the matcher ----

// match reports how value fails pattern, or nil.
func match(pattern, value any, path string) error {
	if s, ok := pattern.(string); ok && strings.HasPrefix(s, "$") {
		if ok, known := matchType(s, value); known {
			if !ok {
				return fmt.Errorf("%s: %s does not match %s", pathOr(path), show(value), s)
			}
			return nil
		}
	}
	switch p := pattern.(type) {
	case map[string]any:
		obj, ok := value.(map[string]any)
		if !ok {
			return fmt.Errorf("%s: %s is not an object", pathOr(path), show(value))
		}
		keys := make([]string, 0, len(p))
		for k := range p {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			got, present := obj[k]
			if p[k] == "$absent" {
				if present {
					return fmt.Errorf("%s/%s: present (%s); want it absent", path, k, show(got))
				}
				continue
			}
			if !present {
				return fmt.Errorf("%s/%s: absent", path, k)
			}
			if err := match(p[k], got, path+"/"+k); err != nil {
				return err
			}
		}
		return nil
	case []any:
		arr, ok := value.([]any)
		if !ok || len(arr) != len(p) {
			return fmt.Errorf("%s: %s is not an array of %d", pathOr(path), show(value), len(p))
		}
		for i := range p {
			if err := match(p[i], arr[i], fmt.Sprintf("%s/%d", path, i)); err != nil {
				return err
			}
		}
		return nil
	}
	if !equal(pattern, value) {
		return fmt.Errorf("%s: %s, want %s", pathOr(path), show(value), show(pattern))
	}
	return nil
}

func pathOr(p string) string {
	if p == "" {
		return "(root)"
	}
	return p
}

// matchType matches the "$type" patterns; known is false for any other string.
func matchType(pattern string, v any) (ok, known bool) {
	switch pattern {
	case "$any":
		return true, true
	case "$string":
		_, ok = v.(string)
	case "$number":
		_, ok = v.(json.Number)
	case "$integer":
		n, isNum := v.(json.Number)
		ok = isNum && !strings.ContainsAny(string(n), ".eE")
	case "$boolean":
		_, ok = v.(bool)
	case "$object":
		_, ok = v.(map[string]any)
	case "$array":
		_, ok = v.([]any)
	case "$null":
		ok = v == nil
	default:
		return false, false
	}
	return ok, true
}

// equal compares JSON values; numbers by value (1 equals 1.0).
func equal(a, b any) bool {
	if x, ok := a.(json.Number); ok {
		y, ok := b.(json.Number)
		if !ok {
			return false
		}
		fx, _, errx := big.ParseFloat(string(x), 10, 256, big.ToNearestEven)
		fy, _, erry := big.ParseFloat(string(y), 10, 256, big.ToNearestEven)
		return errx == nil && erry == nil && fx.Cmp(fy) == 0
	}
	switch x := a.(type) {
	case map[string]any:
		y, ok := b.(map[string]any)
		if !ok || len(x) != len(y) {
			return false
		}
		for k, v := range x {
			if w, ok := y[k]; !ok || !equal(v, w) {
				return false
			}
		}
		return true
	case []any:
		y, ok := b.([]any)
		if !ok || len(x) != len(y) {
			return false
		}
		for i := range x {
			if !equal(x[i], y[i]) {
				return false
			}
		}
		return true
	}
	return a == b
}

// matchMultiset matches an array against patterns in any order, each element to its own
// pattern.
func matchMultiset(patterns, values []any) error {
	if len(patterns) != len(values) {
		return fmt.Errorf("%d answers; want %d", len(values), len(patterns))
	}
	used := make([]bool, len(values))
	var assign func(i int) bool
	assign = func(i int) bool {
		if i == len(patterns) {
			return true
		}
		for j := range values {
			if !used[j] && match(patterns[i], values[j], "") == nil {
				used[j] = true
				if assign(i + 1) {
					return true
				}
				used[j] = false
			}
		}
		return false
	}
	if !assign(0) {
		return fmt.Errorf("the answers do not match the patterns in any order")
	}
	return nil
}

// TestMatcher pins the matcher's rules.
func TestMatcher(t *testing.T) {
	cases := []struct {
		pattern, value string
		ok             bool
	}{
		{`"$any"`, `null`, true},
		{`"$string"`, `"x"`, true},
		{`"$string"`, `1`, false},
		{`"$number"`, `1.5`, true},
		{`"$number"`, `"1"`, false},
		{`"$integer"`, `3`, true},
		{`"$integer"`, `3.0`, false},
		{`"$integer"`, `true`, false},
		{`"$boolean"`, `false`, true},
		{`"$object"`, `{}`, true},
		{`"$object"`, `[]`, false},
		{`"$array"`, `[1]`, true},
		{`"$null"`, `null`, true},
		{`"$null"`, `0`, false},
		{`1`, `1.0`, true},
		{`1`, `1e0`, true},
		{`1`, `2`, false},
		{`"a"`, `"a"`, true},
		{`{"a": 1}`, `{"a": 1, "b": 2}`, true},
		{`{"a": 1}`, `{"b": 2}`, false},
		{`{"a": "$absent"}`, `{"b": 2}`, true},
		{`{"a": "$absent"}`, `{"a": null}`, false},
		{`{"a": "$any"}`, `{}`, false},
		{`[1, "$string"]`, `[1, "x"]`, true},
		{`[1]`, `[1, 2]`, false},
		{`{"a": {"b": [{"c": "$integer"}]}}`, `{"a": {"b": [{"c": 7, "d": 0}]}}`, true},
		{`{}`, `{"a": 1}`, true},
		{`null`, `null`, true},
		{`null`, `0`, false},
	}
	for _, tc := range cases {
		err := match(decodeAny(t, []byte(tc.pattern)), decodeAny(t, []byte(tc.value)), "")
		if (err == nil) != tc.ok {
			t.Errorf("match(%s, %s) = %v; want ok=%v", tc.pattern, tc.value, err, tc.ok)
		}
	}
	pats := decodeAny(t, []byte(`[{"id": "$integer"}, {"id": 1}]`)).([]any)
	vals := decodeAny(t, []byte(`[{"id": 1}, {"id": 2}]`)).([]any)
	if err := matchMultiset(pats, vals); err != nil {
		t.Errorf("multiset needing backtracking: %v", err)
	}
	vals = decodeAny(t, []byte(`[{"id": 2}, {"id": 3}]`)).([]any)
	if err := matchMultiset(pats, vals); err == nil {
		t.Error("multiset matched without an element for {id: 1}")
	}
}
