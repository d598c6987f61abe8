package coordinator

import (
	"testing"
	"time"
)

// Rounds slower than a second move VMs at the rate asked for, not one second's worth per round;
// an idle spell does not bank more than one round's worth.
func TestMoveBudgetFollowsSlowRounds(t *testing.T) {
	start := time.Unix(1_000_000, 0)
	now := start
	b := newMoveBudget(1000, now)
	moved := 0
	const round = 4 * time.Second
	for range 10 {
		n := b.available(now)
		b.spend(now, n)
		moved += n
		now = now.Add(round)
		b.fullRound(round)
	}
	// 10 rounds of 4 s at 1,000/s: the first starts with one second's worth, the others each
	// spend the 4 s that accrued during the round before.
	if want := 1000 + 9*4000; moved != want {
		t.Fatalf("moved %d in %d rounds of %s at 1000/s, want %d", moved, 10, round, want)
	}
	if limit := 1000*now.Sub(start).Seconds() + 4000; float64(moved) > limit {
		t.Fatalf("moved %d in %s: more than the rate allows (%.0f)", moved, now.Sub(start), limit)
	}

	// Quick rounds between full ones make no moves and must not cut what accrued.
	b.fullRound(round)
	now = now.Add(round)
	if n := b.available(now); n != 4000 {
		t.Fatalf("after a %s round: %d available, want 4000", round, n)
	}
	now = now.Add(50 * time.Millisecond)
	if n := b.available(now); n != 4000 {
		t.Fatalf("a quick round later: %d available, want 4000", n)
	}

	// Fast rounds again: an idle minute banks one second's worth, as x/time/rate's limiter did.
	b.spend(now, 4000)
	b.fullRound(20 * time.Millisecond)
	now = now.Add(time.Minute)
	if n := b.available(now); n != 1000 {
		t.Fatalf("after an idle minute with fast rounds: %d available, want 1000", n)
	}

	// A rate under one per second still moves one VM at a time.
	slow := newMoveBudget(0.2, start)
	if n := slow.available(start); n != 1 {
		t.Fatalf("rate 0.2/s: %d available at start, want 1", n)
	}
	slow.spend(start, 1)
	if n := slow.available(start.Add(2 * time.Second)); n != 0 {
		t.Fatalf("rate 0.2/s: %d available 2 s after a move, want 0", n)
	}
	if n := slow.available(start.Add(5 * time.Second)); n != 1 {
		t.Fatalf("rate 0.2/s: %d available 5 s after a move, want 1", n)
	}
}
