package sidecar

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/vmihailenco/msgpack/v5"
)

var roundTripMessages = []string{
	`{"jsonrpc":"2.0","id":1,"method":"runtime/ping"}`,
	`{"jsonrpc":"2.0","id":"abc","result":{}}`,
	`{"jsonrpc":"2.0","method":"generate/chunk","params":{"id":7,"index":0,"text":"a\u0005\n\"é😀","token_ids":[1,2,419]}}`,
	`{"jsonrpc":"2.0","id":3,"result":{"load_ms":12.5,"whole":1.0,"neg":-3,"big":18446744073709551615,"small":-9223372036854775808,"exp":1e-7,"null":null,"t":true,"f":false}}`,
	`[{"jsonrpc":"2.0","id":1,"result":{}},{"jsonrpc":"2.0","id":2,"error":{"code":-32601,"message":"m","data":{"type":"method_not_found"}}}]`,
	`{"a":{"b":{"c":[[[]],{}]}}}`,
	`"just a string"`,
	`42`,
}

// TestFramingRoundTrip: every message survives every framing, alone and in a stream, and
// numbers keep their kind (1.0 stays a float, 1 an integer).
func TestFramingRoundTrip(t *testing.T) {
	for _, f := range Framings {
		var stream []byte
		for _, m := range roundTripMessages {
			var err error
			if stream, err = appendFrame(f, stream, []byte(m)); err != nil {
				t.Fatalf("%s: appendFrame(%s): %v", f, m, err)
			}
		}
		r := newFrameReader(f, bytes.NewReader(stream), 0)
		for _, m := range roundTripMessages {
			got, err := r.ReadFrame()
			if err != nil {
				t.Fatalf("%s: ReadFrame for %s: %v", f, m, err)
			}
			if !sameJSON(t, got, []byte(m)) {
				t.Errorf("%s: read %s; wrote %s", f, got, m)
			}
			if f == MsgPack && strings.Contains(m, `"whole":1.0`) && !bytes.Contains(got, []byte(`"whole":1.0`)) {
				t.Errorf("msgpack: a float came back as %s", got)
			}
		}
		if _, err := r.ReadFrame(); err != io.EOF {
			t.Errorf("%s: after the last frame: %v, want io.EOF", f, err)
		}
	}
}

// sameJSON compares two JSON texts by value, numbers by their literal.
func sameJSON(t *testing.T, a, b []byte) bool {
	t.Helper()
	var x, y any
	da := json.NewDecoder(bytes.NewReader(a))
	da.UseNumber()
	db := json.NewDecoder(bytes.NewReader(b))
	db.UseNumber()
	if err := da.Decode(&x); err != nil {
		t.Fatalf("invalid JSON %q: %v", a, err)
	}
	if err := db.Decode(&y); err != nil {
		t.Fatalf("invalid JSON %q: %v", b, err)
	}
	return reflect.DeepEqual(normalizeNumbers(x), normalizeNumbers(y))
}

// normalizeNumbers writes 1e-7 and 1e-07 alike while keeping 64-bit integers and floats apart.
func normalizeNumbers(v any) any {
	switch v := v.(type) {
	case json.Number:
		if isIntegerLiteral(string(v)) {
			// An integer past 64 bits can only travel as a float (MessagePack has no bigger).
			// Compare by value: "-0" and "0" are the same integer (MessagePack has no -0).
			if n, err := strconv.ParseInt(string(v), 10, 64); err == nil {
				return "int:" + strconv.FormatInt(n, 10)
			}
			if n, err := strconv.ParseUint(string(v), 10, 64); err == nil {
				return "int:" + strconv.FormatUint(n, 10)
			}
		}
		f, _ := v.Float64()
		return f
	case []any:
		for i := range v {
			v[i] = normalizeNumbers(v[i])
		}
	case map[string]any:
		for k := range v {
			v[k] = normalizeNumbers(v[k])
		}
	}
	return v
}

