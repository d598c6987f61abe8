package coordinator

import "time"

// moveBudget is the reschedule rate (VM moves off fenced nodes per second) as a token bucket over
// wall time, for rounds that may each take longer than a second.
//
// The bucket holds up to the rate times the longer of one second and the last full round's length
// (moves happen only in full rounds). x/time/rate's limiter, used before, held one second's worth:
// at 10,000 nodes on two cores a full round takes several seconds, so every round forfeited all
// but one second of what had accrued while it ran, and 10,000 VMs off 1,000 fenced nodes moved at
// a fraction of the rate asked for. Over any stretch of time the moves stay within the rate, plus
// one round's worth.
type moveBudget struct {
	rate   float64 // moves per second
	tokens float64
	last   time.Time     // tokens is as of last
	hold   time.Duration // how much time's worth the bucket holds
}

func newMoveBudget(rate float64, now time.Time) *moveBudget {
	return &moveBudget{rate: rate, tokens: max(1, rate), last: now, hold: time.Second}
}

func (b *moveBudget) advance(now time.Time) {
	if now.After(b.last) {
		b.tokens = min(b.tokens+b.rate*now.Sub(b.last).Seconds(), max(1, b.rate*b.hold.Seconds()))
		b.last = now
	}
}

// available says how many moves a round deciding at now may make.
func (b *moveBudget) available(now time.Time) int {
	b.advance(now)
	return int(b.tokens)
}

// spend takes n moves a round made.
func (b *moveBudget) spend(now time.Time, n int) {
	b.advance(now)
	b.tokens -= float64(n)
}

// fullRound records how long a full round took: the next may spend what accrued meanwhile.
func (b *moveBudget) fullRound(took time.Duration) {
	b.hold = max(time.Second, took)
}
