package sidecar

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// Sentinel errors. Test for them with errors.Is.
var (
	// ErrClosed is returned by calls made after Close began, and wrapped by the errors of calls
	// that Close ended.
	ErrClosed = errors.New("sidecar: client closed")

	// ErrProcessExited is wrapped by every *ExitError: the runtime process is gone.
	ErrProcessExited = errors.New("sidecar: runtime process exited")

	// ErrTooManyCrashes is wrapped (together with the last *ExitError) by every call once the
	// restart policy has given up.
	ErrTooManyCrashes = errors.New("sidecar: runtime crashed too often; not restarting it")

	// ErrStreamStalled is the cause of the *GenerateError of a stream that was cancelled
	// because its reader took no chunk within Options.StallTimeout while its buffer was full.
	ErrStreamStalled = errors.New("sidecar: stream cancelled: its reader took no chunk within the stall timeout")

	// ErrRuntimeNotFound is returned by DefaultCommand (and so by Start) when no runtime can be
	// found to run.
	ErrRuntimeNotFound = errors.New("sidecar: runtime not found")
)

// Error codes of the protocol (protocol/protocol.json, "errors").
const (
	CodeParseError       = -32700
	CodeInvalidRequest   = -32600
	CodeMethodNotFound   = -32601
	CodeInvalidParams    = -32602
	CodeInternalError    = -32603
	CodeCancelled        = -32800
	CodeModelNotFound    = -32000
	CodeModelLoadFailed  = -32001
	CodeOverloaded       = -32003
	CodeGenerationFailed = -32004
	CodeModelUnloaded    = -32005
)

// CodeContextLengthExceeded is no longer sent: a prompt longer than the model's context (or the
// runtime's --max-context) is CodeInvalidParams with Type() "context_length_exceeded".
//
// Deprecated: check CodeInvalidParams and Type() == "context_length_exceeded".
const CodeContextLengthExceeded = -32002

// RPCError is an error answered by the runtime: a JSON-RPC error object.
type RPCError struct {
	// Code is one of the Code constants.
	Code int `json:"code"`
	// Message is meant for people.
	Message string `json:"message"`
	// Data is the error's data object, as sent: {"type": ..., ...}. Type and Path read the
	// common members; DecodeData decodes the rest.
	Data json.RawMessage `json:"data,omitempty"`
}

type errorData struct {
	Type string `json:"type"`
	Path string `json:"path"`
}

func (e *RPCError) data() errorData {
	var d errorData
	if len(e.Data) > 0 {
		_ = json.Unmarshal(e.Data, &d)
	}
	return d
}

// Type is data.type: a machine-readable kind such as "invalid_params", "model_not_found",
// "cancelled", "model_path_not_found" or "shutting_down". Empty when the runtime sent none.
func (e *RPCError) Type() string { return e.data().Type }

// Path is data.path: for CodeInvalidParams, the JSON Pointer of the field that was refused.
func (e *RPCError) Path() string { return e.data().Path }

// DecodeData decodes the error's data object into v.
func (e *RPCError) DecodeData(v any) error {
	if len(e.Data) == 0 {
		return errors.New("sidecar: error has no data")
	}
	return json.Unmarshal(e.Data, v)
}

// Error formats the error with its code, data.type and data.path.
func (e *RPCError) Error() string {
	d := e.data()
	var b strings.Builder
	b.WriteString("sidecar: ")
	b.WriteString(e.Message)
	fmt.Fprintf(&b, " (code %d", e.Code)
	if d.Type != "" {
		b.WriteString(", ")
		b.WriteString(d.Type)
	}
	if d.Path != "" {
		b.WriteString(" at ")
		b.WriteString(d.Path)
	}
	b.WriteString(")")
	return b.String()
}

