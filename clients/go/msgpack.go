package sidecar

// MessagePack framing: JSON texts are transcoded to MessagePack on the way out and back on the
// way in, keeping integers integers and floats floats (a float is written with a fraction or
// an exponent, so 1.0 stays a float in JSON).

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/vmihailenco/msgpack/v5"
	"github.com/vmihailenco/msgpack/v5/msgpcode"
)

const maxNesting = 1000

var errTooDeep = errors.New("nested deeper than 1000 levels")

// ---- JSON to MessagePack ----

// appendMsgpack appends the MessagePack encoding of the JSON text msg to dst. encoding/json
// reads the text (UseNumber keeps each number's literal) and msgpack writes the values;
// this code only supplies what neither does: a container's length before its members (one
// pass over the tokens to count, one to encode) and numbers' kinds: an integer literal
// becomes the smallest MessagePack integer that holds it exactly (int64 or uint64), anything
// else float64. On error dst is returned unchanged.
func appendMsgpack(dst, msg []byte) ([]byte, error) {
	toks, counts, err := jsonTokens(msg)
	if err != nil {
		return dst, err
	}
	buf := bytes.NewBuffer(dst)
	enc := msgpack.NewEncoder(buf)
	for i, t := range toks {
		switch t := t.(type) {
		case json.Delim:
			switch t {
			case '{':
				err = enc.EncodeMapLen(counts[i] / 2) // members count names and values
			case '[':
				err = enc.EncodeArrayLen(counts[i])
			}
		case string:
			if raw, ok := binValue(toks, i, t); ok {
				err = enc.EncodeBytes(raw) // image bytes (ImageBytesFor): MessagePack bin, no base64 on the wire
			} else {
				err = enc.EncodeString(t)
			}
		case json.Number:
			err = encodeNumber(enc, string(t))
		case bool:
			err = enc.EncodeBool(t)
		case nil:
			err = enc.EncodeNil()
		}
		if err != nil {
			return dst, err
		}
	}
	return buf.Bytes(), nil
}

// appendMsgpackMessage encodes a request (id non-nil) or a notification straight to
// MessagePack, as appendRequest and appendNotification write it in JSON: only params go
// through appendMsgpack, so a call without params (runtime/ping) costs no JSON reading.
func appendMsgpackMessage(dst []byte, id *int64, method string, params json.RawMessage) ([]byte, error) {
	buf := bytes.NewBuffer(dst)
	enc := msgpack.NewEncoder(buf)
	n := 2
	if id != nil {
		n++
	}
	if len(params) > 0 {
		n++
	}
	// Writes to a bytes.Buffer cannot fail.
	_ = enc.EncodeMapLen(n)
	_ = enc.EncodeString("jsonrpc")
	_ = enc.EncodeString("2.0")
	if id != nil {
		_ = enc.EncodeString("id")
		_ = enc.EncodeInt(*id)
	}
	_ = enc.EncodeString("method")
	_ = enc.EncodeString(method)
	if len(params) == 0 {
		return buf.Bytes(), nil
	}
	_ = enc.EncodeString("params")
	out, err := appendMsgpack(buf.Bytes(), params)
	if err != nil {
		return dst, err
	}
	return out, nil
}

// binMarker starts a "data" string that stands for raw bytes (base64 after the marker): params
// travel as JSON inside this client, and MessagePack framing sends such a value as bin.
const binMarker = "\x00mlx-sidecar/bin;base64,"

// binValue decodes toks[i] when it is the value of a "data" member written with binMarker.
func binValue(toks []json.Token, i int, s string) ([]byte, bool) {
	if i == 0 || toks[i-1] != "data" || !strings.HasPrefix(s, binMarker) {
		return nil, false
	}
	raw, err := base64.StdEncoding.DecodeString(s[len(binMarker):])
	return raw, err == nil
}

// jsonTokens reads the tokens of a JSON text, which must be exactly one value. counts[i] is,
// for a token that opens a container, how many tokens sit directly inside it (an object's
// names included).
func jsonTokens(msg []byte) ([]json.Token, []int, error) {
	// json.Valid is strict and cheap; after it, the tokens stop with the value (no read to
	// EOF, which costs the decoder an error value).
	if !json.Valid(msg) {
		var v any
		err := json.Unmarshal(msg, &v) // for the error's wording and offset
		return nil, nil, fmt.Errorf("sidecar: invalid JSON: %w", err)
	}
	d := json.NewDecoder(bytes.NewReader(msg))
	d.UseNumber()
	toks := make([]json.Token, 0, 8+len(msg)/8)
	counts := make([]int, 0, cap(toks))
	var open []int // indexes of the containers not yet closed
	for {
		t, err := d.Token()
		if err != nil {
			return nil, nil, fmt.Errorf("sidecar: invalid JSON: %w", err)
		}
		if n, ok := t.(json.Number); ok && !numberFits(string(n)) {
			return nil, nil, fmt.Errorf("sidecar: JSON number %.40s is out of range for MessagePack", n)
		}
		delim, isDelim := t.(json.Delim)
		closing := isDelim && (delim == '}' || delim == ']')
		if !closing && len(open) > 0 {
			counts[open[len(open)-1]]++
		}
		toks = append(toks, t)
		counts = append(counts, 0)
		switch {
		case closing:
			open = open[:len(open)-1]
		case isDelim:
			if len(open) == maxNesting {
				return nil, nil, errTooDeep
			}
			open = append(open, len(toks)-1)
		}
		if len(open) == 0 {
			return toks, counts, nil
		}
	}
}

