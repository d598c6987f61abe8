package coordinator

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/herdhq/herd/coordinator/scheduler"
	"github.com/herdhq/herd/coordinator/schema"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/units"
)

// lead runs scheduling rounds until ctx ends or leadership is lost.
func (c *Coordinator) lead(ctx context.Context, g etcdutil.Guard) error {
	// The caches may lag the previous leader's last writes. A linearizable read after winning gives
	// a revision past anything it could still write (its key is gone by now); act only once every
	// cache has caught up to it.
	if err := c.barrier(ctx, true); err != nil {
		return err
	}
	// A keyspace an older herd wrote is brought to this herd's layout before anything is decided
	// from it; the caches then catch up with the rewrites.
	if n, err := schema.Upgrade(ctx, c.cfg.Client, c.space, g, c.log); err != nil {
		return fmt.Errorf("keyspace upgrade: %w", err)
	} else if n > 0 {
		c.events.Record("cluster", "keyspace-upgraded", "to schema %d: %d keys rewritten", keys.SchemaVersion, n)
		if err := c.barrier(ctx, false); err != nil {
			return err
		}
	}
	if c.cfg.RevokeNodeUsers {
		// Ends with this function, whatever the reason: no revocation outlives the leadership.
		rctx, stop := context.WithCancel(ctx)
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { defer wg.Done(); c.revokeLoop(rctx) }()
		defer func() { stop(); wg.Wait() }()
	}
	{
		jctx, stop := context.WithCancel(ctx)
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { defer wg.Done(); c.runEventJanitor(jctx, g) }()
		defer func() { stop(); wg.Wait() }()
	}
	t := time.NewTicker(c.cfg.Interval)
	defer t.Stop()
	for {
		err := c.round(ctx, g)
		switch {
		case errors.Is(err, etcdutil.ErrNotLeader):
			return err
		case ctx.Err() != nil:
			return ctx.Err()
		case err != nil:
			c.log.Warn("scheduling round failed", "error", err)
			if !etcdutil.Sleep(ctx, 500*time.Millisecond) {
				return ctx.Err()
			}
			continue
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-c.trigger:
		case <-t.C:
		}
	}
}

// barrier reads etcd linearizably and waits until every cache reflects that revision. With check,
// a revision older than a cache held before the read means etcd was restored or replaced under
// us: those caches list again.
func (c *Coordinator) barrier(ctx context.Context, check bool) error {
	before := map[*etcdutil.Informer]int64{}
	for _, inf := range c.informers() {
		before[inf] = inf.Rev()
	}
	cctx, cancel := etcdutil.WithTimeout(ctx)
	resp, err := c.cfg.Client.Get(cctx, c.space.Cluster())
	cancel()
	if err != nil {
		return fmt.Errorf("leader barrier read: %w", err)
	}
	for _, inf := range c.informers() {
		// Only a revision older than what the cache held before the read says etcd went back: a
		// cache that moved on meanwhile saw newer writes, nothing more.
		if check && resp.Header.Revision < before[inf] {
			inf.CheckRevision(resp.Header.Revision)
		}
	}
	for _, inf := range c.informers() {
		if err := inf.Sync(ctx, resp.Header.Revision); err != nil {
			return err
		}
	}
	return nil
}

func (c *Coordinator) informers() []*etcdutil.Informer {
	return []*etcdutil.Informer{c.clusterInf, c.hwInf, c.nodesInf, c.nodeStateInf, c.nodeSpecInf, c.vmsInf, c.placementInf, c.problemInf,
		c.assignInf, c.fenceInf, c.guardInf, c.statusInf, c.volInf, c.rolloutInf, c.nodeCmdInf, c.requestInf}
}

// action is one guarded write a round decided on.
type action struct {
	vm    string
	what  string
	conds []etcdutil.Cmp
	ops   []etcdutil.Op
	// after runs when the write committed.
	after func()
}

