package coordinator

import (
	"context"
	"errors"
	"fmt"
	"maps"
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
	// base is the last full round's view of the nodes (and its judgement of them), which quick
	// rounds take.
	base *decide.Snapshot
	// inflight is the full round deciding in the background, if any; touched what quick rounds
	// committed since it took its snapshot.
	inflight *fullRound
	touched  decide.Touched
	moves    *moveBudget
	side     *sideWork
	wg       sync.WaitGroup
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
	// A full round decides in the background (fullRound) while quick rounds go on deciding about
	// the VMs that change meanwhile. The term opens with a quick round over the VMs waiting for a
	// place (the ledger is kept on every replica), so that a failover costs new VMs a round over
	// the nodes and them, not one over every VM; the full round follows at once.
	due := time.Now()
	timer := time.NewTimer(0)
	defer timer.Stop()
	c.takeChanges(true, false)
	t.base = c.nodesOnly()
	first := true
	var soon time.Time // the soonest time a quick round asked for while a full round decided
	for {
		var err error
		switch {
		case t.inflight == nil:
			ch := c.takeChanges(!first && !time.Now().Before(due), false)
			first = false
			if ch.full != "" {
				t.startFull(ch)
				break
			}
			var after time.Duration
			if after, err = t.quick(ch.dirty, nil); err == nil && after > 0 && time.Now().Add(after).Before(due) {
				due = time.Now().Add(after)
			}
		case t.inflight.global:
			// Something not scoped to a node changed before the full round's snapshot: the
			// nodes the quick rounds would take are no longer known to be what they were.
		default:
			ch := c.takeChanges(false, true)
			if ch.global || len(ch.dirty) == 0 {
				c.putBack(ch.dirty)
				break
			}
			avoid := maps.Clone(t.inflight.changed)
			maps.Copy(avoid, ch.nodes)
			var after time.Duration
			if after, err = t.quick(ch.dirty, avoid); err == nil && after > 0 {
				// The landing sets the next full round's time: it keeps this one if sooner.
				if at := time.Now().Add(after); soon.IsZero() || at.Before(soon) {
					soon = at
				}
			}
		}
		if stop, retry := t.failed(err); stop != nil {
			return stop
		} else if retry {
			// The next full round comes soon (once the one deciding has landed, if any).
			due = time.Now().Add(retryAfter)
			if t.inflight != nil {
				soon = due
			}
		}
		// While a full round decides, its landing sets the next one's time.
		var decided chan struct{}
		var dueC <-chan time.Time
		if t.inflight != nil {
			decided = t.inflight.done
		} else {
			timer.Reset(time.Until(due))
			dueC = timer.C
		}
		select {
		case <-t.ctx.Done():
			return t.ctx.Err()
		case <-c.trigger:
		case <-dueC:
		case <-decided:
			after, err := t.land()
			stop, retry := t.failed(err)
			switch {
			case stop != nil:
				return stop
			case retry:
				due = time.Now().Add(retryAfter)
			default:
				wait := c.cfg.Interval
				if after > 0 && after < wait {
					wait = after
				}
				due = time.Now().Add(wait)
				if !soon.IsZero() && soon.Before(due) {
					due = soon
				}
			}
			soon = time.Time{}
		}
	}
}

// retryAfter is how soon a full round follows a failed round.
const retryAfter = 500 * time.Millisecond

// failed sorts a round's error: one that ends the term (leadership lost, the term's context
// done) is returned as stop; any other is logged and the round is retried soon.
func (t *term) failed(err error) (stop error, retry bool) {
	switch {
	case err == nil:
		return nil, false
	case errors.Is(err, etcdutil.ErrNotLeader):
		return err, false
	case t.ctx.Err() != nil:
		return t.ctx.Err(), false
	}
	t.log.Warn("round failed", "error", err)
	return nil, true
}

// changes is what the watch handlers noted since a round last took it.
type changes struct {
	full   string          // why the round must be full ("due": it is); "" when it may be quick
	dirty  []string        // the VMs whose records changed
	nodes  map[string]bool // the nodes whose records changed
	global bool            // something not scoped to one node changed
}

// takeChanges takes what changed since a round last took it. With due the round is full
// whatever changed. With quickOnly (a full round is deciding already) it takes only the VMs: what
// else changed waits for the next full round, and the nodes changed are returned but kept.
func (c *Coordinator) takeChanges(due, quickOnly bool) changes {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := changes{full: c.full, nodes: maps.Clone(c.nodesChanged), global: c.global != ""}
	if due {
		ch.full = "due"
	}
	if quickOnly {
		ch.full = ""
	}
	if ch.full == "" {
		ch.dirty = make([]string, 0, len(c.dirty))
		for name := range c.dirty {
			ch.dirty = append(ch.dirty, name)
		}
	} else {
		// The full round's snapshot, taken after this, reflects every change noted so far.
		c.full, c.global = "", ""
		clear(c.nodesChanged)
	}
	clear(c.dirty)
	return ch
}

// putBack returns VMs a round took but did not decide about to those changed.
func (c *Coordinator) putBack(dirty []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, name := range dirty {
		c.dirty[name] = true
	}
}

