package coordinator

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/herdhq/herd/coordinator/decide"
	"github.com/herdhq/herd/coordinator/schema"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

// A term is one leadership term. Everything the leader remembers between rounds (grace periods,
// losses in the mass-failure window, migration backoffs), everything it starts (fencers, disk
// work, the audit-trail janitor, the revocation loop) and the rate limit of moves belong to it:
// made when the election is won, torn down when the term ends. A replica that loses and wins
// again starts from etcd's state alone, as any other replica would.
//
// Each round is: observe (the caches and a few lease questions), decide (decide.Decide, pure),
// apply (the plan's guarded writes, then its side work into the term's queues), catch up (the
// caches reflect the round's own writes before the next round decides).
type term struct {
	c     *Coordinator
	ctx   context.Context
	stop  context.CancelFunc
	guard etcdutil.Guard
	log   hclog.Logger
	cfg   decide.Config
	state *decide.State
	// base is the last full round's snapshot (and its judgement of the nodes): quick rounds take
	// its view of the nodes.
	base  *decide.Snapshot
	moves *moveBudget
	side  *sideWork
	wg    sync.WaitGroup
}

// abandonAfter bounds how long a term's end waits for its goroutines: side work that ignores its
// cancelled context (a fencer stuck in a syscall) is left to finish alone. It can write nothing:
// every write it would make is guarded by the ended term's election key.
const abandonAfter = 10 * time.Second

func (c *Coordinator) newTerm(ctx context.Context, g etcdutil.Guard) *term {
	ctx, stop := context.WithCancel(ctx)
	t := &term{c: c, ctx: ctx, stop: stop, guard: g, log: c.log.With("term", g.Rev), state: decide.NewState(),
		moves: newMoveBudget(c.cfg.RescheduleRate, time.Now())}
	t.cfg = decide.Config{
		Space: c.space, Name: c.cfg.Name, Term: g.Rev, Pools: c.cfg.Pools, Scheduler: c.cfg.Scheduler,
		Grace: c.cfg.Grace, MassFailureFraction: c.cfg.MassFailureFraction, MassFailureMin: c.cfg.MassFailureMin,
		MassFailureWindow: c.cfg.MassFailureWindow, FencerName: c.cfg.Fencer.Name(),
		MaxMigrationsPerNode: c.cfg.MaxMigrationsPerNode, ManagedDisks: c.cfg.Volumes != nil, RecoveryWait: c.cfg.RecoveryWait,
	}
	t.side = newSideWork(t)
	return t
}

// goroutine runs fn for the rest of the term.
func (t *term) goroutine(fn func(ctx context.Context)) {
	t.wg.Add(1)
	go func() { defer t.wg.Done(); fn(t.ctx) }()
}

// end cancels everything the term started and waits for it, within abandonAfter.
func (t *term) end() {
	t.stop()
	done := make(chan struct{})
	go func() { t.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(abandonAfter):
		t.log.Warn("side work still running after the term ended; leaving it (its writes are refused)", "running", t.side.running())
	}
}

// run leads until the term's context ends or a guarded write is refused.
func (t *term) run() error {
	defer t.end()
	c := t.c
	// The caches may lag the previous leader's last writes. A linearizable read after winning gives
	// a revision past anything it could still write (its key is gone by now); act only once every
	// cache has caught up to it.
	if err := c.barrier(t.ctx, true); err != nil {
		return err
	}
	// A keyspace an older herd wrote is brought to this herd's layout before anything is decided
	// from it; the caches then catch up with the rewrites.
	if n, err := schema.Upgrade(t.ctx, c.cfg.Client, c.space, t.guard, c.log); err != nil {
		return fmt.Errorf("keyspace upgrade: %w", err)
	} else if n > 0 {
		c.events.Record("cluster", "keyspace-upgraded", "to schema %d: %d keys rewritten", keys.SchemaVersion, n)
		if err := c.barrier(t.ctx, false); err != nil {
			return err
		}
	}
	if c.cfg.RevokeNodeUsers {
		t.goroutine(c.revokeLoop)
	}
	t.goroutine(func(ctx context.Context) { c.runEventJanitor(ctx, t.guard) })
	t.side.run()

	// A full round runs at least every interval, and sooner when one asks for it (a grace period
	// ends); between them, rounds are quick unless something other than a VM's records changed.
	// The term opens with a quick round over the VMs waiting for a place (the ledger is kept on
	// every replica), so that a failover costs new VMs a round over the nodes and them, not one
	// over every VM; the full round follows at once.
	due := time.Now()
	timer := time.NewTimer(0)
	defer timer.Stop()
	c.takeChanges(true)
	t.base = c.nodesOnly()
	first := true
	for {
		cause, dirty := c.takeChanges(!first && !time.Now().Before(due))
		first = false
		after, full, err := t.round(cause, dirty)
		switch {
		case errors.Is(err, etcdutil.ErrNotLeader):
			return err
		case t.ctx.Err() != nil:
			return t.ctx.Err()
		case err != nil:
			t.log.Warn("round failed", "error", err)
			due = time.Now().Add(500 * time.Millisecond)
		case full:
			wait := c.cfg.Interval
			if after > 0 && after < wait {
				wait = after
			}
			due = time.Now().Add(wait)
		case after > 0 && time.Now().Add(after).Before(due):
			due = time.Now().Add(after)
		}
		timer.Reset(time.Until(due))
		select {
		case <-t.ctx.Done():
			return t.ctx.Err()
		case <-c.trigger:
		case <-timer.C:
		}
	}
}

