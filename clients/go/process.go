package sidecar

// The process: finding the runtime, spawning it on three pipes, collecting its stderr,
// noticing its death, ending it (shutdown → exit → close stdin → wait → SIGTERM → SIGKILL),
// and restarting it after a crash.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// DefaultCommand returns the argv that runs the runtime when Options.Command is empty:
//
//  1. $MLX_SIDECAR_PYTHON -m mlx_sidecar, when that variable is set;
//  2. else PYTHON -m mlx_sidecar, where PYTHON is the first .venv/bin/python found next to a
//     runtime/mlx_sidecar directory in the working directory or one of its parents (a
//     checkout of the mlx-sidecar repository);
//  3. else mlx-sidecar, found on PATH.
func DefaultCommand() ([]string, error) {
	if py := os.Getenv("MLX_SIDECAR_PYTHON"); py != "" {
		return []string{py, "-m", "mlx_sidecar"}, nil
	}
	if wd, err := os.Getwd(); err == nil {
		for dir := wd; ; {
			py := filepath.Join(dir, ".venv", "bin", "python")
			if isFile(py) && isDir(filepath.Join(dir, "runtime", "mlx_sidecar")) {
				return []string{py, "-m", "mlx_sidecar"}, nil
			}
			parent := filepath.Dir(dir)
			if parent == dir {
				break
			}
			dir = parent
		}
	}
	if p, err := exec.LookPath("mlx-sidecar"); err == nil {
		return []string{p}, nil
	}
	return nil, fmt.Errorf("%w: MLX_SIDECAR_PYTHON is unset, no .venv/bin/python beside runtime/mlx_sidecar above the working directory, and no mlx-sidecar on PATH", ErrRuntimeNotFound)
}

func isFile(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir()
}

func isDir(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}

