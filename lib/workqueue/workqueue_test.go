package workqueue

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestDedupAndRequeueWhileProcessing(t *testing.T) {
	q := New()
	q.Add("a")
	q.Add("a")
	q.Add("b")
	if q.Len() != 2 {
		t.Fatalf("len %d, want 2", q.Len())
	}
	k, _ := q.Get()
	if k != "a" {
		t.Fatal(k)
	}
	q.Add("a") // while processing: must come back after Done, not be handed to another worker
	k2, _ := q.Get()
	if k2 != "b" {
		t.Fatalf("a key under processing was handed out twice: %s", k2)
	}
	q.Done("b")
	if q.Len() != 0 {
		t.Fatal("a must wait for Done")
	}
	q.Done("a")
	if k, _ := q.Get(); k != "a" {
		t.Fatal(k)
	}
}

func TestRunRetriesWithBackoffAndNeverOverlapsAKey(t *testing.T) {
	q := New()
	q.BaseDelay = time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	var mu sync.Mutex
	inFlight := map[string]bool{}
	var calls, overlaps atomic.Int32
	done := make(chan struct{})
	go func() {
		q.Run(ctx, 4, func(ctx context.Context, key string) error {
			mu.Lock()
			if inFlight[key] {
				overlaps.Add(1)
			}
			inFlight[key] = true
			mu.Unlock()
			time.Sleep(time.Millisecond)
			mu.Lock()
			inFlight[key] = false
			mu.Unlock()
			if calls.Add(1) < 5 {
				q.Add(key)
				return errors.New("not yet")
			}
			return nil
		}, nil)
		close(done)
	}()
	q.Add("k")
	deadline := time.Now().Add(10 * time.Second)
	for calls.Load() < 5 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	cancel()
	<-done
	if calls.Load() < 5 {
		t.Fatalf("retries did not happen: %d calls", calls.Load())
	}
	if overlaps.Load() != 0 {
		t.Fatalf("a key was processed by two workers at once")
	}
}
