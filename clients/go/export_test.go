package sidecar

// Test-only views of a Stream's buffer, for the backpressure tests.

// Buffered is how many chunks the stream holds that its reader has not taken.
func (s *Stream) Buffered() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.queue)
}

// HighWater is the most chunks the stream has held at once.
func (s *Stream) HighWater() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.highWater
}

// Answered reports whether the runtime has answered the generation (or the process died).
func (s *Stream) Answered() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.responded
}
