package sidecar

// conn is the JSON-RPC side of one runtime process: it numbers requests, writes frames through
// one writer goroutine, and routes what the reader goroutine reads: responses to their pending
// calls, generate/chunk to their streams, $/progress to Options.OnProgress, $/metrics to
// Options.OnMetrics. process.go starts and ends the process around it.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"sync"
	"time"
)

// call is one request waiting for its response.
type call struct {
	id     int64
	method string
	done   chan struct{} // closed once result or err is set
	result json.RawMessage
	err    error
	stream *Stream // for a streaming generate: where its chunks go
}

func (k *call) complete() {
	close(k.done)
	if k.stream != nil {
		k.stream.answered()
	}
}

type conn struct {
	cl      *Client
	framing Framing
	cmd     *exec.Cmd
	pid     int
	stdin   *os.File
	stdout  *os.File
	stderr  *os.File
	tail    *tailBuffer
	init    *InitializeResult // set by spawn before the conn is shared
	readyAt time.Time         // when it answered initialize, for the restart policy

	// Outgoing frames wait in wbuf until the writer goroutine takes them all.
	wmu     sync.Mutex
	wbuf    []byte
	wclosed bool // no more writes; the writer closes stdin once wbuf is written
	wsig    chan struct{}

	mu       sync.Mutex
	pending  map[int64]*call
	dead     bool  // the process has been waited for; pending is nil
	failErr  error // what calls get once dead
	closing  bool  // Close is shutting this process down
	protoErr error // a fatal framing error the reader stopped on

	readDone   chan struct{}
	stderrDone chan struct{}
	writeDone  chan struct{}
	procExited chan struct{} // closed as soon as the process has been waited for
	exited     chan struct{} // closed after the death has been handled; exitErr is set
	exitErr    *ExitError
}

func newConn(cl *Client, cmd *exec.Cmd, stdin, stdout, stderr *os.File) *conn {
	return &conn{
		cl:         cl,
		framing:    cl.opts.Framing,
		cmd:        cmd,
		pid:        cmd.Process.Pid,
		stdin:      stdin,
		stdout:     stdout,
		stderr:     stderr,
		tail:       &tailBuffer{max: cl.opts.StderrTailBytes},
		wsig:       make(chan struct{}, 1),
		pending:    make(map[int64]*call),
		readDone:   make(chan struct{}),
		stderrDone: make(chan struct{}),
		writeDone:  make(chan struct{}),
		procExited: make(chan struct{}),
		exited:     make(chan struct{}),
	}
}

func (c *conn) isDead() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.dead
}

// ---- requests ----

// start registers a request and queues it for writing.
func (c *conn) start(method string, params json.RawMessage, st *Stream) (*call, error) {
	k := &call{id: c.cl.nextID.Add(1), method: method, done: make(chan struct{}), stream: st}
	if st != nil {
		st.mu.Lock()
		st.call = k // before the reader or Close can find it
		st.mu.Unlock()
	}
	c.mu.Lock()
	if c.dead {
		err := c.failErr
		c.mu.Unlock()
		return nil, err
	}
	c.pending[k.id] = k
	c.mu.Unlock()
	if err := c.writeMessage(&k.id, method, params); err != nil {
		c.forget(k.id)
		return nil, err
	}
	return k, nil
}

// call sends a request and waits for its response. When ctx ends first, the request is
// cancelled with $/cancelRequest and ctx's error returned; its response is then ignored.
func (c *conn) call(ctx context.Context, method string, params json.RawMessage) (json.RawMessage, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	k, err := c.start(method, params, nil)
	if err != nil {
		return nil, err
	}
	select {
	case <-k.done:
		return k.result, k.err
	case <-ctx.Done():
		if c.forget(k.id) {
			c.cancelRequest(k.id)
			return nil, ctx.Err()
		}
		<-k.done // answered at this very moment
		return k.result, k.err
	}
}

// forget drops a pending call; false when it was no longer pending (answered or failed).
func (c *conn) forget(id int64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.pending[id]; !ok {
		return false
	}
	delete(c.pending, id)
	return true
}

func (c *conn) notify(method string, params json.RawMessage) error {
	return c.writeMessage(nil, method, params)
}

