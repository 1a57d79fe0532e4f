package sidecar

// MessagePack framing: JSON texts are transcoded to MessagePack on the way out and back on the
// way in, keeping integers integers and floats floats (a float is written with a fraction or
// an exponent, so 1.0 stays a float in JSON).

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/vmihailenco/msgpack/v5"
	"github.com/vmihailenco/msgpack/v5/msgpcode"
)

const maxNesting = 1000

var errTooDeep = errors.New("nested deeper than 1000 levels")

// ---- JSON to MessagePack ----

// appendMsgpack appends the MessagePack encoding of the JSON text msg to dst, in one pass
// over the text: integers become MessagePack integers, other numbers float64, strings str.
// On error dst is returned unchanged.
func appendMsgpack(dst, msg []byte) ([]byte, error) {
	e := jsonToMsgpack{in: msg, out: dst}
	e.skipSpace()
	if err := e.value(0); err != nil {
		return dst, err
	}
	e.skipSpace()
	if e.pos != len(e.in) {
		return dst, e.fail("more than one JSON value in a message")
	}
	return e.out, nil
}

type jsonToMsgpack struct {
	in  []byte
	pos int
	out []byte
	str []byte // scratch for unescaped strings
}

func (e *jsonToMsgpack) fail(what string) error {
	return fmt.Errorf("sidecar: invalid JSON at byte %d: %s", e.pos, what)
}

func (e *jsonToMsgpack) skipSpace() {
	for e.pos < len(e.in) {
		switch e.in[e.pos] {
		case ' ', '\t', '\n', '\r':
			e.pos++
		default:
			return
		}
	}
}

func (e *jsonToMsgpack) value(depth int) error {
	if depth > maxNesting {
		return e.fail("nested deeper than 1000 levels")
	}
	if e.pos >= len(e.in) {
		return e.fail("unexpected end")
	}
	switch c := e.in[e.pos]; {
	case c == '{':
		return e.container(depth, '}', true)
	case c == '[':
		return e.container(depth, ']', false)
	case c == '"':
		s, err := e.string()
		if err != nil {
			return err
		}
		e.out = appendMsgpackStr(e.out, s)
		return nil
	case c == 't':
		return e.literal("true", 0xc3)
	case c == 'f':
		return e.literal("false", 0xc2)
	case c == 'n':
		return e.literal("null", 0xc0)
	case c == '-' || (c >= '0' && c <= '9'):
		return e.number()
	}
	return e.fail("unexpected character")
}

func (e *jsonToMsgpack) literal(word string, code byte) error {
	if !bytes.HasPrefix(e.in[e.pos:], []byte(word)) {
		return e.fail("bad literal")
	}
	e.pos += len(word)
	e.out = append(e.out, code)
	return nil
}

// container encodes an object or an array: the members go after a 5-byte header that is
// shrunk to its smallest form once the count is known.
func (e *jsonToMsgpack) container(depth int, end byte, object bool) error {
	e.pos++ // { or [
	head := len(e.out)
	e.out = append(e.out, 0, 0, 0, 0, 0)
	n := 0
	e.skipSpace()
	if e.pos < len(e.in) && e.in[e.pos] == end {
		e.pos++
	} else {
		for {
			e.skipSpace()
			if object {
				if e.pos >= len(e.in) || e.in[e.pos] != '"' {
					return e.fail("expected a member name")
				}
				key, err := e.string()
				if err != nil {
					return err
				}
				e.out = appendMsgpackStr(e.out, key)
				e.skipSpace()
				if e.pos >= len(e.in) || e.in[e.pos] != ':' {
					return e.fail("expected ':'")
				}
				e.pos++
				e.skipSpace()
			}
			if err := e.value(depth + 1); err != nil {
				return err
			}
			n++
			e.skipSpace()
			if e.pos >= len(e.in) {
				return e.fail("unexpected end")
			}
			if e.in[e.pos] == ',' {
				e.pos++
				continue
			}
			if e.in[e.pos] != end {
				return e.fail("expected ',' or the end of a container")
			}
			e.pos++
			break
		}
	}
	var hdr []byte
	switch {
	case n < 16 && object:
		hdr = []byte{0x80 | byte(n)}
	case n < 16:
		hdr = []byte{0x90 | byte(n)}
	case n < 1<<16 && object:
		hdr = []byte{0xde, byte(n >> 8), byte(n)}
	case n < 1<<16:
		hdr = []byte{0xdc, byte(n >> 8), byte(n)}
	case object:
		hdr = []byte{0xdf, byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}
	default:
		hdr = []byte{0xdd, byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}
	}
	copy(e.out[head:], hdr)
	if gap := 5 - len(hdr); gap > 0 {
		copy(e.out[head+len(hdr):], e.out[head+5:])
		e.out = e.out[:len(e.out)-gap]
	}
	return nil
}