// round compares every VM's spec with its placement and problem, handles lost nodes, schedules
// what is unplaced or must move, and commits the result. It returns once the caches reflect its own
// writes, so the next round never decides from a view older than this one's decisions.
func (c *Coordinator) round(ctx context.Context, g etcdutil.Guard) error {
	start := time.Now()
	snap := c.snapshot(ctx)
	acts := c.bookkeeping(&snap)
	if c.clusterInf.Get(c.space.Cluster()) == nil {
		// etcd was replaced by an empty one: this is a new cluster, with a new id, which tells
		// every agent that the keyspace says nothing about the domains it runs.
		acts = append(acts, c.newClusterRecord())
	}

	// Nodes with anything of a VM: its placement, or any assignment (strays and migration targets
	// included). A node that is lost with any of them is fenced before they are given up.
	placedOn := map[string][]string{}
	for name, v := range snap.vms {
		on := map[string]bool{}
		if v.placement != nil && v.placement.Err == nil {
			on[v.placement.Obj.(*keys.Placement).Node] = true
		}
		for hwid := range snap.assigns[name] {
			on[hwid] = true
		}
		for hwid := range on {
			placedOn[hwid] = append(placedOn[hwid], name)
		}
	}
	for name, byNode := range snap.assigns {
		if _, known := snap.vms[name]; !known {
			for hwid := range byNode {
				placedOn[hwid] = append(placedOn[hwid], name)
			}
		}
	}
	fo, fates := c.failover(ctx, g, &snap, placedOn)
	acts = append(acts, fo...)
	acts = append(acts, c.handleRequests(&snap)...)

	var pending []scheduler.VM
	var placed []scheduler.VM
	specs := map[string]*keys.VMSpec{}
	moving := map[string]*keys.Placement{}
	var open []openMigration
	var wants []wantMove
	busy := map[string]int{} // open migrations per node

	// Assignments of VMs with neither spec nor placement record (deleted while their placement was
	// gone): nodes remove the domains on the evidence that the spec is gone.
	for name, byNode := range snap.assigns {
		if _, known := snap.vms[name]; known {
			continue
		}
		for hwid, kv := range byNode {
			acts = append(acts, c.dropAssignment(name, hwid, kv, "the VM was deleted"))
		}
	}
	for name, v := range snap.vms {
		if v.spec == nil {
			acts = append(acts, c.unplace(&snap, name, v, "the VM was deleted")...)
			continue
		}
		uid := v.spec.CreateRevision
		if v.migrate != nil && v.placement == nil {
			acts = append(acts, action{vm: name, what: "drop migrate request of an unplaced VM",
				conds: []etcdutil.Cmp{etcdutil.ModRev(v.migrate.Key, v.migrate.ModRevision)},
				ops:   []etcdutil.Op{etcdutil.OpDelete(v.migrate.Key)}})
		}
		var pl *keys.Placement
		if v.placement != nil {
			if v.placement.Err != nil {
				c.log.Error("unreadable placement; leaving the VM alone", "vm", name, "error", v.placement.Err)
				continue
			}
			pl = v.placement.Obj.(*keys.Placement)
			if pl.UID != uid {
				// The placement belongs to an earlier VM of the same name; clear it first.
				acts = append(acts, c.unplace(&snap, name, v, "the VM was re-created")...)
				continue
			}
		}
		spec, invalid := c.checkSpec(name, v.spec, snap.pools)
		if invalid == nil {
			invalid = c.checkShrink(&snap, name, uid, spec)
		}
		if invalid != nil {
			spec = nil
		}
		auth, aacts := c.reconcileVM(g, &snap, name, v, uid, spec)
		acts = append(acts, aacts...)
		if auth.restored != nil {
			// Accounted where it is kept; everything else waits for the records to agree.
			r := auth.restored
			placed = append(placed, scheduler.VM{Name: name, UID: uid, VCPUs: r.VCPUs, MemoryMiB: r.MemoryMiB, AntiAffinity: r.AntiAffinity, Node: r.Node})
			continue
		}
		if pl == nil && auth.blocked != "" {
			if a, ok := c.setProblem(name, uid, v.problem, keys.ProblemPending, "not placed anew: "+auth.blocked, nil); ok {
				acts = append(acts, a)
			}
			continue
		}
		var fate nodeFate
		if pl != nil {
			fate = fates[pl.Node]
			reserved := scheduler.VM{Name: name, UID: uid, VCPUs: pl.VCPUs, MemoryMiB: pl.MemoryMiB, AntiAffinity: pl.AntiAffinity, Node: pl.Node}
			if !fate.move {
				placed = append(placed, reserved)
			}
			if mig := pl.Migration; mig != nil {
				// An open migration holds capacity on both nodes until it is settled.
				reserved.Node = mig.To
				placed = append(placed, reserved)
				busy[pl.Node]++
				busy[mig.To]++
				if invalid == nil {
					open = append(open, openMigration{name: name, v: v, spec: spec, pl: pl})
				} else if a, ok := c.setProblem(name, uid, v.problem, keys.ProblemInvalid, invalid.Error()+"; a migration is open: fix the spec to finish it", nil); ok {
					acts = append(acts, a)
				}
				continue
			}
		}
		switch {
		case invalid != nil:
			// A placed VM keeps running under the last valid spec its node was given.
			msg := invalid.Error()
			if fate.move {
				msg += "; its node is fenced: fix the spec to restart it elsewhere"
			}
			if a, ok := c.setProblem(name, uid, v.problem, keys.ProblemInvalid, msg, nil); ok {
				acts = append(acts, a)
			}
		case pl != nil && fate.stranded != "":
			if a, ok := c.setProblem(name, uid, v.problem, keys.ProblemNodeLost, fate.stranded, nil); ok {
				acts = append(acts, a)
			}
		case pl != nil && fate.move:
			specs[name], moving[name] = spec, pl
			pending = append(pending, schedVM(name, uid, spec, ""))
		case pl != nil && (v.migrate != nil || snap.draining(pl.Node)):
			reason := "drain"
			to := ""
			if v.migrate != nil {
				reason = "operator"
				if v.migrate.Err == nil {
					to = v.migrate.Obj.(*keys.MigrateRequest).To
				}
			}
			wants = append(wants, wantMove{name: name, v: v, spec: spec, pl: pl, to: to, reason: reason})
		case pl != nil && pl.SpecRev != v.spec.ModRevision:
			acts = append(acts, c.updateSpec(g, name, v, spec, pl))
		case pl != nil && v.problem != nil && !isProblem(v.problem, keys.ProblemMigration):
			acts = append(acts, c.clearProblem(name, v.problem))
		case pl == nil:
			// The disk comes first: a VM is placed only once its disk is there.
			if ready, problem := c.volumeReady(ctx, g, &snap, name, uid, spec); !ready {
				if problem != "" {
					if a, ok := c.setProblem(name, uid, v.problem, keys.ProblemPending, problem, nil); ok {
						acts = append(acts, a)
					}
				}
				continue
			}
			specs[name] = spec
			pending = append(pending, schedVM(name, uid, spec, ""))
		}
		if pl != nil && spec != nil && spec.Disk != nil {
			c.volumeReady(ctx, g, &snap, name, uid, spec) // grows the disk of a placed VM
		}
	}

	// First come, first served: the oldest VM is considered first.
	sort.Slice(pending, func(i, j int) bool { return pending[i].UID < pending[j].UID })
	plan := scheduler.Schedule(scheduler.Snapshot{Nodes: snap.nodes, Placed: placed, Pending: pending}, c.cfg.Scheduler)
	deferred := 0
	for _, d := range plan.Placements {
		v := snap.vms[d.VM]
		if pl := moving[d.VM]; pl != nil {
			// Moves are rate-limited so that a large node's loss does not start every VM at once.
			if !c.moveLimit.Allow() {
				deferred++
				continue
			}
			acts = append(acts, c.move(g, d.VM, v, specs[d.VM], pl, d.Node, fates[pl.Node]))
			continue
		}
		acts = append(acts, c.place(g, d.VM, v.spec, specs[d.VM], d.Node))
	}
	if deferred > 0 {
		c.pokeAfter(time.Second)
	}
	for _, d := range plan.Placements {
		vm := schedVM(d.VM, d.UID, specs[d.VM], d.Node)
		placed = append(placed, vm)
	}
	for _, m := range open {
		if a, ok := c.settle(g, &snap, m, fates); ok {
			acts = append(acts, a)
		}
	}
	acts = append(acts, c.startMigrations(g, &snap, wants, placed, busy)...)
	acts = append(acts, c.drainBookkeeping(&snap, placedOn, busy)...)
	acts = append(acts, c.rolloutRound(g, &snap, placed)...)
	c.purgeVolumes(ctx, g, &snap)
	c.adoptVolumes(ctx, g)
	for _, f := range plan.Failures {
		msg, kind := f.Message, keys.ProblemPending
		if pl := moving[f.VM]; pl != nil {
			msg, kind = fmt.Sprintf("node %s is fenced; no other node can take the VM: %s", pl.Node, f.Message), keys.ProblemNodeLost
		}
		if a, ok := c.setProblem(f.VM, f.UID, snap.vms[f.VM].problem, kind, msg, f.Reasons); ok {
			acts = append(acts, a)
		}
	}
	c.m.pending.Set(float64(len(plan.Failures)))
	if len(acts) == 0 {
		return nil
	}
	maxRev, err := c.commit(ctx, g, acts)
	c.m.roundSeconds.Observe(time.Since(start).Seconds())
	if err != nil {
		return err
	}
	return c.catchUp(ctx, acts, maxRev)
}

