package sidecar

// The three framings, as codecs between a byte stream and JSON texts. Above this file every
// message is a JSON text; MessagePack frames are transcoded at this boundary (msgpack.go).

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
)

// Framing is how messages are cut out of the byte streams.
type Framing string

// The framings the runtime speaks.
const (
	// NDJSON is one JSON text per line.
	NDJSON Framing = "ndjson"
	// LSP is the Language Server Protocol's base protocol: "Content-Length: N\r\n\r\n" and N bytes.
	LSP Framing = "lsp"
	// MsgPack is a stream of MessagePack maps with the same fields as JSON-RPC's.
	MsgPack Framing = "msgpack"
)

// Framings lists every framing.
var Framings = []Framing{NDJSON, LSP, MsgPack}

func (f Framing) valid() bool { return f == NDJSON || f == LSP || f == MsgPack }

const (
	// DefaultMaxFrameBytes bounds one incoming frame unless Options.MaxFrameBytes says otherwise.
	DefaultMaxFrameBytes = 256 << 20
	readBufferSize       = 64 << 10
	maxHeaderBytes       = 8 << 10
)

// frameError is a frame the reader could not read. A recoverable one was skipped and the
// stream is still in step; after a fatal one the stream cannot be read any further.
type frameError struct {
	msg   string
	fatal bool
}

func (e *frameError) Error() string { return "sidecar: bad frame from runtime: " + e.msg }

func fatalFrame(format string, args ...any) error {
	return &frameError{msg: fmt.Sprintf(format, args...), fatal: true}
}

func isFatalFrameError(err error) bool {
	var fe *frameError
	return !errors.As(err, &fe) || fe.fatal
}

// frameReader reads one message at a time. ReadFrame returns one JSON text; its bytes are
// valid until the next call. At the end of the stream it returns io.EOF (or
// io.ErrUnexpectedEOF inside a frame); other errors are *frameError.
type frameReader interface {
	ReadFrame() ([]byte, error)
}

func newFrameReader(f Framing, r io.Reader, maxFrame int) frameReader {
	return newFrameReaderSize(f, r, maxFrame, readBufferSize)
}

func newFrameReaderSize(f Framing, r io.Reader, maxFrame, bufSize int) frameReader {
	if maxFrame <= 0 {
		maxFrame = DefaultMaxFrameBytes
	}
	br := bufio.NewReaderSize(r, bufSize)
	switch f {
	case LSP:
		return &lspReader{r: br, max: maxFrame}
	case MsgPack:
		return newMsgpackReader(br, maxFrame)
	default:
		return &ndjsonReader{r: br, max: maxFrame}
	}
}

// appendFrame appends msg, one JSON text, framed for f. On error dst is returned unchanged.
func appendFrame(f Framing, dst, msg []byte) ([]byte, error) {
	switch f {
	case LSP:
		dst = append(dst, "Content-Length: "...)
		dst = strconv.AppendInt(dst, int64(len(msg)), 10)
		dst = append(dst, "\r\n\r\n"...)
		return append(dst, msg...), nil
	case MsgPack:
		return appendMsgpack(dst, msg)
	default:
		if bytes.IndexByte(msg, '\n') >= 0 {
			// A pretty-printed text: JSON allows newlines only as whitespace.
			n := len(dst)
			buf := bytes.NewBuffer(dst)
			if err := json.Compact(buf, msg); err != nil {
				return dst[:n], err
			}
			dst = buf.Bytes()
		} else {
			dst = append(dst, msg...)
		}
		return append(dst, '\n'), nil
	}
}

// ---- ndjson ----

type ndjsonReader struct {
	r    *bufio.Reader
	max  int
	line []byte // a line longer than the bufio buffer, assembled
	eof  bool
}

func (n *ndjsonReader) ReadFrame() ([]byte, error) {
	for !n.eof {
		line, tooLong, err := n.readLine()
		if err != nil {
			return nil, err
		}
		if tooLong {
			return nil, &frameError{msg: fmt.Sprintf("a line is longer than %d bytes; it was skipped", n.max)}
		}
		if line = bytes.TrimSpace(line); len(line) > 0 {
			return line, nil
		}
	}
	return nil, io.EOF
}

// readLine reads up to and including the next newline (or to the end of the stream). A line
// longer than the limit is consumed and reported as tooLong.
func (n *ndjsonReader) readLine() (line []byte, tooLong bool, err error) {
	n.line = n.line[:0]
	limit := n.max + 2 // the content, then "\r\n"
	for {
		part, err := n.r.ReadSlice('\n')
		switch err {
		case nil, bufio.ErrBufferFull:
		case io.EOF:
			n.eof = true
		default:
			return nil, false, err
		}
		if !tooLong {
			if len(n.line)+len(part) > limit {
				tooLong = true
				n.line = n.line[:0]
			} else if err != bufio.ErrBufferFull && len(n.line) == 0 {
				return part, false, nil // the common case: no copy
			} else {
				n.line = append(n.line, part...)
			}
		}
		if err != bufio.ErrBufferFull {
			return n.line, tooLong, nil
		}
	}
}

// ---- lsp ----

type lspReader struct {
	r    *bufio.Reader
	max  int
	body []byte
}

func (l *lspReader) ReadFrame() ([]byte, error) {
	length := -1
	header := 0
	lines := 0
	for {
		line, err := l.r.ReadSlice('\n')
		if err == bufio.ErrBufferFull {
			return nil, fatalFrame("an LSP header line is longer than %d bytes", len(line))
		}
		if err != nil {
			if err == io.EOF && header == 0 && len(line) == 0 {
				return nil, io.EOF
			}
			if err == io.EOF {
				return nil, io.ErrUnexpectedEOF
			}
			return nil, err
		}
		header += len(line)
		if header > maxHeaderBytes {
			return nil, fatalFrame("an LSP header block is longer than %d bytes", maxHeaderBytes)
		}
		line = bytes.TrimRight(line, "\r\n")
		if len(line) == 0 {
			if lines == 0 {
				continue // blank lines between frames
			}
			break
		}
		lines++
		name, value, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			return nil, fatalFrame("LSP header line %q is not 'Name: value'", truncate(line, 40))
		}
		if bytes.EqualFold(bytes.TrimSpace(name), []byte("Content-Length")) {
			n, err := strconv.Atoi(string(bytes.TrimSpace(value)))
			if err != nil || n < 0 {
				return nil, fatalFrame("Content-Length %q is not a length", truncate(value, 20))
			}
			length = n
		}
	}
	if length < 0 {
		return nil, fatalFrame("an LSP header block has no Content-Length")
	}
	if length > l.max {
		if _, err := io.CopyN(io.Discard, l.r, int64(length)); err != nil {
			return nil, io.ErrUnexpectedEOF
		}
		return nil, &frameError{msg: fmt.Sprintf("a frame of %d bytes is larger than the limit of %d; it was skipped", length, l.max)}
	}
	if cap(l.body) < length {
		l.body = make([]byte, length)
	}
	l.body = l.body[:length]
	if _, err := io.ReadFull(l.r, l.body); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return l.body, nil
}

func truncate(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}
