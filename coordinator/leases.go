package coordinator

import (
	"context"
	"sync"
	"time"

	"github.com/herdhq/herd/lib/keys"
)

// leaseAsks bounds how many lease questions (TimeToLive) one replica has in flight. Asked one
// after another, 10,000 node leases took a new leader's first round several seconds at 10k
// nodes: the whole failover budget. In parallel, etcd answers them in a fraction of that.
const leaseAsks = 8

// askAll runs ask for every id with at most leaseAsks in flight, and returns when all answered.
func askAll(ids []int64, ask func(int64)) {
	sem := make(chan struct{}, leaseAsks)
	var wg sync.WaitGroup
	for _, id := range ids {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			ask(id)
		}()
	}
	wg.Wait()
}

// unknownTTLs are the leases of node keys whose granted TTL this replica has not asked yet.
func (c *Coordinator) unknownTTLs(nodes []*keys.Record[keys.Node]) []int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []int64
	seen := map[int64]bool{}
	for _, r := range nodes {
		if r.OK() && r.Lease != 0 && !seen[r.Lease] {
			if _, known := c.leaseTTLs[r.Lease]; !known {
				seen[r.Lease] = true
				out = append(out, r.Lease)
			}
		}
	}
	return out
}

// warmLeases asks the granted TTL of every node lease as node keys appear, on every replica: a
// standby that becomes leader then knows them all, and its first round asks etcd nothing it
// could have asked before. A granted TTL never changes, so each lease is asked once.
func (c *Coordinator) warmLeases(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.newLease:
		}
		ids := c.unknownTTLs(c.nodeInf.List())
		askAll(ids, func(id int64) {
			if _, err := c.grantedTTL(ctx, id, "warm"); err != nil && ctx.Err() == nil {
				c.log.Debug("lease check failed; the leader asks again when it needs it", "lease", id, "error", err)
			}
		})
		if len(ids) > 0 {
			// Registrations come in storms: one pass per short while rather than per key.
			select {
			case <-ctx.Done():
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
}