// ExitError reports that the runtime process ended (or could not be started and answer
// initialize). It wraps ErrProcessExited and, when there is one, the underlying error.
type ExitError struct {
	// Code is the exit status, or -1 when the process was killed by a signal.
	Code int
	// Signal names the signal that killed the process ("killed", "terminated"), or is empty.
	Signal string
	// Stderr holds the last bytes the process wrote to stderr (see Options.StderrTailBytes).
	Stderr string
	// Err is what ended the process, when known: the *exec.ExitError from waiting on it, or the
	// protocol error that made the client kill it.
	Err error
}

// Error formats the exit status or signal and the last lines of stderr.
func (e *ExitError) Error() string {
	var b strings.Builder
	b.WriteString("sidecar: runtime process exited")
	if e.Signal != "" {
		fmt.Fprintf(&b, " (signal: %s)", e.Signal)
	} else {
		fmt.Fprintf(&b, " (status %d)", e.Code)
	}
	if e.Err != nil && !isPlainExit(e.Err) {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	if tail := lastLines(e.Stderr, 6, 800); tail != "" {
		b.WriteString("; stderr tail:\n")
		b.WriteString(tail)
	}
	return b.String()
}

// Unwrap lets errors.Is find ErrProcessExited and errors.As find the underlying error.
func (e *ExitError) Unwrap() []error {
	if e.Err == nil {
		return []error{ErrProcessExited}
	}
	return []error{ErrProcessExited, e.Err}
}

// GenerateError reports a generation that ended without a result: cancelled (by the context,
// Stream.Cancel or breaking out of Stream.Chunks), its model unloaded, the engine failing, or
// the process dying. It carries what was generated until then.
type GenerateError struct {
	// Text is the text generated so far: the runtime's data.text when it answered, otherwise
	// the text of the chunks received.
	Text string
	// Usage counts the tokens so far; nil when the runtime's answer did not carry it.
	Usage *Usage
	// FinishReason is data.finish_reason ("cancelled", "model_unloaded", ...) when the runtime
	// answered; empty otherwise.
	FinishReason string
	// Cause is why the client cut the stream short: the context's error (context.Canceled or
	// context.DeadlineExceeded; Stream.Cancel is context.Canceled), ErrClosed when Close
	// cancelled it, ErrStreamStalled when its reader fell behind for Options.StallTimeout;
	// nil when the runtime ended it on its own.
	Cause error
	// Err is the runtime's answer (*RPCError) or the reason no answer came (*ExitError,
	// ErrClosed); nil when the runtime did not answer within Options.CancelGrace.
	Err error
}

// Error formats the finish reason, the tokens generated and the cause.
func (e *GenerateError) Error() string {
	var b strings.Builder
	b.WriteString("sidecar: generate ended early")
	if e.FinishReason != "" {
		fmt.Fprintf(&b, " (%s)", e.FinishReason)
	}
	if e.Usage != nil {
		fmt.Fprintf(&b, " after %d tokens", e.Usage.CompletionTokens)
	}
	if e.Cause != nil {
		b.WriteString(": ")
		b.WriteString(e.Cause.Error())
	}
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

// Unwrap returns Cause and Err, so that errors.Is(err, context.Canceled) and
// errors.As(err, &rpcErr) both work.
func (e *GenerateError) Unwrap() []error {
	var errs []error
	if e.Cause != nil {
		errs = append(errs, e.Cause)
	}
	if e.Err != nil {
		errs = append(errs, e.Err)
	}
	return errs
}

// lastLines returns at most n trailing lines of s, and at most max bytes of them.
func lastLines(s string, n, max int) string {
	s = strings.TrimRight(s, "\r\n\t ")
	if len(s) > max {
		s = s[len(s)-max:]
		if i := strings.IndexByte(s, '\n'); i >= 0 && i < len(s)-1 {
			s = s[i+1:]
		}
	}
	for i, count := len(s)-1, 0; i >= 0; i-- {
		if s[i] == '\n' {
			count++
			if count == n {
				return s[i+1:]
			}
		}
	}
	return s
}