// spawn starts a process, wires a conn to it and waits for initialize's answer. On failure
// the process has been ended and waited for.
func (cl *Client) spawn(ctx context.Context) (*conn, error) {
	argv := cl.argv
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir = cl.opts.Dir
	cmd.Env = cl.opts.Env
	var files []*os.File
	pipe := func() (r, w *os.File, err error) {
		if r, w, err = os.Pipe(); err == nil {
			files = append(files, r, w)
		}
		return r, w, err
	}
	closeAll := func() {
		for _, f := range files {
			f.Close()
		}
	}
	stdinR, stdinW, err1 := pipe()
	stdoutR, stdoutW, err2 := pipe()
	stderrR, stderrW, err3 := pipe()
	if err := errors.Join(err1, err2, err3); err != nil {
		closeAll()
		return nil, err
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdinR, stdoutW, stderrW
	if err := cmd.Start(); err != nil {
		closeAll()
		return nil, fmt.Errorf("sidecar: could not start the runtime (%s): %w", argv[0], err)
	}
	// The child has its own copies of its ends.
	stdinR.Close()
	stdoutW.Close()
	stderrW.Close()

	c := newConn(cl, cmd, stdinW, stdoutR, stderrR)
	cl.wg.Add(4)
	go c.readLoop()
	go c.stderrLoop()
	go c.writeLoop()
	go c.waitLoop()
	cl.log.Debug("sidecar: started the runtime", "pid", c.pid, "argv", argv)

	initParams := InitializeParams{ProtocolVersion: ProtocolVersion, ClientInfo: cl.opts.ClientInfo}
	if cl.opts.OnMetrics != nil {
		initParams.MetricsIntervalMs = int(cl.opts.MetricsInterval.Milliseconds())
	}
	params, _ := json.Marshal(initParams)
	raw, err := c.call(ctx, "initialize", params)
	if err == nil {
		var res InitializeResult
		if err = json.Unmarshal(raw, &res); err == nil {
			c.init = &res
			c.readyAt = time.Now()
			return c, nil
		}
	}
	c.kill()
	<-c.exited
	var ee *ExitError
	if errors.As(err, &ee) {
		return nil, ee
	}
	if tail := lastLines(c.tail.String(), 6, 800); tail != "" {
		return nil, fmt.Errorf("sidecar: initialize failed: %w; stderr tail:\n%s", err, tail)
	}
	return nil, fmt.Errorf("sidecar: initialize failed: %w", err)
}

func (c *conn) kill() { _ = c.cmd.Process.Kill() }

// stderrLoop keeps the tail of stderr and hands complete lines to Options.OnStderr.
func (c *conn) stderrLoop() {
	defer c.cl.wg.Done()
	defer close(c.stderrDone)
	onLine := c.cl.opts.OnStderr
	buf := make([]byte, 8192)
	var partial []byte
	for {
		n, err := c.stderr.Read(buf)
		if n > 0 {
			c.tail.Write(buf[:n])
			if onLine != nil {
				data := buf[:n]
				for len(data) > 0 {
					i := indexByte(data, '\n')
					if i < 0 {
						if len(partial) < 64<<10 {
							partial = append(partial, data...)
						}
						break
					}
					line := string(append(partial, trimCR(data[:i])...))
					partial = partial[:0]
					data = data[i+1:]
					c.cl.events.push(func() { onLine(line) })
				}
			}
		}
		if err != nil {
			if onLine != nil && len(partial) > 0 {
				line := string(partial)
				c.cl.events.push(func() { onLine(line) })
			}
			return
		}
	}
}

func indexByte(b []byte, c byte) int {
	for i, x := range b {
		if x == c {
			return i
		}
	}
	return -1
}

func trimCR(b []byte) []byte {
	if len(b) > 0 && b[len(b)-1] == '\r' {
		return b[:len(b)-1]
	}
	return b
}

// waitLoop waits for the process to end, lets the readers take in what it wrote, then fails
// every pending call with the exit status and the stderr tail.
func (c *conn) waitLoop() {
	defer c.cl.wg.Done()
	waitErr := c.cmd.Wait()
	close(c.procExited) // a reader blocked on a full stream buffer reads on, unbounded
	drain(c.readDone, c.stdout)
	drain(c.stderrDone, c.stderr)
	c.closeStdin()
	c.stdin.Close() // unblocks a write stuck on a full pipe
	<-c.writeDone

	c.mu.Lock()
	ee := newExitError(c.cmd.ProcessState, waitErr, c.tail.String(), c.protoErr)
	c.exitErr = ee
	c.dead = true
	c.failErr = ee
	if c.closing {
		c.failErr = fmt.Errorf("%w: %w", ErrClosed, ee)
	}
	pending := c.pending
	c.pending = nil
	failErr := c.failErr
	c.mu.Unlock()
	for _, k := range pending {
		k.err = failErr
		k.complete()
	}
	close(c.exited)
	c.cl.log.Debug("sidecar: the runtime exited", "pid", c.pid, "err", ee)
	c.cl.connDied(c)
}

// drain waits for a reader to reach the end of its pipe; when something else (a grandchild)
// holds the pipe open, it closes the pipe to stop the reader.
func drain(done <-chan struct{}, f *os.File) {
	t := time.NewTimer(2 * time.Second)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		f.Close()
		<-done
	}
	f.Close()
}

func newExitError(ps *os.ProcessState, waitErr error, stderr string, protoErr error) *ExitError {
	ee := &ExitError{Code: -1, Stderr: stderr, Err: waitErr}
	if protoErr != nil {
		ee.Err = protoErr
	}
	if ps != nil {
		ee.Code = ps.ExitCode()
		if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			ee.Signal = ws.Signal().String()
		}
	}
	return ee
}

func isPlainExit(err error) bool {
	var xe *exec.ExitError
	return errors.As(err, &xe)
}

// shutdown ends the process politely, then less so: it cancels the generate requests in
// flight and waits up to Options.CancelGrace for their answers (other calls are left to
// finish: the runtime answers shutdown after them), sends shutdown and waits for its answer,
// sends exit, closes stdin and waits for the process to exit, all within
// Options.ShutdownTimeout; then SIGTERM, Options.TermTimeout; then SIGKILL. It returns nil
// when the process exits with status 0 without a signal, and nil when it was already gone.
func (c *conn) shutdown() error {
	o := &c.cl.opts
	c.mu.Lock()
	if c.dead {
		c.mu.Unlock()
		return nil
	}
	c.closing = true
	var gens []*call
	for _, k := range c.pending {
		if k.method == "generate" {
			gens = append(gens, k)
		}
	}
	c.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), o.ShutdownTimeout)
	defer cancel()
	for _, k := range gens {
		if k.stream != nil {
			k.stream.setCause(ErrClosed)
		} else {
			c.cancelRequest(k.id) // a generate sent through Call
		}
	}
	grace := time.NewTimer(o.CancelGrace)
	defer grace.Stop()
