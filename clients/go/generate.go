package sidecar

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"iter"
	"strings"
	"sync"
	"time"
)

// Generate starts a generation and returns its Stream as soon as the request is written;
// it does not wait for the model. Range over Stream.Chunks for the text as it is generated
// (unless p.Stream is false), and call Stream.Result for the final result.
//
// When ctx ends, the client sends $/cancelRequest at once; the stream stops yielding chunks
// and ends with a *GenerateError that wraps ctx's error and carries the text so far and usage
// (from the runtime's cancellation answer, waited for up to Options.CancelGrace).
func (cl *Client) Generate(ctx context.Context, p *GenerateParams) (*Stream, error) {
	if p == nil {
		return nil, errors.New("sidecar: Generate needs params")
	}
	raw, err := json.Marshal(p)
	if err != nil {
		return nil, fmt.Errorf("sidecar: could not encode generate params: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	c, err := cl.conn(ctx)
	if err != nil {
		return nil, err
	}
	s := &Stream{
		ctx:   ctx,
		conn:  c,
		grace: cl.opts.CancelGrace,
		max:   cl.opts.StreamBuffer,
		stall: cl.opts.StallTimeout,
		sig:   make(chan struct{}, 1),
		room:  make(chan struct{}, 1),
	}
	if _, err := c.start("generate", raw, s); err != nil {
		return nil, err
	}
	s.mu.Lock() // s.call was set by start
	if !s.responded {
		s.stopAfter = context.AfterFunc(ctx, func() { s.setCause(ctx.Err()) })
	}
	s.mu.Unlock()
	return s, nil
}

// Stream is one generation in progress. Read it with Chunks, then Result; or with Result
// alone. It is meant to be read by one goroutine; Cancel may be called from any.
//
// A stream holds at most Options.StreamBuffer chunks that its reader has not taken. While
// that buffer is full the client stops reading the runtime's output (so the runtime pauses
// generating); after Options.StallTimeout without the reader taking a chunk, the stream is
// cancelled and ends with a *GenerateError whose cause is ErrStreamStalled.
type Stream struct {
	ctx   context.Context
	conn  *conn
	grace time.Duration
	max   int           // chunks buffered at most
	stall time.Duration // how long a full buffer may hold up the reader
	sig   chan struct{} // a chunk arrived, or the stream was cancelled
	room  chan struct{} // the reader took a chunk, or the stream stopped buffering

	mu         sync.Mutex
	call       *call
	stopAfter  func() bool // stops the context.AfterFunc
	queue      []Chunk     // received, not yet yielded; at most max, until the process exits
	highWater  int         // the most chunks queue has held
	text       strings.Builder
	responded  bool  // the runtime answered (or the process died)
	cancelSent bool  // $/cancelRequest was sent
	cause      error // why the stream was cut short: ctx's error, context.Canceled (Cancel), ErrClosed, ErrStreamStalled
	ended      bool
	res        *GenerateResult
	err        error
}

// ID is the request id of the generation, the id its chunks carry.
func (s *Stream) ID() RequestID {
	s.mu.Lock()
	defer s.mu.Unlock()
	return IntID(s.call.id)
}

// Chunks yields the generated text chunk by chunk, in order. When the generation ends with
// an error, the last pair yielded holds it (a *GenerateError, *RPCError, ...); a generation
// that succeeds yields only chunks, and Result then gives its result. Breaking out of the loop
// cancels the generation, like Cancel.
func (s *Stream) Chunks() iter.Seq2[Chunk, error] {
	return func(yield func(Chunk, error) bool) {
		for {
			ch, ok := s.next()
			if !ok {
				if _, err := s.final(); err != nil {
					yield(Chunk{}, err)
				}
				return
			}
			if !yield(ch, nil) {
				s.Cancel()
				return
			}
		}
	}
}

// Result waits for the end of the generation (dropping chunks not yet read) and returns its
// result, or the error it ended with.
func (s *Stream) Result() (*GenerateResult, error) {
	for {
		if _, ok := s.next(); !ok {
			return s.final()
		}
	}
}

// Cancel asks the runtime to stop the generation. The stream then ends as it does when its
// context is cancelled, with a *GenerateError that wraps context.Canceled. Cancelling a
// finished generation does nothing.
func (s *Stream) Cancel() {
	s.setCause(context.Canceled)
}

func (s *Stream) final() (*GenerateResult, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.res, s.err
}

func (s *Stream) sendCancel() {
	s.mu.Lock()
	if s.responded || s.cancelSent || s.call == nil {
		s.mu.Unlock()
		return
	}
	s.cancelSent = true
	id := s.call.id
	s.mu.Unlock()
	s.conn.cancelRequest(id)
}

// push and answered are called by the conn's reader. push queues a chunk and, when that
// fills the buffer, blocks the reader until the stream's reader takes one, the stream stops
// buffering (cancelled, ended), the process exits (what is left in the pipe is then read
// without the bound) or the stall timeout cuts the stream short.
func (s *Stream) push(ch Chunk, exited <-chan struct{}) {
	s.mu.Lock()
	s.text.WriteString(ch.Text)
	if s.ended || s.cause != nil {
		s.mu.Unlock()
		return // no longer buffering: the text is kept for the error
	}
	s.queue = append(s.queue, ch)
	s.highWater = max(s.highWater, len(s.queue))
	s.mu.Unlock()
	notify(s.sig)

	var stall <-chan time.Time
	for {
		s.mu.Lock()
		full := len(s.queue) >= s.max && !s.ended && s.cause == nil
		s.mu.Unlock()
		if !full {
			return
		}
		if stall == nil && s.stall > 0 {
			t := time.NewTimer(s.stall)
			defer t.Stop()
			stall = t.C
		}
		select {
		case <-s.room:
		case <-exited:
			return
		case <-stall:
			s.conn.cl.log.Warn("sidecar: a stream's reader took no chunk within the stall timeout; cancelling it",
				"id", ch.ID, "buffered", s.max, "stall", s.stall)
			s.setCause(ErrStreamStalled)
			return
		}
	}
}

// notify wakes whoever waits on a one-slot signal channel.
func notify(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

func (s *Stream) answered() {
	s.mu.Lock()
	s.responded = true
	stop := s.stopAfter
	s.stopAfter = nil
	s.mu.Unlock()
	if stop != nil {
		stop()
	}
}

// next returns the next chunk to yield, or false once the stream has ended (s.res or s.err
// is then set).
func (s *Stream) next() (Chunk, bool) {
	for {
		s.mu.Lock()
		if err := s.ctx.Err(); err != nil && !s.responded && s.cause == nil {
			// No chunk is yielded once the context has ended (AfterFunc may not have run yet).
			s.mu.Unlock()
			s.setCause(err)
			s.mu.Lock()
		}
		if s.ended {
			s.mu.Unlock()
			return Chunk{}, false
		}
		if len(s.queue) > 0 && s.cause == nil {
			ch := s.queue[0]
			s.queue[0] = Chunk{}
			s.queue = s.queue[1:]
			s.mu.Unlock()
			notify(s.room)
			return ch, true
		}
		cause := s.cause
		k := s.call
		s.mu.Unlock()
		if cause != nil {
			s.awaitAnswer(k)
			s.end()
			return Chunk{}, false
		}
		select {
		case <-s.sig:
		case <-k.done:
			// The reader queued every chunk before the answer; yield those first.
			s.mu.Lock()
			more := len(s.queue) > 0
			s.mu.Unlock()
			if !more {
				s.end()
				return Chunk{}, false
			}
		case <-s.ctx.Done():
			s.setCause(s.ctx.Err())
		}
	}
}

// setCause cuts the stream short: it stops buffering (dropping unread chunks; their text is
// kept), sends $/cancelRequest and wakes both the stream's reader and a blocked push.
func (s *Stream) setCause(err error) {
	s.mu.Lock()
	if s.cause == nil {
		s.cause = err
		s.queue = nil
	}
	s.mu.Unlock()
	notify(s.sig)
	notify(s.room)
	s.sendCancel()
}

// awaitAnswer waits up to the grace period for the answer to a cancelled generation.
func (s *Stream) awaitAnswer(k *call) {
	t := time.NewTimer(s.grace)
	defer t.Stop()
	select {
	case <-k.done:
	case <-t.C:
		if !s.conn.forget(k.id) {
			<-k.done // answered just now
		}
	}
}

// end settles the stream's result or error from the call's answer.
func (s *Stream) end() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ended {
		return
	}
	s.ended = true
	s.queue = nil
	notify(s.room)
	if s.stopAfter != nil {
		s.stopAfter()
		s.stopAfter = nil
	}
	k := s.call
	select {
	case <-k.done:
	default: // the runtime did not answer within the grace period
		s.err = &GenerateError{Text: s.text.String(), Cause: s.cause}
		return
	}
	if k.err == nil {
		var res GenerateResult
		if err := json.Unmarshal(k.result, &res); err != nil {
			s.err = fmt.Errorf("sidecar: could not decode the result of generate: %w", err)
			return
		}
		s.res = &res
		return
	}
	var rpc *RPCError
	if errors.As(k.err, &rpc) {
		var d struct {
			Text         *string `json:"text"`
			Usage        *Usage  `json:"usage"`
			FinishReason string  `json:"finish_reason"`
		}
		_ = rpc.DecodeData(&d)
		if d.Text == nil && s.cause == nil {
			s.err = rpc // refused outright: bad params, unknown model, ...
			return
		}
		ge := &GenerateError{Text: s.text.String(), Usage: d.Usage, FinishReason: d.FinishReason, Cause: s.cause, Err: rpc}
		if d.Text != nil {
			ge.Text = *d.Text
		}
		s.err = ge
		return
	}
	s.err = &GenerateError{Text: s.text.String(), Cause: s.cause, Err: k.err}
}