// catchUp waits until the caches that the round's puts landed in reflect them, so the next round
// decides from a view that includes this round's decisions. Only caches with a put are waited for
// (a delete of an absent key makes no event), and Sync lists again rather than wait forever.
func (c *Coordinator) catchUp(ctx context.Context, acts []action, rev int64) error {
	touched := map[*etcdutil.Informer]bool{}
	for _, a := range acts {
		for _, op := range a.ops {
			if !op.IsPut() {
				continue
			}
			if inf := c.informerFor(string(op.KeyBytes())); inf != nil {
				touched[inf] = true
			}
		}
	}
	for inf := range touched {
		if err := inf.Sync(ctx, rev); err != nil {
			return err
		}
	}
	return nil
}

// informerFor returns the cache a key belongs to.
func (c *Coordinator) informerFor(key string) *etcdutil.Informer {
	s := c.space
	for _, p := range []struct {
		prefix string
		inf    *etcdutil.Informer
	}{{s.VMPrefix(), c.vmsInf}, {s.PlacementPrefix(), c.placementInf}, {s.ProblemPrefix(), c.problemInf}, {s.AssignRoot(), c.assignInf}, {s.NodeStatePrefix(), c.nodeStateInf}, {s.VolumeRoot(), c.volInf}, {s.FenceRoot(), c.fenceInf}, {s.StatusRoot(), c.statusInf}, {s.LossGuard(), c.guardInf}, {s.Cluster(), c.clusterInf}, {s.Rollout(), c.rolloutInf}, {s.NodeCmdRoot(), c.nodeCmdInf}} {
		if strings.HasPrefix(key, p.prefix) {
			return p.inf
		}
	}
	return nil
}