// numberFits reports whether a JSON number survives as a MessagePack integer or float64.
func numberFits(lit string) bool {
	if isIntegerLiteral(lit) {
		if _, err := strconv.ParseInt(lit, 10, 64); err == nil {
			return true
		}
		if _, err := strconv.ParseUint(lit, 10, 64); err == nil {
			return true
		}
	}
	_, err := strconv.ParseFloat(lit, 64)
	return err == nil
}

// encodeNumber writes an integer literal as an integer when int64 or uint64 holds it (so -0
// is 0: MessagePack has no negative zero integer), anything else as float64.
func encodeNumber(enc *msgpack.Encoder, lit string) error {
	if isIntegerLiteral(lit) {
		if i, err := strconv.ParseInt(lit, 10, 64); err == nil {
			return enc.EncodeInt(i)
		}
		if u, err := strconv.ParseUint(lit, 10, 64); err == nil {
			return enc.EncodeUint(u)
		}
	}
	f, err := strconv.ParseFloat(lit, 64)
	if err != nil {
		return err
	}
	return enc.EncodeFloat64(f)
}

// isIntegerLiteral reports whether a JSON number has neither a fraction nor an exponent.
func isIntegerLiteral(s string) bool {
	return !strings.ContainsAny(s, ".eE")
}

// ---- MessagePack to JSON ----

// countingReader counts the bytes the decoder consumes, to bound one frame.
type countingReader struct {
	r   *bufio.Reader
	n   int
	max int
}

var errMsgpackTooLarge = errors.New("frame too large")

func (c *countingReader) Read(p []byte) (int, error) {
	if c.n >= c.max {
		return 0, errMsgpackTooLarge
	}
	if len(p) > c.max-c.n {
		p = p[:c.max-c.n]
	}
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

func (c *countingReader) ReadByte() (byte, error) {
	if c.n >= c.max {
		return 0, errMsgpackTooLarge
	}
	b, err := c.r.ReadByte()
	if err == nil {
		c.n++
	}
	return b, err
}

func (c *countingReader) UnreadByte() error {
	err := c.r.UnreadByte()
	if err == nil {
		c.n--
	}
	return err
}

type msgpackReader struct {
	cr  *countingReader
	dec *msgpack.Decoder
	out []byte
	str []byte
}

func newMsgpackReader(br *bufio.Reader, maxFrame int) *msgpackReader {
	cr := &countingReader{r: br, max: maxFrame}
	return &msgpackReader{cr: cr, dec: msgpack.NewDecoder(cr)}
}

func (m *msgpackReader) ReadFrame() ([]byte, error) {
	m.cr.n = 0
	if _, err := m.dec.PeekCode(); err != nil {
		if err == io.EOF {
			return nil, io.EOF
		}
		return nil, m.wrap(err)
	}
	out, err := m.value(m.out[:0], 0)
	m.out = out
	if err != nil {
		return nil, m.wrap(err)
	}
	return out, nil
}

func (m *msgpackReader) wrap(err error) error {
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return io.ErrUnexpectedEOF
	case errors.Is(err, errMsgpackTooLarge):
		return fatalFrame("a MessagePack frame is larger than the limit of %d bytes", m.cr.max)
	}
	var fe *frameError
	if errors.As(err, &fe) {
		return err
	}
	return fatalFrame("undecodable MessagePack: %v", err)
}

