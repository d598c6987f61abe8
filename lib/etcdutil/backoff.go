package etcdutil

import (
	"context"
	"math/rand/v2"
	"time"
)

// Backoff is capped exponential backoff with full jitter, so that many agents retrying against one
// recovering etcd spread out instead of arriving together.
type Backoff struct {
	Min, Max time.Duration
	n        int
}

// Next returns the next delay and advances.
func (b *Backoff) Next() time.Duration {
	lo, hi := b.Min, b.Max
	if lo <= 0 {
		lo = 100 * time.Millisecond
	}
	if hi < lo {
		hi = 10 * time.Second
	}
	d := lo << min(b.n, 20)
	if d > hi || d <= 0 {
		d = hi
	}
	b.n++
	// Full jitter over [d/2, d).
	return d/2 + rand.N(d/2+1)
}

// Reset starts over after a success.
func (b *Backoff) Reset() { b.n = 0 }

// Wait sleeps for the next delay or until ctx ends; it reports whether ctx is still alive.
func (b *Backoff) Wait(ctx context.Context) bool {
	return Sleep(ctx, b.Next())
}

// Sleep waits d or until ctx ends; it reports whether ctx is still alive.
func Sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