// commit runs the actions' guarded transactions with bounded parallelism.
func (c *Coordinator) commit(ctx context.Context, g etcdutil.Guard, acts []action) (int64, error) {
	var (
		mu       sync.Mutex
		maxRev   int64
		firstErr error
		wg       sync.WaitGroup
		sem      = make(chan struct{}, c.cfg.Parallel)
	)
	notLeader := false
	for _, a := range acts {
		sem <- struct{}{}
		mu.Lock()
		stop := notLeader
		mu.Unlock()
		if stop || ctx.Err() != nil {
			<-sem
			break
		}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			rev, err := etcdutil.GuardedTxn(ctx, c.cfg.Client, g, a.conds, a.ops)
			mu.Lock()
			defer mu.Unlock()
			if rev > maxRev {
				maxRev = rev
			}
			switch {
			case err == nil:
				if a.after != nil {
					a.after()
				}
			case errors.Is(err, etcdutil.ErrConflict):
				// Someone changed the VM since the snapshot; the watch brings the change and
				// the next round decides again.
				c.m.conflicts.Inc()
				c.log.Debug("write conflict", "vm", a.vm, "action", a.what)
			case errors.Is(err, etcdutil.ErrNotLeader):
				notLeader = true
				firstErr = err
			default:
				if firstErr == nil {
					firstErr = fmt.Errorf("%s vm %s: %w", a.what, a.vm, err)
				}
			}
		}()
	}
	wg.Wait()
	if notLeader {
		return maxRev, etcdutil.ErrNotLeader
	}
	return maxRev, firstErr
}

// snapshotView is one consistent-enough copy of the caches for a round.
type snapshotView struct {
	vms      map[string]vmKeys
	nodes    []scheduler.Node // live nodes as the scheduler sees them
	pools    []string
	live     map[string]*etcdutil.KV // hwid -> node key (decoded), only nodes trusted as alive
	states   map[string]*etcdutil.KV // hwid -> node state (the leader's)
	specs    map[string]*etcdutil.KV // hwid -> node spec (the operators')
	fences   map[string][]*etcdutil.KV
	hardware map[string]*keys.Hardware
	guard    *etcdutil.KV
	statuses map[string]map[string]*etcdutil.KV // hwid -> vm -> status
	reports  map[string]map[string]*etcdutil.KV // vm -> hwid -> status (the same, by VM)
	assigns  map[string]map[string]*etcdutil.KV // vm -> hwid -> assignment
	volumes  map[string]*etcdutil.KV            // "pool/image" -> disk record
	requests map[string]*etcdutil.KV            // key -> operator request
	vanished map[string]*keys.Placement         // vm -> last placement, deleted by someone
	// untrusted are node keys present but not trusted as a live registration, with why; keys
	// holds every node key present, trusted or not.
	untrusted map[string]string
	keys      map[string]*etcdutil.KV
	// capped are live nodes whose reported capacity exceeds what they may offer.
	capped map[string]string
	// migHolders: see migrationHolders.
	migHolders map[string]string
}

