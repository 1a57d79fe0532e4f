package sidecar

import "sync"

// events runs the host's callbacks (Options.OnProgress, Options.OnStderr) in order on one
// goroutine, so that a slow callback never stalls reading the runtime's output and a
// callback may call the client.
type events struct {
	mu   sync.Mutex
	q    []func()
	sig  chan struct{}
	quit chan struct{}
	done chan struct{}
}

func newEvents() *events {
	e := &events{sig: make(chan struct{}, 1), quit: make(chan struct{}), done: make(chan struct{})}
	go e.run()
	return e
}

func (e *events) push(f func()) {
	e.mu.Lock()
	e.q = append(e.q, f)
	e.mu.Unlock()
	select {
	case e.sig <- struct{}{}:
	default:
	}
}

func (e *events) run() {
	defer close(e.done)
	for {
		select {
		case <-e.sig:
			e.drain()
		case <-e.quit:
			e.drain()
			return
		}
	}
}

func (e *events) drain() {
	for {
		e.mu.Lock()
		q := e.q
		e.q = nil
		e.mu.Unlock()
		if len(q) == 0 {
			return
		}
		for _, f := range q {
			f()
		}
	}
}

// stop runs what is queued and ends the goroutine.
func (e *events) stop() {
	close(e.quit)
	<-e.done
}
