package sidecar

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// Options configure Start. The zero value runs DefaultCommand with the ndjson framing.
type Options struct {
	// Command is the argv that runs the runtime, e.g. {"/venv/bin/python", "-m",
	// "mlx_sidecar"}; empty means DefaultCommand. The client appends "--framing F", then
	// "--log-level L" when LogLevel is set, then Args.
	Command []string
	// Args are more command-line arguments, e.g. {"--model", "DIR"}.
	Args []string
	// Framing is the framing to speak; default NDJSON.
	Framing Framing
	// LogLevel is the runtime's stderr log level: "debug", "info", "warning" or "error".
	LogLevel string
	// Dir is the process's working directory; empty means the caller's.
	Dir string
	// Env is the process's environment; nil means the caller's.
	Env []string
	// ClientInfo is sent with initialize; default {Name: "mlx-sidecar-go"}.
	ClientInfo *ClientInfo

	// OnProgress receives $/progress notifications (sent while model/load runs). OnStderr
	// receives the runtime's stderr, line by line. Both are called in order from one goroutine
	// of the client's, never concurrently; they may call the client. Close waits for them.
	OnProgress func(Progress)
	OnStderr   func(line string)
	// OnMetrics receives a $/metrics notification (the runtime/metrics snapshot) every
	// MetricsInterval, from the same goroutine as OnProgress. Both must be set to get any;
	// MetricsInterval is rounded down to milliseconds and must be at least 50 ms.
	OnMetrics       func(Metrics)
	MetricsInterval time.Duration
	// OnMessage, for tests and debugging, receives a copy of every message read from the
	// runtime (as JSON, whatever the framing) before the client routes it. It is called on the
	// reading goroutine: it must return quickly and must not call the client.
	OnMessage func(msg json.RawMessage)

	// Restart, when set, restarts a crashed runtime; nil leaves it dead. See RestartPolicy.
	Restart *RestartPolicy

	// Logger receives the client's own diagnostics (restarts, frames it skipped); nil
	// discards them.
	Logger *slog.Logger

	// ShutdownTimeout bounds Close's polite part: cancelling, shutdown, exit and the wait for
	// the process to exit (default 5 s). TermTimeout is how long Close waits after SIGTERM
	// before SIGKILL (default 2 s).
	ShutdownTimeout time.Duration
	TermTimeout     time.Duration
	// CancelGrace is how long a cancelled Stream waits for the runtime's answer (which
	// carries the text so far and usage) before it gives up on it (default 2 s).
	CancelGrace time.Duration
	// StreamBuffer bounds the chunks one Stream holds that its reader has not taken yet
	// (default 64). When a stream's buffer is full the client stops reading the runtime's
	// output until that reader takes a chunk, so the runtime pauses generating (every
	// request's answers wait meanwhile). StallTimeout bounds that wait: when the reader takes
	// no chunk for that long, the stream is cancelled and ends with ErrStreamStalled (as the
	// cause of a *GenerateError carrying the whole text so far) and reading resumes
	// (default 30 s; negative: wait as long as it takes).
	StreamBuffer int
	StallTimeout time.Duration
	// StderrTailBytes is how much of the end of stderr is kept for *ExitError (default 8 KiB).
	StderrTailBytes int
	// MaxFrameBytes bounds one incoming frame (default DefaultMaxFrameBytes).
	MaxFrameBytes int
}

func (o Options) withDefaults() (Options, error) {
	if o.Framing == "" {
		o.Framing = NDJSON
	}
	if !o.Framing.valid() {
		return o, fmt.Errorf("sidecar: unknown framing %q; use ndjson, lsp or msgpack", o.Framing)
	}
	if o.ClientInfo == nil {
		o.ClientInfo = &ClientInfo{Name: "mlx-sidecar-go", Version: Version}
	}
	if o.OnMetrics != nil && o.MetricsInterval != 0 && o.MetricsInterval < 50*time.Millisecond {
		return o, fmt.Errorf("sidecar: MetricsInterval %v is below the runtime's 50 ms minimum", o.MetricsInterval)
	}
	if o.Restart != nil {
		o.Restart = o.Restart.withDefaults()
	}
	if o.ShutdownTimeout <= 0 {
		o.ShutdownTimeout = 5 * time.Second
	}
	if o.TermTimeout <= 0 {
		o.TermTimeout = 2 * time.Second
	}
	if o.CancelGrace <= 0 {
		o.CancelGrace = 2 * time.Second
	}
	if o.StreamBuffer <= 0 {
		o.StreamBuffer = 64
	}
	if o.StallTimeout == 0 {
		o.StallTimeout = 30 * time.Second
	}
	if o.StderrTailBytes <= 0 {
		o.StderrTailBytes = 8 << 10
	}
	if o.MaxFrameBytes <= 0 {
		o.MaxFrameBytes = DefaultMaxFrameBytes
	}
	return o, nil
}

// Version is this client's version, sent in initialize's client_info.
const Version = "0.1.0"

