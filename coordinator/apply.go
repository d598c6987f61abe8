package coordinator

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/coordinator/decide"
	"github.com/herdhq/herd/lib/etcdutil"
)

// Bounds of one batch: etcd refuses a transaction of more than 128 compares or operations
// (--max-txn-ops) and requests over its size limit (herd's etcd: 1 MiB).
const (
	batchOps   = 100
	batchBytes = 256 << 10
)

// batch groups actions that touch no common key (none reads or writes a key another of them reads
// or writes), up to batchOps compares and writes and about batchBytes: committed in one
// transaction, they do exactly what they would one after the other, in one round trip and one raft
// entry instead of one each. An action that deletes a key alone (an assignment: see below) is
// committed alone.
func batch(acts []decide.Action, alone func(key string) bool) [][]*decide.Action {
	var out [][]*decide.Action
	var cur []*decide.Action
	used := map[string]bool{}
	conds, writes, size := 0, 0, 0
	curDeletes := false
	for i := range acts {
		a := &acts[i]
		n := 0
		independent := true
		for _, c := range a.Conds {
			independent = independent && !used[c.Key]
			n += len(c.Key)
		}
		for _, w := range a.Writes {
			independent = independent && !used[w.Key]
			n += len(w.Key) + len(w.Value)
		}
		// Assignment deletions go one action to a transaction: an agent that sees many of its
		// assignments vanish in one revision takes it for lost data and holds its removals
		// (agent/evidence.go). Other deletions batch: every placement deletes the VM's problem
		// record, and isolating those made every placement a transaction of its own.
		deletes := false
		for _, w := range a.Writes {
			deletes = deletes || (w.Delete && alone(w.Key))
		}
		if len(cur) > 0 && (deletes || curDeletes || !independent || conds+len(a.Conds) > batchOps || writes+len(a.Writes) > batchOps || size+n > batchBytes) {
			out = append(out, cur)
			cur, used, conds, writes, size = nil, map[string]bool{}, 0, 0, 0
		}
		cur, curDeletes = append(cur, a), deletes
		for _, c := range a.Conds {
			used[c.Key] = true
		}
		for _, w := range a.Writes {
			used[w.Key] = true
		}
		conds, writes, size = conds+len(a.Conds), writes+len(a.Writes), size+n
	}
	if len(cur) > 0 {
		out = append(out, cur)
	}
	return out
}

// apply commits a plan's actions, batched (see batch), each batch a transaction guarded by the
// term's election key and its actions' own conditions, with bounded parallelism, and says and
// counts what each committed. A batch whose conditions do not all hold is retried one action at a
// time, so that one stale action does not hold back the others. A conflict is no error: someone
// changed the object since the snapshot, the watch brings the change and the next round decides
// again. It returns the highest revision written.
func (t *term) apply(acts []decide.Action) (int64, error) {
	var (
		mu        sync.Mutex
		maxRev    int64
		firstErr  error
		notLeader bool
		wg        sync.WaitGroup
		sem       = make(chan struct{}, t.c.cfg.Parallel)
	)
	// commit applies one batch and reports, under mu, whether to go on.
	commit := func(b []*decide.Action) {
		var conds []decide.Cond
		var writes []decide.Write
		for _, a := range b {
			conds, writes = append(conds, a.Conds...), append(writes, a.Writes...)
		}
		rev, err := t.txn(conds, writes)
		if len(b) > 1 && errors.Is(err, etcdutil.ErrConflict) {
			t.c.m.batchRetries.Inc()
			for _, a := range b {
				rev, err := t.txn(a.Conds, a.Writes)
				if !t.committed(&mu, a, rev, err, &maxRev, &firstErr, &notLeader) {
					return
				}
			}
			return
		}
		for _, a := range b {
			if !t.committed(&mu, a, rev, err, &maxRev, &firstErr, &notLeader) {
				return
			}
		}
	}
	assign := t.c.space.AssignRoot()
	for _, b := range batch(acts, func(key string) bool { return strings.HasPrefix(key, assign) }) {
		sem <- struct{}{}
		mu.Lock()
		stop := notLeader
		mu.Unlock()
		if stop || t.ctx.Err() != nil {
			<-sem
			break
		}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			commit(b)
		}()
	}
	wg.Wait()
	if notLeader {
		return maxRev, etcdutil.ErrNotLeader
	}
	return maxRev, firstErr
}