// writeMessage queues a request (id non-nil) or a notification.
func (c *conn) writeMessage(id *int64, method string, params json.RawMessage) error {
	if c.framing == MsgPack {
		frame, err := appendMsgpackMessage(nil, id, method, params)
		if err != nil {
			return errors.Join(errors.New("sidecar: could not encode a message"), err)
		}
		return c.writeRaw(frame)
	}
	if id != nil {
		return c.write(appendRequest(nil, *id, method, params))
	}
	return c.write(appendNotification(nil, method, params))
}

func (c *conn) cancelRequest(id int64) {
	params := strconv.AppendInt([]byte(`{"id":`), id, 10)
	_ = c.notify("$/cancelRequest", append(params, '}'))
}

// ---- writing ----

// write queues one JSON text, framed, for the writer goroutine.
func (c *conn) write(msg []byte) error {
	if c.framing == MsgPack {
		// Transcode outside the lock; ndjson and lsp frames are only copied under it.
		frame, err := appendMsgpack(nil, msg)
		if err != nil {
			return errors.Join(errors.New("sidecar: could not encode a message"), err)
		}
		return c.writeRaw(frame)
	}
	c.wmu.Lock()
	if c.wclosed {
		c.wmu.Unlock()
		return c.writeClosedErr()
	}
	var err error
	c.wbuf, err = appendFrame(c.framing, c.wbuf, msg)
	c.wmu.Unlock()
	if err != nil {
		return errors.Join(errors.New("sidecar: could not encode a message"), err)
	}
	c.kick()
	return nil
}

// writeRaw queues bytes as they are.
func (c *conn) writeRaw(b []byte) error {
	c.wmu.Lock()
	if c.wclosed {
		c.wmu.Unlock()
		return c.writeClosedErr()
	}
	c.wbuf = append(c.wbuf, b...)
	c.wmu.Unlock()
	c.kick()
	return nil
}

func (c *conn) writeClosedErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.dead {
		return c.failErr
	}
	return ErrClosed
}

func (c *conn) kick() {
	select {
	case c.wsig <- struct{}{}:
	default:
	}
}

// closeStdin makes the writer write what is queued, close stdin and stop.
func (c *conn) closeStdin() {
	c.wmu.Lock()
	c.wclosed = true
	c.wmu.Unlock()
	c.kick()
}

// writeLoop writes queued frames, as many as have accumulated in one write.
func (c *conn) writeLoop() {
	defer c.cl.wg.Done()
	defer close(c.writeDone)
	var buf []byte
	failed := false
	for range c.wsig {
		// Let callers that are about to write join this write: fewer, larger writes are
		// cheaper for both sides when many requests are in flight.
		runtime.Gosched()
		c.wmu.Lock()
		buf, c.wbuf = c.wbuf, buf[:0]
		closed := c.wclosed
		c.wmu.Unlock()
		if len(buf) > 0 && !failed {
			if _, err := c.stdin.Write(buf); err != nil {
				// The process is gone or going; waitLoop reports it to every call.
				failed = true
				c.cl.log.Debug("sidecar: write to runtime failed", "pid", c.pid, "err", err)
			}
		}
		if cap(buf) > 1<<20 {
			buf = nil
		}
		if closed {
			c.stdin.Close()
			return
		}
	}
}

// ---- reading ----

type envelope struct {
	ID     json.RawMessage `json:"id"`
	Method string          `json:"method"`
	Params json.RawMessage `json:"params"`
	Result json.RawMessage `json:"result"`
	Error  *RPCError       `json:"error"`
}