func TestNDJSONReader(t *testing.T) {
	in := "\n  \r\n{\"a\":1}\r\n\n[1]\n" + strings.Repeat("x", 100) + "\n{\"b\":2}\n{\"last\":true}"
	r := newFrameReader(NDJSON, strings.NewReader(in), 50)
	want := []string{`{"a":1}`, `[1]`, "", `{"b":2}`, `{"last":true}`}
	for _, w := range want {
		got, err := r.ReadFrame()
		if w == "" {
			if err == nil || isFatalFrameError(err) {
				t.Fatalf("an over-long line: %q %v; want a recoverable error", got, err)
			}
			continue
		}
		if err != nil || string(got) != w {
			t.Fatalf("got %q %v; want %q", got, err, w)
		}
	}
	if _, err := r.ReadFrame(); err != io.EOF {
		t.Fatalf("at the end: %v", err)
	}
	// A line longer than the bufio buffer is assembled.
	long := `{"t":"` + strings.Repeat("y", 3*readBufferSize) + `"}`
	r = newFrameReader(NDJSON, strings.NewReader(long+"\n"+long+"\n"), 0)
	for i := 0; i < 2; i++ {
		if got, err := r.ReadFrame(); err != nil || string(got) != long {
			t.Fatalf("long line %d: %d bytes, %v", i, len(got), err)
		}
	}
}

func TestLSPReader(t *testing.T) {
	ok := "Content-Length: 7\r\nContent-Type: application/json\r\n\r\n{\"a\":1}" +
		"\r\n\r\ncontent-length:2\n\n{}" + // blank lines between frames, bare \n, any case
		"Content-Length: 60\r\n\r\n" + strings.Repeat(" ", 60) + // over the limit: skipped
		"Content-Length: 2\r\n\r\n[]"
	r := newFrameReader(LSP, strings.NewReader(ok), 50)
	for i, w := range []string{`{"a":1}`, `{}`, "", `[]`} {
		got, err := r.ReadFrame()
		if w == "" {
			if err == nil || isFatalFrameError(err) {
				t.Fatalf("frame %d over the limit: %v", i, err)
			}
			continue
		}
		if err != nil || string(got) != w {
			t.Fatalf("frame %d: %q %v; want %q", i, got, err, w)
		}
	}
	if _, err := r.ReadFrame(); err != io.EOF {
		t.Fatalf("at the end: %v", err)
	}
	for _, bad := range []string{
		"Content-Type: x\r\n\r\n{}",
		"Content-Length: -1\r\n\r\n",
		"Content-Length: x\r\n\r\n",
		"no colon\r\n\r\n",
	} {
		if _, err := newFrameReader(LSP, strings.NewReader(bad), 0).ReadFrame(); err == nil || !isFatalFrameError(err) {
			t.Errorf("%q: %v; want a fatal error", bad, err)
		}
	}
	if _, err := newFrameReader(LSP, strings.NewReader("Content-Length: 10\r\n\r\n{}"), 0).ReadFrame(); err != io.ErrUnexpectedEOF {
		t.Errorf("a short body: %v", err)
	}
}