// admin is a node's administrative state (operator's spec and leader's state combined).
func (s *snapshotView) admin(hwid string) keys.NodeAdmin {
	var spec *keys.NodeSpec
	if kv := s.specs[hwid]; kv != nil && kv.Err == nil {
		spec = kv.Obj.(*keys.NodeSpec)
	}
	return keys.AdminOf(spec, s.lastSeen(hwid))
}

// draining says whether a node is being drained.
func (s *snapshotView) draining(hwid string) bool { return s.admin(hwid).Draining }

// maxNodeLeaseTTL bounds the lease a node key may hang on: a node that took a longer one could hide
// its death for that long.
const maxNodeLeaseTTL = 120 * time.Second

func (c *Coordinator) snapshot(ctx context.Context) snapshotView {
	s := snapshotView{
		live:      map[string]*etcdutil.KV{},
		states:    map[string]*etcdutil.KV{},
		specs:     map[string]*etcdutil.KV{},
		fences:    map[string][]*etcdutil.KV{},
		hardware:  map[string]*keys.Hardware{},
		statuses:  map[string]map[string]*etcdutil.KV{},
		reports:   map[string]map[string]*etcdutil.KV{},
		assigns:   map[string]map[string]*etcdutil.KV{},
		volumes:   map[string]*etcdutil.KV{},
		requests:  map[string]*etcdutil.KV{},
		vanished:  map[string]*keys.Placement{},
		untrusted: map[string]string{},
		keys:      map[string]*etcdutil.KV{},
		capped:    map[string]string{},
	}
	for _, kv := range c.volInf.List() {
		if pool, image, ok := keys.ParseNodeScoped(c.space.VolumeRoot(), kv.Key); ok {
			s.volumes[pool+"/"+image] = kv
		}
	}
	for _, kv := range c.statusInf.List() {
		if hwid, name, ok := keys.ParseNodeScoped(c.space.StatusRoot(), kv.Key); ok {
			if s.statuses[hwid] == nil {
				s.statuses[hwid] = map[string]*etcdutil.KV{}
			}
			s.statuses[hwid][name] = kv
			if s.reports[name] == nil {
				s.reports[name] = map[string]*etcdutil.KV{}
			}
			s.reports[name][hwid] = kv
		}
	}
	for _, kv := range c.assignInf.List() {
		if hwid, name, ok := keys.ParseNodeScoped(c.space.AssignRoot(), kv.Key); ok {
			if s.assigns[name] == nil {
				s.assigns[name] = map[string]*etcdutil.KV{}
			}
			s.assigns[name][hwid] = kv
		}
	}
	for _, kv := range c.requestInf.List() {
		s.requests[kv.Key] = kv
	}
	c.mu.Lock()
	s.vms = make(map[string]vmKeys, len(c.vms))
	for n, v := range c.vms {
		s.vms[n] = *v
	}
	for n, p := range c.vanished {
		s.vanished[n] = p
	}
	c.mu.Unlock()
	if kv := c.clusterInf.Get(c.space.Cluster()); kv != nil && kv.Err == nil {
		s.pools = kv.Obj.(*keys.Cluster).Pools
	}
	for _, kv := range c.hwInf.List() {
		if hwid, ok := keys.ParseLeaf(c.space.HardwarePrefix(), kv.Key); ok && kv.Err == nil {
			s.hardware[hwid] = kv.Obj.(*keys.Hardware)
		}
	}
	for _, kv := range c.nodeStateInf.List() {
		if hwid, ok := keys.ParseLeaf(c.space.NodeStatePrefix(), kv.Key); ok {
			s.states[hwid] = kv
		}
	}
	for _, kv := range c.nodeSpecInf.List() {
		if hwid, ok := keys.ParseLeaf(c.space.NodeSpecPrefix(), kv.Key); ok {
			s.specs[hwid] = kv
		}
	}
	for _, kv := range c.fenceInf.List() {
		if hwid, _, ok := keys.ParseNodeScoped(c.space.FenceRoot(), kv.Key); ok {
			s.fences[hwid] = append(s.fences[hwid], kv)
		}
	}
	if kv := c.guardInf.Get(c.space.LossGuard()); kv != nil {
		s.guard = kv
	}
	for _, kv := range c.nodesInf.List() {
		hwid, ok := keys.ParseLeaf(c.space.NodePrefix(), kv.Key)
		if !ok {
			continue
		}
		s.keys[hwid] = kv
		if kv.Err != nil {
			s.untrusted[hwid] = "its key is unreadable: " + kv.Err.Error()
			continue
		}
		// A node is alive exactly while its key hangs on a live lease of a sane length: a key put
		// without one (or with a lease of days) would keep a dead node "ready".
		if why := c.leaseDoubt(ctx, kv); why != "" {
			s.untrusted[hwid] = why
			continue
		}
		s.live[hwid] = kv
		n := kv.Obj.(*keys.Node)
		sn := scheduler.Node{HWID: hwid, CPUs: n.CPUs, MemoryMiB: n.MemoryMiB, ReservedMemoryMiB: n.ReservedMemoryMiB, BootDir: n.BootDir}
		if allowed := s.allowedCapacity(hwid); allowed != nil {
			var over []string
			if n.CPUs > allowed.CPUs {
				over = append(over, fmt.Sprintf("%d CPUs (allowed %d)", n.CPUs, allowed.CPUs))
				sn.CPUs = allowed.CPUs
			}
			if n.MemoryMiB > allowed.MemoryMiB {
				over = append(over, fmt.Sprintf("%s memory (allowed %s)", units.FormatMiB(n.MemoryMiB), units.FormatMiB(allowed.MemoryMiB)))
				sn.MemoryMiB = allowed.MemoryMiB
			}
			if len(over) > 0 {
				s.capped[hwid] = fmt.Sprintf("reports %s: capped; if the hardware really grew, approve it with 'herdctl hw set-capacity %s --from-node'", strings.Join(over, " and "), hwid)
			}
		}
		if hw := s.hardware[hwid]; hw == nil {
			sn.Unschedulable = "not enrolled (no readable hardware record)"
		} else {
			sn.Labels = hw.Labels
		}
		if st := s.states[hwid]; st != nil && st.Err != nil {
			sn.Unschedulable = "unreadable node state: " + st.Err.Error()
		} else if sp := s.specs[hwid]; sp != nil && sp.Err != nil {
			sn.Unschedulable = "unreadable node spec: " + sp.Err.Error()
		} else if a := s.admin(hwid); a.Cordoned {
			sn.Unschedulable = "cordoned"
		}
		if s.fenceFor(hwid, n.BootID) != nil {
			sn.Unschedulable = "fenced: reboot it or run 'herdctl fence clear " + hwid + "'"
		}
		s.nodes = append(s.nodes, sn)
	}
	return s
}

