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

// apply commits a plan's actions, each a transaction guarded by the term's election key and the
// action's own conditions, with bounded parallelism, and says and counts what each committed. A
// conflict is no error: someone changed the object since the snapshot, the watch brings the change
// and the next round decides again. It returns the highest revision written.
func (t *term) apply(acts []decide.Action) (int64, error) {
	var (
		mu        sync.Mutex
		maxRev    int64
		firstErr  error
		notLeader bool
		wg        sync.WaitGroup
		sem       = make(chan struct{}, t.c.cfg.Parallel)
	)
	for i := range acts {
		a := &acts[i]
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
			rev, err := t.txn(a.Conds, a.Writes)
			mu.Lock()
			defer mu.Unlock()
			maxRev = max(maxRev, rev)
			switch {
			case err == nil:
				t.say(a.Notes)
				t.count(a)
			case errors.Is(err, etcdutil.ErrConflict):
				t.c.m.conflicts.Inc()
				t.log.Debug("write conflict", "object", a.Object, "action", a.What)
			case errors.Is(err, etcdutil.ErrNotLeader):
				notLeader = true
			case firstErr == nil:
				firstErr = fmt.Errorf("%s %s: %w", a.What, a.Object, err)
			}
		}()
	}
	wg.Wait()
	if notLeader {
		return maxRev, etcdutil.ErrNotLeader
	}
	return maxRev, firstErr
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

// catchUp waits until the caches that the round's puts landed in reflect them, so the next round
// decides from a view that includes this round's decisions. Only caches with a put are waited for
// (a delete of an absent key makes no event), and Sync lists again rather than wait forever.
func (c *Coordinator) catchUp(ctx context.Context, acts []decide.Action, rev int64) error {
	touched := map[*etcdutil.Informer]bool{}
	for _, a := range acts {
		for _, w := range a.Writes {
			if w.Delete {
				continue
			}
			if inf := c.informerFor(w.Key); inf != nil {
				touched[inf] = true
			}
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