func TestMsgpackReader(t *testing.T) {
	enc := func(v any) []byte {
		b, err := msgpack.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	// What Python's msgpack sends: maps with str keys, bin, float32, int keys.
	stream := append(enc(map[string]any{"id": 1, "bin": []byte("bytes"), "f32": float32(0.5)}), enc(map[any]any{1: "one"})...)
	r := newFrameReader(MsgPack, bytes.NewReader(stream), 0)
	got, err := r.ReadFrame()
	if err != nil || !sameJSON(t, got, []byte(`{"id":1,"bin":"bytes","f32":0.5}`)) {
		t.Fatalf("%s %v", got, err)
	}
	if got, err = r.ReadFrame(); err != nil || string(got) != `{"1":"one"}` {
		t.Fatalf("%s %v", got, err)
	}
	for name, bad := range map[string][]byte{
		"ext":       {0xd4, 0x01, 0x00},
		"nan":       enc(map[string]any{"x": nan()}),
		"truncated": enc(map[string]any{"x": "yyyy"})[:5],
		"huge":      {0xdb, 0xff, 0xff, 0xff, 0xff},
		"deep":      bytes.Repeat([]byte{0x91}, 2000),
	} {
		_, err := newFrameReader(MsgPack, bytes.NewReader(bad), 1<<20).ReadFrame()
		if err == nil || (!isFatalFrameError(err) && err != io.ErrUnexpectedEOF) {
			t.Errorf("%s: %v; want an error that ends the stream", name, err)
		}
	}
}

func nan() float64 {
	var zero float64
	return zero / zero
}

func TestAppendFrameErrors(t *testing.T) {
	// ndjson and lsp frame the bytes as they are, unless ndjson must compact them.
	for _, c := range []struct {
		f   Framing
		msg string
	}{{MsgPack, "{not json"}, {MsgPack, "{} {}"}, {NDJSON, "{\n not json"}} {
		out, err := appendFrame(c.f, []byte("keep"), []byte(c.msg))
		if err == nil || string(out) != "keep" {
			t.Errorf("%s %q: %q %v; want an error and dst unchanged", c.f, c.msg, out, err)
		}
	}
	// A pretty-printed message is compacted onto one ndjson line.
	out, err := appendFrame(NDJSON, nil, []byte("{\n  \"a\": 1\n}"))
	if err != nil || string(out) != "{\"a\":1}\n" {
		t.Errorf("%q %v", out, err)
	}
}

// FuzzReadFrame feeds arbitrary bytes to a frame reader (the first byte picks the framing).
// None may panic, hang or allocate without bound; every msgpack frame must come out as valid
// JSON; and every frame that is valid JSON must survive being written and read again in the
// same framing. Run it with: go test -run='^$' -fuzz=FuzzReadFrame -fuzztime=10s .
func FuzzReadFrame(f *testing.F) {
	for i, framing := range Framings {
		for j, m := range roundTripMessages {
			seed, _ := appendFrame(framing, []byte{byte(i)}, []byte(m))
			if j%3 == 0 { // and a few two-frame streams
				seed, _ = appendFrame(framing, seed, []byte(roundTripMessages[0]))
			}
			f.Add(seed)
		}
	}
	f.Add(append([]byte{1}, "Content-Length: 3\r\n\r\n{}\n"...))
	f.Add(append([]byte{0}, "{\"a\":\n"...))
	f.Add([]byte{2, 0x82, 0xa1, 'a', 0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0, 0xa1, 'b', 0xc0})
	f.Add([]byte{2, 0xdd, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) == 0 {
			return
		}
		framing := Framings[int(data[0])%len(Framings)]
		data = data[1:]
		// Small buffers keep each run cheap and exercise lines longer than the buffer.
		r := newFrameReaderSize(framing, bytes.NewReader(data), 1<<16, 64)
		for i := 0; ; i++ {
			if i > len(data)+1 {
				t.Fatalf("%s: more frames than input bytes", framing)
			}
			frame, err := r.ReadFrame()
			if err != nil {
				if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || isFatalFrameError(err) {
					return
				}
				continue
			}
			if framing == MsgPack && !json.Valid(frame) {
				t.Fatalf("msgpack frame transcoded to invalid JSON: %q", frame)
			}
			if framing == NDJSON && bytes.IndexByte(frame, '\n') >= 0 {
				t.Fatalf("ndjson frame with a newline: %q", frame)
			}
			if i >= 8 || !json.Valid(frame) {
				continue // round-trip the first frames only: each costs a reader
			}
			frame = bytes.Clone(frame)
			again, err := appendFrame(framing, nil, frame)
			if err != nil {
				t.Fatalf("%s: appendFrame(%q): %v", framing, frame, err)
			}
			back, err := newFrameReaderSize(framing, bytes.NewReader(again), 1<<20, 64).ReadFrame()
			if err != nil || !sameJSON(t, back, frame) {
				t.Fatalf("%s: %q came back as %q (%v)", framing, frame, back, err)
			}
			if framing != MsgPack { // any JSON text also survives MessagePack
				packed, err := appendMsgpack(nil, frame)
				if err != nil && (strings.Contains(err.Error(), "out of range") || errors.Is(err, errTooDeep)) {
					continue // a number no float64 holds (1e750), or deeper than the reader reads: refusing it is right
				}
				if err != nil {
					t.Fatalf("appendMsgpack(%q): %v", frame, err)
				}
				back, err := newFrameReaderSize(MsgPack, bytes.NewReader(packed), 1<<20, 64).ReadFrame()
				if err != nil || !sameJSON(t, back, frame) {
					t.Fatalf("msgpack: %q came back as %q (%v)", frame, back, err)
				}
			}
		}
	})
}