wait:
	for _, k := range gens {
		select {
		case <-k.done:
		case <-grace.C:
			break wait
		case <-ctx.Done():
			break wait
		}
	}
	if _, err := c.call(ctx, "shutdown", nil); err != nil {
		c.cl.log.Debug("sidecar: shutdown was not answered", "pid", c.pid, "err", err)
	}
	_ = c.notify("exit", nil)
	c.closeStdin()
	select {
	case <-c.exited:
		if c.exitErr.Code != 0 || c.exitErr.Signal != "" {
			return c.exitErr
		}
		return nil
	case <-ctx.Done():
	}
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	t := time.NewTimer(o.TermTimeout)
	defer t.Stop()
	select {
	case <-c.exited:
		return fmt.Errorf("sidecar: the runtime did not exit within %v of shutdown and was sent SIGTERM: %w", o.ShutdownTimeout, c.exitErr)
	case <-t.C:
	}
	c.kill()
	<-c.exited
	return fmt.Errorf("sidecar: the runtime ignored shutdown and SIGTERM and was killed: %w", c.exitErr)
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	b   []byte
	max int
}

func (t *tailBuffer) Write(p []byte) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(p) >= t.max {
		t.b = append(t.b[:0], p[len(p)-t.max:]...)
		return
	}
	if over := len(t.b) + len(p) - t.max; over > 0 {
		t.b = t.b[:copy(t.b, t.b[over:])]
	}
	t.b = append(t.b, p...)
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}

// ---- restarts ----

// RestartPolicy makes the client restart a runtime that crashed, re-loading the models that
// were loaded through it (with the params of their successful model/load). Calls made while
// it restarts wait for it. Calls pending when it crashed fail with the *ExitError.
//
// The wait before restart n is d = MinBackoff * 2^(n-1), at most MaxBackoff, times a random
// factor in [1-Jitter, 1+Jitter], where n counts the crashes since a process last stayed up
// HealthyAfter: 250 ms, 500 ms, 1 s, 2 s, 4 s, 5 s, ... by default, back to 250 ms after a
// process that ran 30 s.
type RestartPolicy struct {
	// MaxCrashes within Window make the client give up: default 5 crashes in 180 s. After
	// giving up every call fails with an error wrapping ErrTooManyCrashes and the last *ExitError.
	MaxCrashes int
	Window     time.Duration
	// MinBackoff is the first wait (default 250 ms); each further crash doubles it, up to
	// MaxBackoff (default 5 s).
	MinBackoff time.Duration
	MaxBackoff time.Duration
	// Jitter is the random spread of each wait, a fraction of it (default 0.2; negative: none).
	Jitter float64
	// HealthyAfter is how long a process must run for its crash to start the backoff over
	// (default 30 s).
	HealthyAfter time.Duration
}

func (p *RestartPolicy) withDefaults() *RestartPolicy {
	q := *p
	if q.MaxCrashes <= 0 {
		q.MaxCrashes = 5
	}
	if q.Window <= 0 {
		q.Window = 180 * time.Second
	}
	if q.MinBackoff <= 0 {
		q.MinBackoff = 250 * time.Millisecond
	}
	if q.MaxBackoff <= 0 {
		q.MaxBackoff = 5 * time.Second
	}
	if q.MaxBackoff < q.MinBackoff {
		q.MaxBackoff = q.MinBackoff
	}
	switch {
	case q.Jitter == 0:
		q.Jitter = 0.2
	case q.Jitter < 0:
		q.Jitter = 0
	case q.Jitter > 1:
		q.Jitter = 1
	}
	if q.HealthyAfter <= 0 {
		q.HealthyAfter = 30 * time.Second
	}
	return &q
}

// crashRecord is what the restart policy remembers of past crashes.
type crashRecord struct {
	times  []time.Time // crashes within the window
	streak int         // crashes since a process last ran HealthyAfter
}

