package coordinator

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

// ttlCache remembers leases' granted TTLs, each asked of etcd once (a granted TTL never changes).
// The rounds keep one for node leases, the event janitor one for the audit trail's: sharing one,
// each pruned the other's entries and both were asked again and again.
type ttlCache struct {
	client *clientv3.Client
	max    int // past it the cache starts over (0: no bound)

	mu sync.Mutex
	m  map[int64]time.Duration
}

func newTTLCache(client *clientv3.Client, max int) *ttlCache {
	return &ttlCache{client: client, max: max, m: map[int64]time.Duration{}}
}

// known returns a lease's TTL if it was asked already.
func (c *ttlCache) known(lease int64) (time.Duration, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	d, ok := c.m[lease]
	return d, ok
}

// get returns a lease's granted TTL, asking etcd the first time (counted in asked).
func (c *ttlCache) get(ctx context.Context, lease int64, asked prometheus.Counter) (time.Duration, error) {
	if d, ok := c.known(lease); ok {
		return d, nil
	}
	asked.Inc()
	cctx, cancel := etcdutil.WithTimeout(ctx)
	resp, err := c.client.TimeToLive(cctx, clientv3.LeaseID(lease))
	cancel()
	if err != nil {
		return 0, fmt.Errorf("lease %x: %w", lease, err)
	}
	d := time.Duration(resp.GrantedTTL) * time.Second
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.max > 0 && len(c.m) >= c.max {
		c.m = map[int64]time.Duration{}
	}
	c.m[lease] = d
	return d, nil
}

// keepOnly forgets every lease but keep's when more than limit are remembered.
func (c *ttlCache) keepOnly(keep map[int64]time.Duration, limit int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) > limit {
		c.m = make(map[int64]time.Duration, len(keep))
		for id, d := range keep {
			c.m[id] = d
		}
	}
}

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
	var out []int64
	seen := map[int64]bool{}
	for _, r := range nodes {
		if r.OK() && r.Lease != 0 && !seen[r.Lease] {
			if _, known := c.nodeTTLs.known(r.Lease); !known {
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
			if _, err := c.nodeTTLs.get(ctx, id, c.m.leaseQuestions.WithLabelValues("warm")); err != nil && ctx.Err() == nil {
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