// TestMsgpackEncoding: JSON to MessagePack keeps every value (integers exact as int64/uint64,
// other numbers float64, -0 as 0), writes minimal encodings like the msgpack module's own
// encoding of the decoded value, and refuses anything that is not exactly one JSON value.
func TestMsgpackEncoding(t *testing.T) {
	cases := append([]string{
		`0`, `-1`, `-32`, `-33`, `127`, `128`, `255`, `256`, `65535`, `65536`, `4294967295`, `4294967296`,
		`-128`, `-129`, `-32768`, `-32769`, `-2147483648`, `-2147483649`, `9223372036854775807`,
		`18446744073709551615`, `18446744073709551616`, `-9223372036854775809`, `1.5`, `-0.0`, `1e300`, `2E-3`,
		`""`, `"` + strings.Repeat("a", 31) + `"`, `"` + strings.Repeat("b", 32) + `"`, `"` + strings.Repeat("c", 256) + `"`,
		`"` + strings.Repeat("d", 70000) + `"`, `"\u00e9\ud83d\ude00\n\t\"\\\/\b\f\r"`, `"\ud800"`, `"\ud800\u0041"`, `"\udc00\ud800x"`,
		"\"\xff\xfeok\"", `[]`, `{}`, ` [ 1 , [ ] , { "a" : null } , true , false ] `,
		`[` + strings.Repeat(`1,`, 15) + `1]`, `[` + strings.Repeat(`1,`, 65535) + `1]`,
	}, roundTripMessages...)
	for _, c := range cases {
		got, err := appendMsgpack([]byte{0xAA}, []byte(c))
		if err != nil {
			t.Errorf("%.40s: %v", c, err)
			continue
		}
		if got[0] != 0xAA {
			t.Fatalf("%.40s: dst was overwritten", c)
		}
		// Decode both ways and compare values.
		var want any
		d := json.NewDecoder(strings.NewReader(c))
		d.UseNumber()
		if err := d.Decode(&want); err != nil {
			t.Fatalf("%.40s: %v", c, err)
		}
		var back any
		if err := msgpack.Unmarshal(got[1:], &back); err != nil {
			t.Errorf("%.40s: msgpack.Unmarshal: %v", c, err)
			continue
		}
		if !sameMsgpackValue(want, back) {
			t.Errorf("%.40s: %#v came back as %#v", c, want, back)
		}
		// Minimal encodings, as the module writes them (for values without maps).
		if !strings.Contains(c, "{") && !strings.ContainsAny(c, ".eE") && !strings.Contains(c, `\ud800`) && !strings.Contains(c, "\xff") {
			var buf bytes.Buffer
			enc := msgpack.NewEncoder(&buf)
			enc.UseCompactInts(true)
			err := enc.Encode(msgpackRef(want))
			if ref := buf.Bytes(); err == nil && !bytes.Equal(ref, got[1:]) && len(c) < 1000 {
				t.Errorf("%.40s: % x, the module writes % x", c, got[1:], ref)
			}
		}
	}
	for _, bad := range []string{``, `{`, `[1,]`, `{"a"}`, `{"a":1,}`, `01`, `1.`, `.5`, `-`, `1e`, `tru`, `"\x"`, `"\u12"`, "\"a\nb\"", `"abc`, `1 2`, `[1 2]`, `{1:2}`, `nul`,
		`[01]`, `{"a":1 "b":2}`, `[1,,2]`, `{"a" 1}`, `[1]]`, `]`, `}`, `{"a":1]`, `[1}`, `1e750`, `[-1e999]`} {
		if out, err := appendMsgpack([]byte("k"), []byte(bad)); err == nil || string(out) != "k" {
			t.Errorf("%q: accepted (% x)", bad, out)
		}
		if json.Valid([]byte(bad)) && !strings.Contains(bad, "e7") && !strings.Contains(bad, "e9") {
			t.Errorf("%q is valid JSON; the case is wrong", bad)
		}
	}
	// Nesting: 1000 levels are written, 1001 refused.
	for depth, ok := range map[int]bool{1000: true, 1001: false} {
		msg := strings.Repeat("[", depth) + strings.Repeat("]", depth)
		out, err := appendMsgpack(nil, []byte(msg))
		if (err == nil) != ok {
			t.Errorf("depth %d: %v", depth, err)
		}
		if ok {
			back, err := newFrameReader(MsgPack, bytes.NewReader(out), 0).ReadFrame()
			if err != nil || string(back) != msg {
				t.Errorf("depth %d came back as %.20s... (%v)", depth, back, err)
			}
		}
	}
	// Integers keep their exact value and kind; -0 is the integer 0; -0.0 stays a float.
	for in, want := range map[string]string{
		`[-0,9223372036854775807,18446744073709551615,-9223372036854775808,-0.0,1.0,1E2]`: `[0,9223372036854775807,18446744073709551615,-9223372036854775808,-0.0,1.0,100.0]`,
	} {
		out, err := appendMsgpack(nil, []byte(in))
		if err != nil {
			t.Fatal(err)
		}
		back, err := newFrameReader(MsgPack, bytes.NewReader(out), 0).ReadFrame()
		if err != nil || string(back) != want {
			t.Errorf("%s came back as %s (%v); want %s", in, back, err, want)
		}
	}
}