// decide records a crash at now of a process that had run for uptime (0 when it never
// started). It returns how long to wait before restarting, or giveUp. rnd, in [0, 1), picks
// the jitter.
func (p *RestartPolicy) decide(r *crashRecord, now time.Time, uptime time.Duration, rnd float64) (delay time.Duration, giveUp bool) {
	recent := r.times[:0]
	for _, t := range r.times {
		if now.Sub(t) < p.Window {
			recent = append(recent, t)
		}
	}
	r.times = append(recent, now)
	if uptime >= p.HealthyAfter {
		r.streak = 0
	}
	r.streak++
	if len(r.times) >= p.MaxCrashes {
		return 0, true
	}
	delay = p.MinBackoff
	for i := 1; i < r.streak && delay < p.MaxBackoff; i++ {
		delay *= 2
	}
	delay = min(delay, p.MaxBackoff)
	return time.Duration(float64(delay) * (1 + p.Jitter*(2*rnd-1))), false
}

// crashLocked records a crash of a process that had run for uptime; it returns the wait
// before the next start, or gives up (setting cl.dead) and returns false. cl.mu is held.
func (cl *Client) crashLocked(ee *ExitError, uptime time.Duration) (time.Duration, bool) {
	delay, giveUp := cl.opts.Restart.decide(&cl.crashes, time.Now(), uptime, rand.Float64())
	if giveUp {
		cl.dead = fmt.Errorf("%w: %w", ErrTooManyCrashes, ee)
		cl.log.Error("sidecar: the runtime crashed too often; giving up", "crashes", len(cl.crashes.times), "window", cl.opts.Restart.Window, "err", ee)
		return 0, false
	}
	cl.log.Warn("sidecar: the runtime crashed; restarting it", "in", delay, "err", ee)
	return delay, true
}

// connDied is told of every process's end by its waitLoop.
func (cl *Client) connDied(c *conn) {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.cur != c {
		return // not published yet (spawn, restart) or already replaced
	}
	cl.cur = nil
	defer cl.broadcastLocked()
	if cl.closing {
		return
	}
	if cl.opts.Restart == nil {
		cl.dead = c.exitErr
		return
	}
	if delay, ok := cl.crashLocked(c.exitErr, time.Since(c.readyAt)); ok {
		cl.wg.Add(1) // safe: the calling waitLoop is counted too
		go cl.restartLoop(delay)
	}
}

// restartLoop starts a new process after delay and publishes it once its models are back.
func (cl *Client) restartLoop(delay time.Duration) {
	defer cl.wg.Done()
	for {
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-cl.life.Done():
			t.Stop()
			return
		}
		c, err := cl.spawn(cl.life)
		if err == nil {
			if err = cl.reload(cl.life, c); err != nil {
				c.kill()
				<-c.exited
			}
		}
		cl.mu.Lock()
		if cl.closing {
			cl.mu.Unlock()
			if err == nil {
				_ = c.shutdown()
			}
			return
		}
		if err == nil && !c.isDead() {
			cl.cur = c
			cl.broadcastLocked()
			cl.mu.Unlock()
			cl.log.Info("sidecar: restarted the runtime", "pid", c.pid)
			return
		}
		if err == nil {
			err = c.exitErr
		}
		var ee *ExitError
		if !errors.As(err, &ee) {
			ee = &ExitError{Code: -1, Err: err}
		}
		var ok bool
		delay, ok = cl.crashLocked(ee, 0)
		if !ok {
			cl.broadcastLocked()
			cl.mu.Unlock()
			return
		}
		cl.mu.Unlock()
	}
}

// reload sends the remembered model/load requests to a new process, in their first order.
// A model that no longer loads is forgotten; a process that dies fails the reload.
func (cl *Client) reload(ctx context.Context, c *conn) error {
	cl.mu.Lock()
	loads := append([]loadRecord(nil), cl.loads...)
	cl.mu.Unlock()
	for _, l := range loads {
		if _, err := c.call(ctx, "model/load", l.params); err != nil {
			var rpc *RPCError
			if !errors.As(err, &rpc) {
				return err
			}
			cl.log.Warn("sidecar: a model did not load again after a restart; forgetting it", "model", l.id, "err", err)
			cl.forgetModel(l.id)
		}
	}
	return nil
}