// takeChanges takes what changed since the last round: why the round must be full ("due": it
// is; else what other than a VM's records changed; "" when it may be quick), and otherwise the VMs
// that changed.
func (c *Coordinator) takeChanges(due bool) (full string, dirty []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	full = c.full
	if due {
		full = "due"
	}
	c.full = ""
	if full == "" {
		dirty = make([]string, 0, len(c.dirty))
		for name := range c.dirty {
			dirty = append(dirty, name)
		}
	}
	clear(c.dirty)
	return full, dirty
}

// round observes, decides and applies once. It returns once the caches reflect its own writes, so
// the next round never decides from a view older than this one's decisions, and says when the
// next round must come at the latest (0: no sooner than the interval). A quick round that found
// something only a full round decides asks for one at once.
func (t *term) round(cause string, dirty []string) (after time.Duration, full bool, err error) {
	start := time.Now()
	var snap *decide.Snapshot
	if cause == "" {
		if snap = t.c.observeQuick(dirty, t.base); snap == nil {
			cause = "recovery"
		}
	}
	full = cause != ""
	if full {
		defer func() { t.moves.fullRound(time.Since(start)) }()
		t.c.m.fullRounds.WithLabelValues(cause).Inc()
		snap = t.c.observe(t.ctx)
		t.base = snap
	}
	snap.MoveBudget = t.moves.available(snap.Now)
	plan := decide.Decide(snap, t.state, t.cfg)
	if full {
		t.base.Trusted = plan.Trusted
	}
	if n := plan.Count(decide.MetricMove); n > 0 {
		// Moves are rate-limited so that a large node's loss does not start every VM at once.
		t.moves.spend(snap.Now, n)
	}
	kind := "full"
	if !full {
		kind = "quick"
		if plan.Full != "" {
			t.log.Debug("a quick round asks for a full one", "why", plan.Full)
			t.c.mu.Lock()
			if t.c.full == "" {
				t.c.full = "vm"
			}
			t.c.mu.Unlock()
			t.c.signal()
		}
	}
	t.c.m.rounds.WithLabelValues(kind).Inc()
	t.c.m.decideSeconds.WithLabelValues(kind).Observe(time.Since(start).Seconds())
	if full || plan.Full == "" {
		// A quick round counts every VM waiting too, unless it left them to a full round.
		t.c.m.pending.Set(float64(plan.Pending))
	}
	if full {
		t.c.m.rolloutNodes.Reset()
		for phase, n := range plan.Rollout {
			t.c.m.rolloutNodes.WithLabelValues(phase).Set(float64(n))
		}
	}
	t.say(plan.Logs)
	t.side.add(plan.Work)
	if len(plan.Actions) == 0 {
		return plan.After, full, nil
	}
	floor := etcdutil.MaxRev(t.c.informers())
	rev, err := t.apply(plan.Actions)
	t.c.nospace.Observe(err)
	t.c.m.roundSeconds.Observe(time.Since(start).Seconds())
	if err != nil {
		return plan.After, full, err
	}
	// The revision file is kept from the session's keepalives (probeRevision), not here: a round
	// must not wait for a file to reach the disk.
	t.c.checkRevision(floor, rev)
	return plan.After, full, t.c.catchUp(t.ctx, plan.Actions, rev)
}

// barrier reads etcd linearizably and waits until every cache reflects that revision. With check,
// a revision older than a cache held before the read means etcd was restored or replaced under
// us: every cache lists again.
func (c *Coordinator) barrier(ctx context.Context, check bool) error {
	floor := etcdutil.MaxRev(c.informers())
	cctx, cancel := etcdutil.WithTimeout(ctx)
	resp, err := c.cfg.Client.Get(cctx, c.space.Cluster())
	cancel()
	if err != nil {
		return fmt.Errorf("leader barrier read: %w", err)
	}
	if check {
		c.checkRevision(floor, resp.Header.Revision)
	}
	return syncAll(ctx, c.informers(), resp.Header.Revision)
}

// syncAll waits, in parallel, until every cache reflects rev.
func syncAll(ctx context.Context, infs []*etcdutil.Informer, rev int64) error {
	errs := make([]error, len(infs))
	var wg sync.WaitGroup
	for i, inf := range infs {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = inf.Sync(ctx, rev) }()
	}
	wg.Wait()
	return errors.Join(errs...)
}