// Client is a running runtime process and the JSON-RPC connection to it. Its methods are
// safe for concurrent use. Requests are pipelined: each call writes its request and waits
// for its own answer, so many calls can be in flight at once.
type Client struct {
	opts   Options
	argv   []string
	log    *slog.Logger
	nextID atomic.Int64
	events *events

	life       context.Context // ends when Close begins; bounds restarts
	cancelLife context.CancelFunc
	wg         sync.WaitGroup // every goroutine of the client's but the events one

	mu      sync.Mutex
	cur     *conn         // the live process; nil while restarting or after death
	changed chan struct{} // closed and replaced whenever cur, dead or closing change
	dead    error         // why calls fail now that no process will come back
	closing bool
	crashes crashRecord
	loads   []loadRecord

	closeOnce sync.Once
	closeErr  error
}

type loadRecord struct {
	id     string
	params json.RawMessage
}

// Start runs the runtime and returns once it has answered initialize. ctx bounds the start
// only, not the process's life: end that with Close. When the process cannot be started, or
// exits before answering, the error is an *ExitError with the exit status and the end of its
// stderr (or, when it could not run at all, the error from os/exec).
func Start(ctx context.Context, opts Options) (*Client, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	argv := append([]string(nil), opts.Command...)
	if len(argv) == 0 {
		if argv, err = DefaultCommand(); err != nil {
			return nil, err
		}
	}
	argv = append(argv, "--framing", string(opts.Framing))
	if opts.LogLevel != "" {
		argv = append(argv, "--log-level", opts.LogLevel)
	}
	argv = append(argv, opts.Args...)
	cl := &Client{opts: opts, argv: argv, log: opts.Logger, changed: make(chan struct{}), events: newEvents()}
	if cl.log == nil {
		cl.log = slog.New(discardHandler{})
	}
	cl.life, cl.cancelLife = context.WithCancel(context.Background())
	c, err := cl.spawn(ctx)
	if err == nil {
		cl.mu.Lock()
		if c.isDead() {
			// It died between answering initialize and now: connDied did not know it yet.
			err = c.exitErr
		} else {
			cl.cur = c
		}
		cl.mu.Unlock()
	}
	if err != nil {
		cl.cancelLife()
		cl.wg.Wait()
		cl.events.stop()
		return nil, err
	}
	return cl, nil
}

// Close ends the runtime and releases everything the client holds; no goroutine of the
// client's outlives it. In order: it cancels the requests in flight (they end with their
// cancellation answers), sends shutdown and waits for its answer, sends exit, closes stdin
// and waits for the process to exit, within Options.ShutdownTimeout; then sends SIGTERM and
// waits Options.TermTimeout; then sends SIGKILL. Calls made after Close began fail with
// ErrClosed.
//
// Close is idempotent and safe to call concurrently with anything, itself included: every
// call returns once the first has finished, with its result: nil when the process exited
// with status 0 (or was already gone), else an error describing how it ended.
func (cl *Client) Close() error {
	cl.closeOnce.Do(func() {
		cl.mu.Lock()
		cl.closing = true
		c := cl.cur
		cl.broadcastLocked()
		cl.mu.Unlock()
		cl.cancelLife()
		if c != nil {
			cl.closeErr = c.shutdown()
		}
		cl.wg.Wait()
		cl.events.stop()
	})
	return cl.closeErr
}

func (cl *Client) broadcastLocked() {
	close(cl.changed)
	cl.changed = make(chan struct{})
}