// allowedCapacity is what a node may offer: the operator's expected capacity from the hardware
// record, else what the leader recorded at its first registration; nil before either exists.
func (s *snapshotView) allowedCapacity(hwid string) *keys.Capacity {
	if hw := s.hardware[hwid]; hw != nil && (hw.CPUs > 0 || hw.MemoryMiB > 0) {
		c := keys.Capacity{CPUs: hw.CPUs, MemoryMiB: hw.MemoryMiB}
		if ns := s.lastSeen(hwid); ns != nil && ns.Capacity != nil {
			// Half an expectation leaves the other half to the first registration.
			if c.CPUs == 0 {
				c.CPUs = ns.Capacity.CPUs
			}
			if c.MemoryMiB == 0 {
				c.MemoryMiB = ns.Capacity.MemoryMiB
			}
		}
		if c.CPUs == 0 || c.MemoryMiB == 0 {
			return nil
		}
		return &c
	}
	if ns := s.lastSeen(hwid); ns != nil && ns.Capacity != nil {
		return ns.Capacity
	}
	return nil
}

// leaseDoubt says why a node key is not trusted as a live registration ("" when it is): it must be
// attached to a lease, and that lease must have been granted for at most maxNodeLeaseTTL. A lease's
// granted TTL never changes, so each lease is asked about once.
func (c *Coordinator) leaseDoubt(ctx context.Context, kv *etcdutil.KV) string {
	if kv.Lease == 0 {
		return "its key was written without a lease"
	}
	ttl, err := c.grantedTTL(ctx, kv.Lease)
	if err != nil {
		// Not knowing is no reason to call a node dead: it counts as live until a round can ask.
		c.log.Warn("lease check failed", "key", kv.Key, "error", err)
		return ""
	}
	if ttl > maxNodeLeaseTTL {
		return fmt.Sprintf("its lease was granted for %s, more than the %s a node may take", ttl, maxNodeLeaseTTL)
	}
	return ""
}