// value transcodes one MessagePack value to JSON, appending to out.
func (m *msgpackReader) value(out []byte, depth int) ([]byte, error) {
	if depth > maxNesting {
		return out, errTooDeep
	}
	d := m.dec
	c, err := d.PeekCode()
	if err != nil {
		return out, err
	}
	switch {
	case c == msgpcode.Nil:
		if err := d.DecodeNil(); err != nil {
			return out, err
		}
		return append(out, "null"...), nil
	case c == msgpcode.True || c == msgpcode.False:
		b, err := d.DecodeBool()
		if err != nil {
			return out, err
		}
		return strconv.AppendBool(out, b), nil
	case c == msgpcode.Uint64:
		u, err := d.DecodeUint64()
		if err != nil {
			return out, err
		}
		return strconv.AppendUint(out, u, 10), nil
	case msgpcode.IsFixedNum(c), c >= msgpcode.Uint8 && c <= msgpcode.Uint32, c >= msgpcode.Int8 && c <= msgpcode.Int64:
		i, err := d.DecodeInt64()
		if err != nil {
			return out, err
		}
		return strconv.AppendInt(out, i, 10), nil
	case c == msgpcode.Float:
		f, err := d.DecodeFloat32()
		if err != nil {
			return out, err
		}
		return appendJSONFloat(out, float64(f), 32)
	case c == msgpcode.Double:
		f, err := d.DecodeFloat64()
		if err != nil {
			return out, err
		}
		return appendJSONFloat(out, f, 64)
	case msgpcode.IsString(c), msgpcode.IsBin(c):
		s, err := m.bytes()
		if err != nil {
			return out, err
		}
		return appendJSONString(out, s), nil
	case msgpcode.IsFixedArray(c), c == msgpcode.Array16, c == msgpcode.Array32:
		n, err := d.DecodeArrayLen()
		if err != nil {
			return out, err
		}
		out = append(out, '[')
		for i := 0; i < n; i++ {
			if i > 0 {
				out = append(out, ',')
			}
			if out, err = m.value(out, depth+1); err != nil {
				return out, err
			}
		}
		return append(out, ']'), nil
	case msgpcode.IsFixedMap(c), c == msgpcode.Map16, c == msgpcode.Map32:
		n, err := d.DecodeMapLen()
		if err != nil {
			return out, err
		}
		out = append(out, '{')
		for i := 0; i < n; i++ {
			if i > 0 {
				out = append(out, ',')
			}
			if out, err = m.key(out); err != nil {
				return out, err
			}
			out = append(out, ':')
			if out, err = m.value(out, depth+1); err != nil {
				return out, err
			}
		}
		return append(out, '}'), nil
	}
	return out, &frameError{msg: "MessagePack type 0x" + strconv.FormatUint(uint64(c), 16) + " has no JSON equivalent", fatal: true}
}

// key transcodes a map key: a string, or an integer written as its decimal string.
func (m *msgpackReader) key(out []byte) ([]byte, error) {
	c, err := m.dec.PeekCode()
	if err != nil {
		return out, err
	}
	if msgpcode.IsString(c) || msgpcode.IsBin(c) {
		s, err := m.bytes()
		if err != nil {
			return out, err
		}
		return appendJSONString(out, s), nil
	}
	if msgpcode.IsFixedNum(c) || (c >= msgpcode.Uint8 && c <= msgpcode.Int64) {
		var num []byte
		if c == msgpcode.Uint64 {
			u, err := m.dec.DecodeUint64()
			if err != nil {
				return out, err
			}
			num = strconv.AppendUint(nil, u, 10)
		} else {
			i, err := m.dec.DecodeInt64()
			if err != nil {
				return out, err
			}
			num = strconv.AppendInt(nil, i, 10)
		}
		return appendJSONString(out, num), nil
	}
	return out, &frameError{msg: "a MessagePack map key is neither a string nor an integer", fatal: true}
}

// bytes reads a str or bin value into a scratch buffer valid until the next call.
func (m *msgpackReader) bytes() ([]byte, error) {
	n, err := m.dec.DecodeBytesLen()
	if err != nil {
		return nil, err
	}
	if n < 0 {
		return nil, nil
	}
	if n > m.cr.max-m.cr.n {
		return nil, errMsgpackTooLarge
	}
	if cap(m.str) < n {
		m.str = make([]byte, n)
	}
	m.str = m.str[:n]
	if err := m.dec.ReadFull(m.str); err != nil {
		return nil, err
	}
	return m.str, nil
}

// ---- JSON text helpers ----

func appendJSONFloat(out []byte, f float64, bits int) ([]byte, error) {
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return out, &frameError{msg: "a MessagePack float is NaN or infinite, which JSON cannot carry", fatal: true}
	}
	start := len(out)
	out = strconv.AppendFloat(out, f, 'g', -1, bits)
	if !bytes.ContainsAny(out[start:], ".eE") {
		out = append(out, ".0"...)
	}
	return out, nil
}

const hexDigits = "0123456789abcdef"

// appendJSONString appends s as a JSON string. Bytes that are not UTF-8 become U+FFFD.
func appendJSONString(out []byte, s []byte) []byte {
	out = append(out, '"')
	start := 0
	for i := 0; i < len(s); {
		b := s[i]
		if b < utf8.RuneSelf {
			if b >= 0x20 && b != '"' && b != '\\' {
				i++
				continue
			}
			out = append(out, s[start:i]...)
			switch b {
			case '"', '\\':
				out = append(out, '\\', b)
			case '\n':
				out = append(out, '\\', 'n')
			case '\r':
				out = append(out, '\\', 'r')
			case '\t':
				out = append(out, '\\', 't')
			default:
				out = append(out, '\\', 'u', '0', '0', hexDigits[b>>4], hexDigits[b&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRune(s[i:])
		if r == utf8.RuneError && size == 1 {
			out = append(out, s[start:i]...)
			out = append(out, `\ufffd`...)
			i++
			start = i
			continue
		}
		i += size
	}
	out = append(out, s[start:]...)
	return append(out, '"')
}