// conn returns the live process, waiting while it restarts.
func (cl *Client) conn(ctx context.Context) (*conn, error) {
	for {
		cl.mu.Lock()
		if cl.closing {
			cl.mu.Unlock()
			return nil, ErrClosed
		}
		if c := cl.cur; c != nil && !c.isDead() {
			cl.mu.Unlock()
			return c, nil
		}
		if cl.dead != nil {
			err := cl.dead
			cl.mu.Unlock()
			return nil, err
		}
		ch := cl.changed
		cl.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// PID is the process id of the runtime, or 0 while there is none.
func (cl *Client) PID() int {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.cur == nil {
		return 0
	}
	return cl.cur.pid
}

// Framing is the framing the client speaks.
func (cl *Client) Framing() Framing { return cl.opts.Framing }

// InitializeResult is the runtime's answer to initialize (after a restart, the new
// process's), or nil while there is no process.
func (cl *Client) InitializeResult() *InitializeResult {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.cur == nil {
		return nil
	}
	return cl.cur.init
}

// Call sends a request and decodes its result into result (unless result is nil). params
// is encoded with encoding/json (a json.RawMessage is sent as is; nil sends no params).
// Errors answered by the runtime are *RPCError. When ctx ends first, Call sends
// $/cancelRequest and returns ctx's error.
func (cl *Client) Call(ctx context.Context, method string, params, result any) error {
	raw, err := marshalParams(params)
	if err != nil {
		return err
	}
	c, err := cl.conn(ctx)
	if err != nil {
		return err
	}
	res, err := c.call(ctx, method, raw)
	if err != nil {
		return err
	}
	cl.observe(method, raw, res)
	if result != nil {
		if err := json.Unmarshal(res, result); err != nil {
			return fmt.Errorf("sidecar: could not decode the result of %s: %w", method, err)
		}
	}
	return nil
}

// Notify sends a notification, such as $/cancelRequest. It returns once the notification is
// queued for writing.
func (cl *Client) Notify(ctx context.Context, method string, params any) error {
	raw, err := marshalParams(params)
	if err != nil {
		return err
	}
	c, err := cl.conn(ctx)
	if err != nil {
		return err
	}
	return c.notify(method, raw)
}

// SendMessage writes one JSON-RPC message, or a batch array, as given, in the client's
// framing. The client does not track it: its answer reaches only Options.OnMessage. For
// tests and debugging.
func (cl *Client) SendMessage(ctx context.Context, msg json.RawMessage) error {
	if !json.Valid(msg) {
		return errors.New("sidecar: SendMessage needs one JSON text")
	}
	c, err := cl.conn(ctx)
	if err != nil {
		return err
	}
	return c.write(msg)
}

// WriteRaw writes b to the runtime's stdin byte for byte, framing included (or not). For
// tests and debugging; a frame the runtime cannot read is answered with an error whose id is
// null, which reaches only Options.OnMessage.
func (cl *Client) WriteRaw(ctx context.Context, b []byte) error {
	c, err := cl.conn(ctx)
	if err != nil {
		return err
	}
	return c.writeRaw(b)
}

// observe remembers successful model loads (and forgets unloads), for restarts.
func (cl *Client) observe(method string, params, result json.RawMessage) {
	if method != "model/load" && method != "model/unload" {
		return
	}
	var r struct {
		ID string `json:"id"`
	}
	if json.Unmarshal(result, &r) != nil || r.ID == "" {
		return
	}
	if method == "model/unload" {
		cl.forgetModel(r.ID)
		return
	}
	cl.mu.Lock()
	defer cl.mu.Unlock()
	for i, l := range cl.loads {
		if l.id == r.ID {
			cl.loads[i].params = params
			return
		}
	}
	cl.loads = append(cl.loads, loadRecord{id: r.ID, params: params})
}

func (cl *Client) forgetModel(id string) {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	for i, l := range cl.loads {
		if l.id == id {
			cl.loads = append(cl.loads[:i], cl.loads[i+1:]...)
			return
		}
	}
}

// ---- typed methods ----

// Ping calls runtime/ping.
func (cl *Client) Ping(ctx context.Context) error {
	return cl.Call(ctx, "runtime/ping", nil, nil)
}

// Info calls runtime/info.
func (cl *Client) Info(ctx context.Context) (*RuntimeInfo, error) {
	var r RuntimeInfo
	if err := cl.Call(ctx, "runtime/info", nil, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// Metrics calls runtime/metrics.
func (cl *Client) Metrics(ctx context.Context) (*Metrics, error) {
	var r Metrics
	if err := cl.Call(ctx, "runtime/metrics", nil, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// LoadModel calls model/load. Progress goes to Options.OnProgress. A model loaded this way is
// loaded again, with the same params, after a restart.
func (cl *Client) LoadModel(ctx context.Context, p *ModelLoadParams) (*ModelInfo, error) {
	var r ModelInfo
	if err := cl.Call(ctx, "model/load", p, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// UnloadModel calls model/unload.
func (cl *Client) UnloadModel(ctx context.Context, p *ModelUnloadParams) (*ModelUnloadResult, error) {
	var r ModelUnloadResult
	if err := cl.Call(ctx, "model/unload", p, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// ListModels calls model/list.
func (cl *Client) ListModels(ctx context.Context) ([]ModelInfo, error) {
	var r ModelListResult
	if err := cl.Call(ctx, "model/list", nil, &r); err != nil {
		return nil, err
	}
	return r.Models, nil
}

// Tokenize calls tokenize.
func (cl *Client) Tokenize(ctx context.Context, p *TokenizeParams) (*TokenizeResult, error) {
	var r TokenizeResult
	if err := cl.Call(ctx, "tokenize", p, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// Score calls score: the log-probabilities of given text.
func (cl *Client) Score(ctx context.Context, p *ScoreParams) (*ScoreResult, error) {
	var r ScoreResult
	if err := cl.Call(ctx, "score", p, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// Detokenize calls detokenize.
func (cl *Client) Detokenize(ctx context.Context, p *DetokenizeParams) (*DetokenizeResult, error) {
	var r DetokenizeResult
	if err := cl.Call(ctx, "detokenize", p, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// discardHandler is a slog.Handler that drops everything.
type discardHandler struct{}

func (discardHandler) Enabled(context.Context, slog.Level) bool  { return false }
func (discardHandler) Handle(context.Context, slog.Record) error { return nil }
func (d discardHandler) WithAttrs([]slog.Attr) slog.Handler      { return d }
func (d discardHandler) WithGroup(string) slog.Handler           { return d }