// checkSpec decodes and validates a spec; a nil spec with an error means it cannot be used.
func (c *Coordinator) checkSpec(name string, kv *etcdutil.KV, pools []string) (*keys.VMSpec, error) {
	if err := keys.ValidateName(name); err != nil {
		return nil, fmt.Errorf("vm name: %w", err)
	}
	if kv.Err != nil {
		return nil, kv.Err
	}
	spec := kv.Obj.(*keys.VMSpec)
	if pools == nil {
		pools = []string{}
	}
	if err := spec.Validate(pools); err != nil {
		return nil, err
	}
	return spec, nil
}

func schedVM(name string, uid int64, s *keys.VMSpec, node string) scheduler.VM {
	vm := scheduler.VM{Name: name, UID: uid, VCPUs: s.VCPUs, MemoryMiB: s.MemoryMiB, Selector: s.NodeSelector, AntiAffinity: s.AntiAffinity, Node: node}
	if b := s.Boot; b != nil {
		vm.BootPaths = append(vm.BootPaths, b.Kernel)
		if b.Initrd != "" {
			vm.BootPaths = append(vm.BootPaths, b.Initrd)
		}
	}
	return vm
}

// place commits a first placement: placement and the node's assignment in one transaction, which
// holds only if the VM is still unplaced and its spec is the one scheduled.
func (c *Coordinator) place(g etcdutil.Guard, name string, specKV *etcdutil.KV, spec *keys.VMSpec, node string) action {
	pl := keys.Placement{UID: specKV.CreateRevision, Node: node, Epoch: 1, UUID: uuid.NewString(), Since: time.Now().UTC(), By: c.cfg.Name, Term: g.Rev}
	setSpec(&pl, specKV.ModRevision, spec)
	asg := assignmentFor(&pl, spec)
	seen := c.seenAt(name)
	return action{
		vm:   name,
		what: "place",
		conds: []etcdutil.Cmp{
			etcdutil.ModRev(c.space.Placement(name), 0),
			etcdutil.ModRev(c.space.VMSpec(name), specKV.ModRevision),
			etcdutil.CreateRev(c.space.Assign(node, name), 0),
		},
		ops: []etcdutil.Op{
			etcdutil.OpPut(c.space.Placement(name), keys.MustEncode(&pl)),
			etcdutil.OpPut(c.space.Assign(node, name), keys.MustEncode(&asg)),
			etcdutil.OpDelete(c.space.Problem(name)),
		},
		after: func() {
			if !seen.IsZero() {
				c.m.placementSeconds.Observe(time.Since(seen).Seconds())
			}
			c.m.placements.Inc()
			c.events.Record("vm/"+name, "placed", "on %s (uid %d)", node, pl.UID)
		},
	}
}

func (c *Coordinator) seenAt(name string) time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.firstSeen[name]
}

// setSpec records in a placement which spec its node is given and what that reserves.
func setSpec(pl *keys.Placement, rev int64, spec *keys.VMSpec) {
	pl.SpecRev, pl.VCPUs, pl.MemoryMiB, pl.AntiAffinity = rev, spec.VCPUs, spec.MemoryMiB, spec.AntiAffinity
	ensureMACs(pl, spec)
}

func assignmentFor(pl *keys.Placement, spec *keys.VMSpec) keys.Assignment {
	return keys.Assignment{UID: pl.UID, Epoch: pl.Epoch, UUID: pl.UUID, SpecRev: pl.SpecRev, Spec: spec, MACs: pl.MACs}
}

// ensureMACs gives every NIC of the spec a MAC, keeping the ones the VM has: like the UUID, a
// VM's MACs never change.
func ensureMACs(pl *keys.Placement, spec *keys.VMSpec) {
	for len(pl.MACs) < len(spec.Networks) {
		b := uuid.New()
		// 52:54:00 is the prefix QEMU/KVM guests conventionally use.
		pl.MACs = append(pl.MACs, fmt.Sprintf("52:54:00:%02x:%02x:%02x", b[0], b[1], b[2]))
	}
}

// updateSpec hands a changed spec to the node running the VM.
func (c *Coordinator) updateSpec(g etcdutil.Guard, name string, v vmKeys, spec *keys.VMSpec, pl *keys.Placement) action {
	npl := *pl
	setSpec(&npl, v.spec.ModRevision, spec)
	npl.By, npl.Term = c.cfg.Name, g.Rev
	asg := assignmentFor(&npl, spec)
	return action{
		vm:   name,
		what: "update spec",
		conds: []etcdutil.Cmp{
			etcdutil.ModRev(c.space.Placement(name), v.placement.ModRevision),
			etcdutil.ModRev(c.space.VMSpec(name), v.spec.ModRevision),
		},
		ops: []etcdutil.Op{
			etcdutil.OpPut(c.space.Placement(name), keys.MustEncode(&npl)),
			etcdutil.OpPut(c.space.Assign(pl.Node, name), keys.MustEncode(&asg)),
			etcdutil.OpDelete(c.space.Problem(name)),
		},
	}
}