// string reads a JSON string; the result is valid until the next call.
func (e *jsonToMsgpack) string() ([]byte, error) {
	e.pos++ // "
	start := e.pos
	for e.pos < len(e.in) {
		c := e.in[e.pos]
		if c == '"' {
			s := e.in[start:e.pos]
			e.pos++
			if !utf8.Valid(s) {
				e.str = appendValidUTF8(e.str[:0], s)
				return e.str, nil
			}
			return s, nil
		}
		if c == '\\' {
			return e.escapedString(start)
		}
		if c < 0x20 {
			return nil, e.fail("control character in a string")
		}
		e.pos++
	}
	return nil, e.fail("unterminated string")
}

func (e *jsonToMsgpack) escapedString(start int) ([]byte, error) {
	e.str = append(e.str[:0], e.in[start:e.pos]...)
	for e.pos < len(e.in) {
		c := e.in[e.pos]
		switch {
		case c == '"':
			e.pos++
			if !utf8.Valid(e.str) {
				e.str = appendValidUTF8(nil, e.str)
			}
			return e.str, nil
		case c < 0x20:
			return nil, e.fail("control character in a string")
		case c != '\\':
			e.str = append(e.str, c)
			e.pos++
			continue
		}
		if e.pos+1 >= len(e.in) {
			break
		}
		esc := e.in[e.pos+1]
		e.pos += 2
		switch esc {
		case '"', '\\', '/':
			e.str = append(e.str, esc)
		case 'b':
			e.str = append(e.str, '\b')
		case 'f':
			e.str = append(e.str, '\f')
		case 'n':
			e.str = append(e.str, '\n')
		case 'r':
			e.str = append(e.str, '\r')
		case 't':
			e.str = append(e.str, '\t')
		case 'u':
			r, ok := e.hex4()
			if !ok {
				return nil, e.fail("bad \\u escape")
			}
			if utf16.IsSurrogate(r) {
				// A pair makes one rune; a lone half is U+FFFD, as encoding/json has it.
				r2 := rune(-1)
				if e.pos+1 < len(e.in) && e.in[e.pos] == '\\' && e.in[e.pos+1] == 'u' {
					save := e.pos
					e.pos += 2
					var ok2 bool
					if r2, ok2 = e.hex4(); !ok2 {
						return nil, e.fail("bad \\u escape")
					}
					if dec := utf16.DecodeRune(r, r2); dec != utf8.RuneError {
						e.str = utf8.AppendRune(e.str, dec)
						continue
					}
					e.pos = save
				}
				r = utf8.RuneError
			}
			e.str = utf8.AppendRune(e.str, r)
		default:
			return nil, e.fail("bad escape")
		}
	}
	return nil, e.fail("unterminated string")
}

func (e *jsonToMsgpack) hex4() (rune, bool) {
	if e.pos+4 > len(e.in) {
		return 0, false
	}
	var r rune
	for _, c := range e.in[e.pos : e.pos+4] {
		switch {
		case c >= '0' && c <= '9':
			r = r<<4 | rune(c-'0')
		case c >= 'a' && c <= 'f':
			r = r<<4 | rune(c-'a'+10)
		case c >= 'A' && c <= 'F':
			r = r<<4 | rune(c-'A'+10)
		default:
			return 0, false
		}
	}
	e.pos += 4
	return r, true
}

