// Package workqueue is the keyed work queue of herd's reconcile loops: a key waits at most once,
// one worker at a time holds a key, and a key added while it is being processed is processed again
// afterwards. Failed keys come back after a per-key exponential backoff.
//
// It is the shape of client-go's workqueue, cut down to what herd uses.
package workqueue

import (
	"context"
	"sync"
	"time"
)

// Queue is safe for concurrent use.
type Queue struct {
	mu         sync.Mutex
	cond       *sync.Cond
	order      []string
	dirty      map[string]bool // waiting in order
	processing map[string]bool
	failures   map[string]int
	timers     map[string]*time.Timer
	shutdown   bool

	BaseDelay, MaxDelay time.Duration
}

// New makes an empty queue.
func New() *Queue {
	q := &Queue{
		dirty:      map[string]bool{},
		processing: map[string]bool{},
		failures:   map[string]int{},
		timers:     map[string]*time.Timer{},
		BaseDelay:  200 * time.Millisecond,
		MaxDelay:   30 * time.Second,
	}
	q.cond = sync.NewCond(&q.mu)
	return q
}

// Add enqueues key unless it is already waiting.
func (q *Queue) Add(key string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.addLocked(key)
}

func (q *Queue) addLocked(key string) {
	if q.shutdown || q.dirty[key] {
		return
	}
	q.dirty[key] = true
	if q.processing[key] {
		return // re-queued by Done
	}
	q.order = append(q.order, key)
	q.cond.Signal()
}

// AddAfter enqueues key after d; a later AddAfter for the same key replaces an earlier one.
func (q *Queue) AddAfter(key string, d time.Duration) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.shutdown {
		return
	}
	if t, ok := q.timers[key]; ok {
		t.Stop()
	}
	q.timers[key] = time.AfterFunc(d, func() {
		q.mu.Lock()
		delete(q.timers, key)
		q.addLocked(key)
		q.mu.Unlock()
	})
}

// Retry enqueues key after its backoff, which doubles with each consecutive failure.
func (q *Queue) Retry(key string) time.Duration {
	q.mu.Lock()
	n := q.failures[key]
	q.failures[key] = n + 1
	q.mu.Unlock()
	d := q.BaseDelay << min(n, 16)
	if d > q.MaxDelay || d <= 0 {
		d = q.MaxDelay
	}
	q.AddAfter(key, d)
	return d
}

// Forget clears key's failure count after a success.
func (q *Queue) Forget(key string) {
	q.mu.Lock()
	delete(q.failures, key)
	q.mu.Unlock()
}

// Get blocks until a key is ready or the queue shuts down (ok false).
func (q *Queue) Get() (key string, ok bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for len(q.order) == 0 && !q.shutdown {
		q.cond.Wait()
	}
	if q.shutdown {
		return "", false
	}
	key, q.order = q.order[0], q.order[1:]
	delete(q.dirty, key)
	q.processing[key] = true
	return key, true
}

// Done releases key; if it was added meanwhile it goes back in line.
func (q *Queue) Done(key string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	delete(q.processing, key)
	if q.dirty[key] && !q.shutdown {
		q.order = append(q.order, key)
		q.cond.Signal()
	}
}

// Len is the number of keys waiting.
func (q *Queue) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.order)
}

// ShutDown wakes every Get with ok false and drops pending timers.
func (q *Queue) ShutDown() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.shutdown = true
	for k, t := range q.timers {
		t.Stop()
		delete(q.timers, k)
	}
	q.cond.Broadcast()
}

// Run starts n workers calling syncFn for each key until ctx ends; a sync error retries the key with
// backoff, success forgets its failures. Run returns when every worker has stopped.
func (q *Queue) Run(ctx context.Context, n int, syncFn func(ctx context.Context, key string) error, onErr func(key string, err error, retryIn time.Duration)) {
	var wg sync.WaitGroup
	stop := context.AfterFunc(ctx, q.ShutDown)
	defer stop()
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				key, ok := q.Get()
				if !ok {
					return
				}
				if err := syncFn(ctx, key); err != nil {
					d := q.Retry(key)
					if onErr != nil {
						onErr(key, err, d)
					}
				} else {
					q.Forget(key)
				}
				q.Done(key)
			}
		}()
	}
	wg.Wait()
}