// unplace removes what the leader recorded for a VM that is gone (or gone as this uid): its
// placement, every assignment of the name, its problem record. The nodes remove the domains on the
// evidence that the spec is gone or belongs to a newer uid.
func (c *Coordinator) unplace(s *snapshotView, name string, v vmKeys, why string) []action {
	var acts []action
	if v.placement != nil {
		if v.placement.Err != nil {
			c.log.Error("unreadable placement of a deleted VM; remove it by hand", "vm", name, "key", v.placement.Key, "error", v.placement.Err)
			return nil
		}
		pl := v.placement.Obj.(*keys.Placement)
		acts = append(acts, action{
			vm:    name,
			what:  "unplace",
			conds: []etcdutil.Cmp{etcdutil.ModRev(c.space.Placement(name), v.placement.ModRevision)},
			ops:   []etcdutil.Op{etcdutil.OpDelete(c.space.Placement(name)), etcdutil.OpDelete(c.space.Problem(name))},
			after: func() {
				c.events.Record("vm/"+name, "unplaced", "uid %d removed from %s: %s", pl.UID, pl.Node, why)
			},
		})
	} else if v.problem != nil {
		acts = append(acts, c.clearProblem(name, v.problem))
	}
	for hwid, kv := range s.assigns[name] {
		if v.spec != nil && kv.Err == nil && kv.Obj.(*keys.Assignment).UID == v.spec.CreateRevision {
			continue // the new incarnation's
		}
		acts = append(acts, c.dropAssignment(name, hwid, kv, why))
	}
	return acts
}

// setProblem records why a VM is not where it should be, unless the same problem is recorded.
func (c *Coordinator) setProblem(name string, uid int64, cur *etcdutil.KV, kind, msg string, reasons map[string]int) (action, bool) {
	if cur != nil && cur.Err == nil {
		if p := cur.Obj.(*keys.Problem); p.UID == uid && p.Kind == kind && p.Message == msg {
			return action{}, false
		}
	}
	p := keys.Problem{UID: uid, Kind: kind, Message: msg, Reasons: reasons, Since: time.Now().UTC()}
	return action{
		vm:    name,
		what:  "record problem",
		conds: []etcdutil.Cmp{etcdutil.CreateRev(c.space.VMSpec(name), uid)},
		ops:   []etcdutil.Op{etcdutil.OpPut(c.space.Problem(name), keys.MustEncode(&p))},
		after: func() {
			c.log.Info("vm problem", "vm", name, "kind", kind, "message", msg)
			c.events.Record("vm/"+name, "problem", "%s: %s", kind, msg)
		},
	}, true
}

// checkShrink refuses a spec whose disk is smaller than the disk that exists: shrinking would cut
// the guest's filesystem. The VM keeps running under its last valid spec.
func (c *Coordinator) checkShrink(s *snapshotView, name string, uid int64, spec *keys.VMSpec) error {
	if c.cfg.Volumes == nil || spec.Disk == nil {
		return nil
	}
	kv := s.volumeFor(spec.Disk.Pool, keys.VolumeImage(name, uid))
	if kv == nil || kv.Err != nil {
		return nil
	}
	if rec := kv.Obj.(*keys.VolumeRecord); rec.SizeGiB > spec.Disk.SizeGiB {
		return keys.FieldErrors{{Field: "disk.size_gib", Message: fmt.Sprintf("refusing to shrink the disk from %d to %d GiB: the guest's filesystem would be cut", rec.SizeGiB, spec.Disk.SizeGiB)}}
	}
	return nil
}

// isProblem says whether a cached problem record is of kind.
func isProblem(kv *etcdutil.KV, kind string) bool {
	return kv.Err == nil && kv.Obj.(*keys.Problem).Kind == kind
}

func (c *Coordinator) clearProblem(name string, cur *etcdutil.KV) action {
	return action{
		vm:    name,
		what:  "clear problem",
		conds: []etcdutil.Cmp{etcdutil.ModRev(cur.Key, cur.ModRevision)},
		ops:   []etcdutil.Op{etcdutil.OpDelete(cur.Key)},
	}
}
