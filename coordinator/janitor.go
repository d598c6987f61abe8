package coordinator

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/events"
	"github.com/herdhq/herd/lib/keys"
)

// The audit trail's rules, which etcd's RBAC cannot express: every record hangs on a lease of at
// most events.Retention (so it goes by itself), is at most events.MaxBytes, and one writer keeps at
// most events.MaxPerWriter. RBAC already confines each writer to its own prefix; the leader removes
// what breaks the rest, so that a compromised node cannot fill etcd's quota through the audit trail.
//
// Only the leader watches the audit trail, for as long as its term lasts: each new record is
// checked once, when it arrives, and a writer past its cap is trimmed.

// leaseSlack is what a writer's lease may exceed Retention by (clock and rounding).
const leaseSlack = time.Hour

// janitor is one term's watch over the audit trail.
type janitor struct {
	c   *Coordinator
	g   etcdutil.Guard
	inf *etcdutil.Informer

	mu      sync.Mutex
	pending map[string]bool           // keys to check
	count   map[keys.EventWriter]int  // records per writer
	over    map[keys.EventWriter]bool // writers past their cap
	wake    chan struct{}

	// ttls are the granted TTLs of the records' leases: every writer shares a lease per
	// rotation, so at 10,000 nodes there are tens of thousands.
	ttls *ttlCache
}

// maxEventLeases bounds the janitor's lease memory; past it, it starts over.
const maxEventLeases = 200000

// runEventJanitor watches the audit trail and removes what breaks its rules until ctx (the term)
// ends.
func (c *Coordinator) runEventJanitor(ctx context.Context, g etcdutil.Guard) {
	j := &janitor{c: c, g: g, pending: map[string]bool{}, count: map[keys.EventWriter]int{}, ttls: newTTLCache(c.cfg.Client, maxEventLeases),
		over: map[keys.EventWriter]bool{}, wake: make(chan struct{}, 1)}
	j.inf = etcdutil.NewInformer(c.cfg.Client, c.space.EventPrefix(), nil, j.onEvent, c.log)
	j.inf.DropValues = true // sizes and leases are all the rules need
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); j.inf.Run(ctx) }()
	defer wg.Wait()
	for {
		select {
		case <-ctx.Done():
			return
		case <-j.wake:
		}
		// Coalesce a burst of records into one pass.
		if !etcdutil.Sleep(ctx, time.Second) {
			return
		}
		if err := j.sweep(ctx); err != nil && ctx.Err() == nil {
			c.log.Warn("event sweep failed; retrying", "error", err)
			j.poke()
		}
	}
}

func (j *janitor) poke() {
	select {
	case j.wake <- struct{}{}:
	default:
	}
}

// onEvent only notes the key: the informer's goroutine must not block.
func (j *janitor) onEvent(key string, prev, cur *etcdutil.KV) {
	w, _, ok := j.c.space.ParseEvent(key)
	j.mu.Lock()
	defer j.mu.Unlock()
	switch {
	case cur == nil && prev != nil && ok:
		j.count[w]--
		return
	case cur == nil:
		return
	case prev == nil && ok:
		j.count[w]++
		if j.count[w] > events.MaxPerWriter {
			j.over[w] = true
		}
	}
	j.pending[key] = true
	j.poke()
}

// sweep checks the records noted since the last pass, trims writers past their cap, and deletes
// what breaks the rules, with one event per kind of breach.
func (j *janitor) sweep(ctx context.Context) error {
	j.mu.Lock()
	keysToCheck := make([]*etcdutil.KV, 0, len(j.pending))
	for k := range j.pending {
		if kv := j.inf.Get(k); kv != nil {
			keysToCheck = append(keysToCheck, kv)
		}
	}
	j.pending = map[string]bool{}
	over := j.over
	j.over = map[keys.EventWriter]bool{}
	j.mu.Unlock()
	asked := j.c.m.leaseQuestions.WithLabelValues("events")
	junk := junkEvents(j.c.space, keysToCheck, func(lease int64) (time.Duration, bool) {
		d, err := j.ttls.get(ctx, lease, asked)
		return d, err == nil
	})
	if len(over) > 0 {
		byWriter := map[keys.EventWriter][]*etcdutil.KV{}
		for _, kv := range j.inf.List() {
			if w, _, ok := j.c.space.ParseEvent(kv.Key); ok && over[w] {
				byWriter[w] = append(byWriter[w], kv)
			}
		}
		for w, list := range byWriter {
			for k, why := range trimWriter(w, list) {
				junk[k] = why
			}
		}
	}
	return j.remove(ctx, junk)
}

// junkEvents decides which records break the audit trail's rules, and why. ttl returns a lease's
// granted TTL (ok false when it cannot be told now: the record is then left alone).
func junkEvents(space keys.Space, kvs []*etcdutil.KV, ttl func(lease int64) (time.Duration, bool)) map[string]string {
	junk := map[string]string{}
	for _, kv := range kvs {
		if _, _, ok := space.ParseEvent(kv.Key); !ok {
			if rest := strings.TrimPrefix(kv.Key, space.EventPrefix()); kv.Lease != 0 && !strings.Contains(rest, "/") {
				continue // a record of the schema-1 layout: it expires by itself
			}
			junk[kv.Key] = "not an event key (/herd/events/<writer>/<time>-<id>)"
			continue
		}
		switch {
		case kv.Lease == 0:
			junk[kv.Key] = "written without a lease"
		case kv.Size > events.MaxBytes:
			junk[kv.Key] = fmt.Sprintf("larger than %d bytes", events.MaxBytes)
		default:
			if d, ok := ttl(kv.Lease); ok && d > events.Retention+leaseSlack {
				junk[kv.Key] = fmt.Sprintf("its lease lives %s, longer than the %s records are kept", d, events.Retention)
			}
		}
	}
	return junk
}

// trimWriter picks the oldest records of a writer past its cap.
func trimWriter(w keys.EventWriter, list []*etcdutil.KV) map[string]string {
	junk := map[string]string{}
	if len(list) <= events.MaxPerWriter {
		return junk
	}
	// Within one writer's prefix, keys sort by time.
	sort.Slice(list, func(i, k int) bool { return list[i].Key < list[k].Key })
	for _, kv := range list[:len(list)-events.MaxPerWriter] {
		junk[kv.Key] = fmt.Sprintf("%s keeps more than %d records", w, events.MaxPerWriter)
	}
	return junk
}

// remove deletes junk records (each as it was read), in batches, and records what went.
func (j *janitor) remove(ctx context.Context, junk map[string]string) error {
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
			var rev int64
			if kv := j.inf.Get(k); kv != nil {
				rev = kv.ModRevision
			}
			conds = append(conds, etcdutil.ModRev(k, rev))
			ops = append(ops, etcdutil.OpDelete(k))
		}
		if _, err := etcdutil.GuardedTxn(ctx, j.c.cfg.Client, j.g, conds, ops); err != nil {
			return err
		}
		for _, k := range names[:n] {
			w := strings.TrimPrefix(k, j.c.space.EventPrefix())
			if i := strings.LastIndexByte(w, '/'); i > 0 {
				w = w[:i]
			}
			counts[w+": "+junk[k]]++
		}
		names = names[n:]
	}
	for what, n := range counts {
		j.c.log.Warn("removed event records that break the audit trail's rules", "records", n, "what", what)
		j.c.events.Record("cluster", "events-removed", "%d records of %s", n, what)
	}
	return nil
}
