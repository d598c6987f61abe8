package coordinator

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/events"
	"github.com/herdhq/herd/lib/keys"
)

// The audit trail's rules, which etcd's RBAC cannot express: every record hangs on a lease of at
// most events.Retention (so it goes by itself), is at most events.MaxBytes, and one writer keeps at
// most events.MaxPerWriter. RBAC already confines each writer to its own prefix; the leader removes
// what breaks the rest, so that a compromised node cannot fill etcd's quota through the audit trail.

// eventJanitorInterval is the longest time between two sweeps; a new record also wakes one.
const eventJanitorInterval = time.Minute

// leaseSlack is what a writer's lease may exceed Retention by (clock and rounding).
const leaseSlack = time.Hour

func (c *Coordinator) onEvent(_ string, _, cur *etcdutil.KV) {
	if cur == nil {
		return
	}
	select {
	case c.sweepNow <- struct{}{}:
	default:
	}
}

// eventJanitor sweeps the audit trail until the term ends.
func (c *Coordinator) eventJanitor(ctx context.Context, g etcdutil.Guard) {
	t := time.NewTicker(eventJanitorInterval)
	defer t.Stop()
	for {
		if err := c.sweepEvents(ctx, g); err != nil && ctx.Err() == nil {
			c.log.Warn("event sweep failed", "error", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-c.sweepNow:
			// Coalesce a burst of records into one sweep.
			if !etcdutil.Sleep(ctx, time.Second) {
				return
			}
		}
	}
}

// junkEvents decides which records of the audit trail break its rules, and why. ttl returns a
// lease's granted TTL (ok false when it cannot be told now: the record is then left alone).
func junkEvents(space keys.Space, kvs []*etcdutil.KV, ttl func(lease int64) (time.Duration, bool)) map[string]string {
	junk := map[string]string{}
	byWriter := map[keys.EventWriter][]*etcdutil.KV{}
	for _, kv := range kvs {
		w, _, ok := space.ParseEvent(kv.Key)
		if !ok {
			if rest := strings.TrimPrefix(kv.Key, space.EventPrefix()); kv.Lease != 0 && !strings.Contains(rest, "/") {
				continue // a record of the schema-1 layout: it expires by itself
			}
			junk[kv.Key] = "not an event key (/herd/events/<writer>/<time>-<id>)"
			continue
		}
		switch {
		case kv.Lease == 0:
			junk[kv.Key] = "written without a lease"
			continue
		case kv.Size > events.MaxBytes:
			junk[kv.Key] = fmt.Sprintf("larger than %d bytes", events.MaxBytes)
			continue
		}
		if d, ok := ttl(kv.Lease); ok && d > events.Retention+leaseSlack {
			junk[kv.Key] = fmt.Sprintf("its lease lives %s, longer than the %s records are kept", d, events.Retention)
			continue
		}
		byWriter[w] = append(byWriter[w], kv)
	}
	for w, list := range byWriter {
		if len(list) <= events.MaxPerWriter {
			continue
		}
		// Within one writer's prefix, keys sort by time: the oldest go.
		sort.Slice(list, func(i, j int) bool { return list[i].Key < list[j].Key })
		for _, kv := range list[:len(list)-events.MaxPerWriter] {
			junk[kv.Key] = fmt.Sprintf("%s keeps more than %d records", w, events.MaxPerWriter)
		}
	}
	return junk
}

func (c *Coordinator) sweepEvents(ctx context.Context, g etcdutil.Guard) error {
	kvs := c.eventInf.List()
	rev := map[string]int64{}
	for _, kv := range kvs {
		rev[kv.Key] = kv.ModRevision
	}
	junk := junkEvents(c.space, kvs, func(lease int64) (time.Duration, bool) {
		d, err := c.grantedTTL(ctx, lease)
		return d, err == nil
	})
	if len(junk) == 0 {
		return nil
	}
	names := make([]string, 0, len(junk))
	for k := range junk {
		names = append(names, k)
	}
	sort.Strings(names)
	counts := map[string]int{}
	const batch = 64
	for len(names) > 0 {
		n := min(batch, len(names))
		var conds []etcdutil.Cmp
		var ops []etcdutil.Op
		for _, k := range names[:n] {
			conds = append(conds, etcdutil.ModRev(k, rev[k]))
			ops = append(ops, etcdutil.OpDelete(k))
		}
		if _, err := etcdutil.GuardedTxn(ctx, c.cfg.Client, g, conds, ops); err != nil {
			return err
		}
		for _, k := range names[:n] {
			w := strings.TrimPrefix(k, c.space.EventPrefix())
			if i := strings.LastIndexByte(w, '/'); i > 0 {
				w = w[:i]
			}
			counts[w+": "+junk[k]]++
		}
		names = names[n:]
	}
	for what, n := range counts {
		c.log.Warn("removed event records that break the audit trail's rules", "records", n, "what", what)
		c.events.Record("cluster", "events-removed", "%d records of %s", n, what)
	}
	return nil
}

// grantedTTL is how long a lease was granted for, asked of etcd once per lease.
func (c *Coordinator) grantedTTL(ctx context.Context, lease int64) (time.Duration, error) {
	c.mu.Lock()
	ttl, known := c.leaseTTLs[lease]
	c.mu.Unlock()
	if !known {
		cctx, cancel := etcdutil.WithTimeout(ctx)
		resp, err := c.cfg.Client.TimeToLive(cctx, clientv3.LeaseID(lease))
		cancel()
		if err != nil {
			return 0, err
		}
		ttl = resp.GrantedTTL
		c.mu.Lock()
		c.leaseTTLs[lease] = ttl
		c.mu.Unlock()
	}
	return time.Duration(ttl) * time.Second, nil
}