func (c *conn) readLoop() {
	defer c.cl.wg.Done()
	defer close(c.readDone)
	r := newFrameReader(c.framing, c.stdout, c.cl.opts.MaxFrameBytes)
	for {
		frame, err := r.ReadFrame()
		if err == nil {
			c.dispatch(frame)
			continue
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF || errors.Is(err, os.ErrClosed) {
			return
		}
		if !isFatalFrameError(err) {
			c.cl.log.Warn("sidecar: skipped a frame from the runtime", "pid", c.pid, "err", err)
			continue
		}
		// The stream can no longer be followed: end the process so that every call hears of it.
		c.cl.log.Error("sidecar: unreadable output from the runtime; killing it", "pid", c.pid, "err", err)
		c.mu.Lock()
		c.protoErr = err
		c.mu.Unlock()
		c.kill()
		return
	}
}

func (c *conn) dispatch(frame []byte) {
	if h := c.cl.opts.OnMessage; h != nil {
		h(json.RawMessage(bytes.Clone(frame)))
	}
	if i := bytes.IndexFunc(frame, func(r rune) bool { return r != ' ' && r != '\t' && r != '\r' && r != '\n' }); i >= 0 && frame[i] == '[' {
		c.cl.log.Debug("sidecar: ignored a batch answer", "pid", c.pid)
		return
	}
	var env envelope
	if err := json.Unmarshal(frame, &env); err != nil {
		c.cl.log.Warn("sidecar: ignored an undecodable message from the runtime", "pid", c.pid, "err", err)
		return
	}
	if env.ID == nil {
		c.notification(env.Method, env.Params)
		return
	}
	if env.Method != "" {
		c.cl.log.Warn("sidecar: ignored a request from the runtime", "method", env.Method)
		return
	}
	id, err := strconv.ParseInt(string(env.ID), 10, 64)
	if err != nil {
		if env.Error != nil {
			c.cl.log.Warn("sidecar: the runtime refused a message", "id", string(env.ID), "err", env.Error)
		}
		return
	}
	c.mu.Lock()
	k := c.pending[id]
	delete(c.pending, id)
	c.mu.Unlock()
	if k == nil {
		return // cancelled by its caller, or not ours (SendMessage)
	}
	if env.Error != nil {
		k.err = env.Error
	} else {
		k.result = env.Result
	}
	k.complete()
}

func (c *conn) notification(method string, params json.RawMessage) {
	switch method {
	case "generate/chunk":
		var ch Chunk
		if err := json.Unmarshal(params, &ch); err != nil {
			c.cl.log.Warn("sidecar: ignored a bad generate/chunk", "err", err)
			return
		}
		id, ok := ch.ID.Int()
		if !ok {
			return
		}
		c.mu.Lock()
		k := c.pending[id]
		c.mu.Unlock()
		if k != nil && k.stream != nil {
			k.stream.push(ch, c.procExited)
		}
	case "$/progress":
		if f := c.cl.opts.OnProgress; f != nil {
			var p Progress
			if err := json.Unmarshal(params, &p); err != nil {
				c.cl.log.Warn("sidecar: ignored a bad $/progress", "err", err)
				return
			}
			c.cl.events.push(func() { f(p) })
		}
	case "$/metrics":
		if f := c.cl.opts.OnMetrics; f != nil {
			var m Metrics
			if err := json.Unmarshal(params, &m); err != nil {
				c.cl.log.Warn("sidecar: ignored a bad $/metrics", "err", err)
				return
			}
			c.cl.events.push(func() { f(m) })
		}
	default:
		c.cl.log.Debug("sidecar: ignored a notification", "method", method)
	}
}

// ---- messages ----

func appendRequest(dst []byte, id int64, method string, params json.RawMessage) []byte {
	dst = append(dst, `{"jsonrpc":"2.0","id":`...)
	dst = strconv.AppendInt(dst, id, 10)
	return appendMethodParams(dst, method, params)
}

func appendNotification(dst []byte, method string, params json.RawMessage) []byte {
	dst = append(dst, `{"jsonrpc":"2.0"`...)
	return appendMethodParams(dst, method, params)
}

func appendMethodParams(dst []byte, method string, params json.RawMessage) []byte {
	dst = append(dst, `,"method":`...)
	dst = appendJSONString(dst, []byte(method))
	if len(params) > 0 {
		dst = append(dst, `,"params":`...)
		dst = append(dst, params...)
	}
	return append(dst, '}')
}

// marshalParams encodes params; nil (or JSON null) means no params member.
func marshalParams(params any) (json.RawMessage, error) {
	if params == nil {
		return nil, nil
	}
	var raw []byte
	if r, ok := params.(json.RawMessage); ok {
		if !json.Valid(r) {
			return nil, errors.New("sidecar: params are not valid JSON")
		}
		raw = r
	} else {
		var err error
		if raw, err = json.Marshal(params); err != nil {
			return nil, errors.Join(errors.New("sidecar: could not encode params"), err)
		}
	}
	if string(raw) == "null" {
		return nil, nil
	}
	return raw, nil
}