// askFull asks for a full round (a quick one found a VM only a full round decides about). The
// loop is woken only by the first ask: while a full round decides, a quick round that keeps
// leaving its VMs to the next one must not keep waking the loop to try again.
func (c *Coordinator) askFull(cause string) {
	c.mu.Lock()
	first := c.full == ""
	if first {
		c.full = cause
	}
	c.mu.Unlock()
	if first {
		c.signal()
	}
}

// A fullRound decides in the background, from a snapshot of everything, while quick rounds go on:
// at 100,000 VMs its decision takes a second or more on a loaded machine, and new VMs waited for
// it (placement p99 of 1.6-2.3 s at 10,000 nodes). What the quick rounds commit meanwhile
// overtakes part of its plan, which is dropped when it lands (decide.Plan.Rebase): the quick
// rounds' VMs, and whatever takes room on the nodes they placed on. While it decides, quick rounds
// place nothing on, and decide about no VM on, the nodes whose changes made it necessary
// (decide.Snapshot.Avoid), and none runs at all when the change was not a node's (the cluster
// record, the mass-failure guard, a rollout, requests...).
type fullRound struct {
	cause   string
	start   time.Time
	snap    *decide.Snapshot
	state   *decide.State   // the term's state, for the round to change; the term's own when it lands
	changed map[string]bool // nodes whose changes the snapshot reflects: quick rounds avoid them
	global  bool            // a change not scoped to a node: no quick round until it lands
	plan    decide.Plan
	done    chan struct{}
}

// startFull observes everything and starts deciding in the background.
func (t *term) startFull(ch changes) {
	c := t.c
	f := &fullRound{cause: ch.full, start: time.Now(), changed: ch.nodes, global: ch.global, state: t.state.Clone(), done: make(chan struct{})}
	c.m.fullRounds.WithLabelValues(ch.full).Inc()
	f.snap = c.observe(t.ctx)
	f.snap.MoveBudget = t.moves.available(f.snap.Now)
	t.inflight, t.touched = f, decide.Touched{}
	t.goroutine(func(context.Context) {
		defer close(f.done)
		f.plan = decide.Decide(f.snap, f.state, t.cfg)
		c.m.decideSeconds.WithLabelValues("full").Observe(time.Since(f.start).Seconds())
		if c.cfg.decided != nil {
			c.cfg.decided()
		}
	})
}

// land commits the full round that finished deciding, less what quick rounds overtook meanwhile.
func (t *term) land() (after time.Duration, err error) {
	c, f := t.c, t.inflight
	t.inflight = nil
	defer func() { t.moves.fullRound(time.Since(f.start)) }()
	if dropped := f.plan.Rebase(c.space, t.touched); len(dropped) > 0 {
		t.log.Debug("quick rounds overtook part of the full round", "vms", len(dropped))
		c.putBack(dropped)
		c.signal()
	}
	t.touched = decide.Touched{}
	t.state, t.base = f.state, nodeView(f.snap, f.plan.Trusted)
	c.m.rounds.WithLabelValues("full").Inc()
	c.m.pending.Set(float64(f.plan.Pending))
	c.m.rolloutNodes.Reset()
	for phase, n := range f.plan.Rollout {
		c.m.rolloutNodes.WithLabelValues(phase).Set(float64(n))
	}
	if n := f.plan.Count(decide.MetricMove); n > 0 {
		// Moves are rate-limited so that a large node's loss does not start every VM at once.
		t.moves.spend(time.Now(), n)
	}
	return f.plan.After, t.commit(f.plan, f.start)
}

// quick runs a quick round over the VMs that changed (decide/quick.go), avoiding the nodes a full
// round still deciding will judge anew, and says when the next round must come at the latest (0:
// no sooner than the interval).
func (t *term) quick(dirty []string, avoid map[string]bool) (after time.Duration, err error) {
	c, start := t.c, time.Now()
	snap := c.observeQuick(dirty, t.base)
	if snap == nil {
		c.putBack(dirty)
		c.askFull("recovery")
		return 0, nil
	}
	snap.Avoid = avoid
	plan := decide.Decide(snap, t.state, t.cfg)
	if plan.Full != "" {
		t.log.Debug("a quick round asks for a full one", "why", plan.Full)
		c.askFull("vm")
	} else {
		// It counts every VM waiting too, unless it left them to a full round.
		c.m.pending.Set(float64(plan.Pending))
	}
	c.m.rounds.WithLabelValues("quick").Inc()
	c.m.decideSeconds.WithLabelValues("quick").Observe(time.Since(start).Seconds())
	if t.inflight != nil {
		t.touched.Add(c.space, plan.Actions)
	}
	return plan.After, t.commit(plan, start)
}

// commit starts a plan's side work and commits its writes, and returns once the caches reflect
// them, so the next round never decides from a view older than this one's decisions.
func (t *term) commit(plan decide.Plan, start time.Time) error {
	t.say(plan.Logs)
	t.side.add(plan.Work)
	if len(plan.Actions) == 0 {
		return nil
	}
	floor := etcdutil.MaxRev(t.c.informers())
	rev, err := t.apply(plan.Actions)
	t.c.nospace.Observe(err)
	t.c.m.roundSeconds.Observe(time.Since(start).Seconds())
	if err != nil {
		return err
	}
	// The revision file is kept from the session's keepalives (probeRevision), not here: a round
	// must not wait for a file to reach the disk.
	t.c.checkRevision(floor, rev)
	return t.c.catchUp(t.ctx, plan.Actions, rev)
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