// number encodes a JSON number: an integer literal as the smallest MessagePack integer that
// holds it, anything else (or an integer too large) as float64.
func (e *jsonToMsgpack) number() error {
	start := e.pos
	if e.in[e.pos] == '-' {
		e.pos++
	}
	digits := func() int {
		n := 0
		for e.pos < len(e.in) && e.in[e.pos] >= '0' && e.in[e.pos] <= '9' {
			e.pos++
			n++
		}
		return n
	}
	intStart := e.pos
	if digits() == 0 || (e.in[intStart] == '0' && e.pos-intStart > 1) {
		return e.fail("bad number")
	}
	integer := true
	if e.pos < len(e.in) && e.in[e.pos] == '.' {
		integer = false
		e.pos++
		if digits() == 0 {
			return e.fail("bad number")
		}
	}
	if e.pos < len(e.in) && (e.in[e.pos] == 'e' || e.in[e.pos] == 'E') {
		integer = false
		e.pos++
		if e.pos < len(e.in) && (e.in[e.pos] == '+' || e.in[e.pos] == '-') {
			e.pos++
		}
		if digits() == 0 {
			return e.fail("bad number")
		}
	}
	lit := string(e.in[start:e.pos])
	if integer {
		if i, err := strconv.ParseInt(lit, 10, 64); err == nil {
			e.out = appendMsgpackInt(e.out, i)
			return nil
		}
		if u, err := strconv.ParseUint(lit, 10, 64); err == nil {
			e.out = append(e.out, 0xcf, byte(u>>56), byte(u>>48), byte(u>>40), byte(u>>32), byte(u>>24), byte(u>>16), byte(u>>8), byte(u))
			return nil
		}
	}
	f, err := strconv.ParseFloat(lit, 64)
	if err != nil {
		return e.fail("number out of range")
	}
	b := math.Float64bits(f)
	e.out = append(e.out, 0xcb, byte(b>>56), byte(b>>48), byte(b>>40), byte(b>>32), byte(b>>24), byte(b>>16), byte(b>>8), byte(b))
	return nil
}

// appendValidUTF8 appends s with each byte that is not part of a UTF-8 sequence replaced by
// U+FFFD, as encoding/json does.
func appendValidUTF8(out, s []byte) []byte {
	for len(s) > 0 {
		r, size := utf8.DecodeRune(s)
		if r == utf8.RuneError && size == 1 {
			out = utf8.AppendRune(out, utf8.RuneError)
		} else {
			out = append(out, s[:size]...)
		}
		s = s[size:]
	}
	return out
}

func appendMsgpackInt(out []byte, i int64) []byte {
	switch {
	case i >= 0 && i <= 0x7f:
		return append(out, byte(i))
	case i < 0 && i >= -32:
		return append(out, byte(i))
	case i >= 0 && i <= math.MaxUint8:
		return append(out, 0xcc, byte(i))
	case i >= 0 && i <= math.MaxUint16:
		return append(out, 0xcd, byte(i>>8), byte(i))
	case i >= 0 && i <= math.MaxUint32:
		return append(out, 0xce, byte(i>>24), byte(i>>16), byte(i>>8), byte(i))
	case i >= 0:
		return append(out, 0xcf, byte(i>>56), byte(i>>48), byte(i>>40), byte(i>>32), byte(i>>24), byte(i>>16), byte(i>>8), byte(i))
	case i >= math.MinInt8:
		return append(out, 0xd0, byte(i))
	case i >= math.MinInt16:
		return append(out, 0xd1, byte(i>>8), byte(i))
	case i >= math.MinInt32:
		return append(out, 0xd2, byte(i>>24), byte(i>>16), byte(i>>8), byte(i))
	}
	return append(out, 0xd3, byte(i>>56), byte(i>>48), byte(i>>40), byte(i>>32), byte(i>>24), byte(i>>16), byte(i>>8), byte(i))
}

func appendMsgpackStr(out []byte, s []byte) []byte {
	n := len(s)
	switch {
	case n < 32:
		out = append(out, 0xa0|byte(n))
	case n <= math.MaxUint8:
		out = append(out, 0xd9, byte(n))
	case n <= math.MaxUint16:
		out = append(out, 0xda, byte(n>>8), byte(n))
	default:
		out = append(out, 0xdb, byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
	}
	return append(out, s...)
}

// isIntegerLiteral reports whether a JSON number has neither a fraction nor an exponent.
func isIntegerLiteral(s string) bool {
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '.', 'e', 'E':
			return false
		}
	}
	return true
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