// committed records the outcome of action a's transaction (rev, err) and says whether the
// actions after it should still be tried (not when this replica no longer leads).
func (t *term) committed(mu *sync.Mutex, a *decide.Action, rev int64, err error, maxRev *int64, firstErr *error, notLeader *bool) bool {
	mu.Lock()
	defer mu.Unlock()
	*maxRev = max(*maxRev, rev)
	switch {
	case err == nil:
		t.say(a.Notes)
		t.count(a)
	case errors.Is(err, etcdutil.ErrConflict):
		t.c.m.conflicts.Inc()
		t.log.Debug("write conflict", "object", a.Object, "action", a.What)
	case errors.Is(err, etcdutil.ErrNotLeader):
		*notLeader = true
		return false
	case *firstErr == nil:
		*firstErr = fmt.Errorf("%s %s: %w", a.What, a.Object, err)
	}
	return true
}

// txn commits writes if every condition holds, under the term's guard.
func (t *term) txn(conds []decide.Cond, writes []decide.Write) (int64, error) {
	cmps := make([]clientv3.Cmp, len(conds))
	for i, c := range conds {
		if c.Create {
			cmps[i] = etcdutil.CreateRev(c.Key, c.Rev)
		} else {
			cmps[i] = etcdutil.ModRev(c.Key, c.Rev)
		}
	}
	ops := make([]clientv3.Op, len(writes))
	for i, w := range writes {
		if w.Delete {
			ops[i] = clientv3.OpDelete(w.Key)
		} else {
			ops[i] = clientv3.OpPut(w.Key, w.Value)
		}
	}
	return etcdutil.GuardedTxn(t.ctx, t.c.cfg.Client, t.guard, cmps, ops)
}

// say logs notes and records their events.
func (t *term) say(notes []decide.Note) {
	for _, n := range notes {
		if n.Log != "" {
			switch n.Level {
			case decide.Error:
				t.log.Error(n.Log, n.Args...)
			case decide.Warn:
				t.log.Warn(n.Log, n.Args...)
			default:
				t.log.Info(n.Log, n.Args...)
			}
		}
		if n.Event != "" {
			t.c.events.Record(n.Object, n.Event, "%s", n.Message)
		}
	}
}

// count counts what a committed action did.
func (t *term) count(a *decide.Action) {
	m := t.c.m
	took := func(h interface{ Observe(float64) }) {
		if !a.Since.IsZero() {
			h.Observe(time.Since(a.Since).Seconds())
		}
	}
	for _, metric := range a.Metrics {
		switch metric {
		case decide.MetricPlacement:
			m.placements.Inc()
			took(m.placementSeconds)
		case decide.MetricMove:
			m.moves.Inc()
		case decide.MetricNodeLost:
			m.nodesLost.Inc()
		case decide.MetricMigrationStarted:
			m.migrations.WithLabelValues("started").Inc()
		case decide.MetricMigrationDone:
			m.migrations.WithLabelValues("done").Inc()
			took(m.migrationSeconds)
		case decide.MetricMigrationFailed:
			m.migrations.WithLabelValues("failed").Inc()
		}
	}
}

// catchUp waits until the caches that the round's writes landed in reflect them, so the next
// round decides from a view that includes this round's decisions. A delete is waited for only when
// the cache holds the key (a delete of an absent key makes no event to wait for); skipping them
// all let the round after a placement see the VM placed with its old problem still there, and
// clear it again, refused by etcd. Sync lists again rather than wait forever.
func (c *Coordinator) catchUp(ctx context.Context, acts []decide.Action, rev int64) error {
	touched := map[*etcdutil.Informer]bool{}
	for _, a := range acts {
		for _, w := range a.Writes {
			inf := c.informerFor(w.Key)
			if inf == nil || (w.Delete && inf.Get(w.Key) == nil) {
				continue
			}
			touched[inf] = true
		}
	}
	infs := make([]*etcdutil.Informer, 0, len(touched))
	for inf := range touched {
		infs = append(infs, inf)
	}
	return syncAll(ctx, infs, rev)
}

// informerFor returns the cache a key belongs to.
func (c *Coordinator) informerFor(key string) *etcdutil.Informer {
	for _, inf := range c.informers() {
		if strings.HasPrefix(key, inf.Prefix()) {
			return inf
		}
	}
	return nil
}