// msgpackRef turns a decoded JSON value into what msgpack.Marshal encodes minimally.
func msgpackRef(v any) any {
	switch v := v.(type) {
	case json.Number:
		if i, err := v.Int64(); err == nil {
			return i
		}
		if u, err := strconv.ParseUint(string(v), 10, 64); err == nil {
			return u
		}
		f, _ := v.Float64()
		return f
	case []any:
		out := make([]any, len(v))
		for i := range v {
			out[i] = msgpackRef(v[i])
		}
		return out
	}
	return v
}

func sameMsgpackValue(j, m any) bool {
	switch j := j.(type) {
	case json.Number:
		if isIntegerLiteral(string(j)) {
			if i, err := j.Int64(); err == nil {
				return fmt.Sprint(m) == fmt.Sprint(i) && !isFloat(m)
			}
			if u, err := strconv.ParseUint(string(j), 10, 64); err == nil {
				return fmt.Sprint(m) == fmt.Sprint(u)
			}
		}
		f, _ := j.Float64()
		mf, ok := m.(float64)
		return ok && (mf == f || (f == 0 && mf == 0))
	case []any:
		mm, ok := m.([]any)
		if !ok || len(mm) != len(j) {
			return false
		}
		for i := range j {
			if !sameMsgpackValue(j[i], mm[i]) {
				return false
			}
		}
		return true
	case map[string]any:
		mm, ok := m.(map[string]any)
		if !ok || len(mm) != len(j) {
			return false
		}
		for k, v := range j {
			if !sameMsgpackValue(v, mm[k]) {
				return false
			}
		}
		return true
	}
	return reflect.DeepEqual(j, m)
}

func isFloat(v any) bool {
	switch v.(type) {
	case float32, float64:
		return true
	}
	return false
}

// TestMsgpackMessage: requests and notifications encoded straight to MessagePack read back as
// the JSON that appendRequest and appendNotification write.
func TestMsgpackMessage(t *testing.T) {
	id := int64(1) << 40
	cases := []struct {
		id     *int64
		method string
		params string
	}{
		{&id, "runtime/ping", ""},
		{&id, "generate", `{"model":"m","prompt":"h\u00e9\n","max_tokens":5,"temperature":0.0,"stop":["a"],"x":null}`},
		{nil, "$/cancelRequest", `{"id":7}`},
		{nil, "exit", ""},
	}
	for _, c := range cases {
		var want []byte
		if c.id != nil {
			want = appendRequest(nil, *c.id, c.method, json.RawMessage(c.params))
		} else {
			want = appendNotification(nil, c.method, json.RawMessage(c.params))
		}
		frame, err := appendMsgpackMessage([]byte{0xAA}, c.id, c.method, json.RawMessage(c.params))
		if err != nil || frame[0] != 0xAA {
			t.Fatalf("%s: %v", c.method, err)
		}
		got, err := newFrameReader(MsgPack, bytes.NewReader(frame[1:]), 0).ReadFrame()
		if err != nil || !sameJSON(t, got, want) {
			t.Errorf("%s: read %s (%v); want %s", c.method, got, err, want)
		}
	}
	if out, err := appendMsgpackMessage([]byte("k"), &id, "m", json.RawMessage(`{"a":`)); err == nil || string(out) != "k" {
		t.Errorf("bad params: %q %v", out, err)
	}
}

// BenchmarkAppendMsgpack: encoding outgoing messages for the msgpack framing.
func BenchmarkAppendMsgpack(b *testing.B) {
	for name, msg := range map[string]string{
		"ping":     `{"jsonrpc":"2.0","id":12345,"method":"runtime/ping"}`, // through Call: appendMsgpackMessage
		"generate": `{"jsonrpc":"2.0","id":12345,"method":"generate","params":{"model":"m","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Why is the sky blue? Answer in one paragraph, please."}],"max_tokens":256,"temperature":0.7,"top_p":0.95,"seed":42,"stream_options":{"chunk_tokens":4}}}`,
	} {
		b.Run(name, func(b *testing.B) {
			b.SetBytes(int64(len(msg)))
			var out []byte
			for range b.N {
				var err error
				if out, err = appendMsgpack(out[:0], []byte(msg)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkMsgpackPing: a runtime/ping request as Call writes it in the msgpack framing.
func BenchmarkMsgpackPing(b *testing.B) {
	id := int64(12345)
	var out []byte
	for range b.N {
		var err error
		if out, err = appendMsgpackMessage(out[:0], &id, "runtime/ping", nil); err != nil {
			b.Fatal(err)
		}
	}
}
