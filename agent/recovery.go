package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

// etcd restored from a backup (docs/architecture.md, "etcd restored from a backup").
//
// After a restore the keyspace describes the past: assignments of VMs that have since moved (the
// node would start a second copy), no specs for VMs created since (the node would destroy them as
// deleted), specs of VMs deleted since. Nothing the restored records say is evidence of anything
// until the leader has heard from every node what actually runs and rewritten the records to it.
// So the moment this agent sees etcd's revision go back, or the cluster record says a restore
// recovery is collecting, it freezes: it starts, stops, defines and destroys nothing, and publishes
// an inventory of every herd domain here in its node record. It thaws when the cluster record says
// the recovery it asked for is done, and only once its caches reflect the recovery's writes.

// onRegress is told by a cache that etcd answered at a revision older than one it had seen. It
// runs before the cache hands on the restored keys, so nothing is acted on from them.
func (a *Agent) onRegress(was, now int64) {
	want := a.maxGen.Load() + 1
	if r := a.cluster.Get(a.space.Cluster()); r.OK() && r.Value.Collecting() && int64(r.Value.Restore.Generation) == want-1 {
		// A recovery is collecting already (another daemon noticed first): it hears from this
		// node too, and asking for the next one would only run a second recovery after it.
		want--
	}
	for {
		cur := a.restoreWant.Load()
		if cur >= want || a.restoreWant.CompareAndSwap(cur, want) {
			break
		}
	}
	if !a.freeze.Swap(true) {
		a.log.Error("etcd's revision went back (restored from a backup?): freezing every domain as it is until the leader's restore recovery is done",
			"seen", was, "now", now, "recovery", want)
		a.events.Record("node/"+a.hwid, "frozen", "etcd answered at revision %d after %d: nothing is started or destroyed until restore recovery %d is done", now, was, want)
	}
	a.wakeRecovery()
}

// checkWatermark compares etcd, as the cluster cache first listed it, with the newest revision an
// earlier run of this agent saw (its watermark file): etcd restored from a backup while the agent
// was down (or restarting) is noticed here, before any assignment is read. It runs once, after the
// cluster record is cached and before the assignments are.
func (a *Agent) checkWatermark() {
	m := a.mark.Loaded()
	r := a.cluster.Get(a.space.Cluster())
	if !r.OK() {
		return
	}
	if now := a.cluster.Rev(); m.WentBack(r.Value.ID, r.Value.RestoreGeneration(), now) {
		a.log.Error("etcd is behind what this agent saw before it restarted", "saved", m.Saved, "revision", m.Revision,
			"recovery", m.Generation, "now", now, "now_recovery", r.Value.RestoreGeneration())
		a.onRegress(m.Revision, now)
	}
}

// noteRevision keeps the watermark: etcd answered a request (a keepalive) at rev.
func (a *Agent) noteRevision(rev int64) {
	r := a.cluster.Get(a.space.Cluster())
	if !r.OK() || a.freeze.Load() {
		return // frozen: etcd may be a restored past; the watermark keeps what was seen before
	}
	if err := a.mark.Note(r.Value.ID, r.Value.RestoreGeneration(), rev); err != nil {
		a.log.Warn("cannot keep the revision watermark", "error", err)
	}
}

func (a *Agent) wakeRecovery() {
	select {
	case a.recoveryWake <- struct{}{}:
	default:
	}
}

// noteCluster follows the cluster record's restore generation and freezes at once when a recovery
// is collecting.
func (a *Agent) noteCluster(cl *keys.Cluster) {
	if g := int64(cl.RestoreGeneration()); g > a.maxGen.Load() {
		a.maxGen.Store(g)
	}
	if cl.Collecting() && !a.freeze.Swap(true) {
		a.log.Warn("a restore recovery is collecting the nodes' inventories: freezing every domain as it is", "recovery", cl.Restore.Generation)
	}
	a.wakeRecovery()
}

// wantFrozen says whether the agent must stay frozen, and why.
func (a *Agent) wantFrozen() (bool, string) {
	var cl *keys.Cluster
	if r := a.cluster.Get(a.space.Cluster()); r.OK() {
		cl = r.Value
	}
	if cl != nil && cl.Collecting() {
		return true, fmt.Sprintf("restore recovery %d is collecting the nodes' inventories", cl.Restore.Generation)
	}
	if want := int(a.restoreWant.Load()); want > 0 && (cl == nil || cl.RestoreGeneration() < want || cl.Restore.Phase != keys.RestoreDone) {
		return true, fmt.Sprintf("etcd went back in time: waiting for the leader's restore recovery %d", want)
	}
	return false, ""
}

// recoveryLoop publishes the inventory while frozen and thaws when the recovery is done.
func (a *Agent) recoveryLoop(ctx context.Context) {
	// Only a frozen agent has anything to retry (an inventory to publish, a thaw to finish, the
	// inventory to withdraw); otherwise only a change of the cluster record or the revision wakes
	// it: at 10,000 agents in one simulator, a tick each second was 10,000 idle wakeups a second.
	retry := time.NewTimer(time.Second)
	defer retry.Stop()
	for {
		a.recoveryStep(ctx)
		var again <-chan time.Time
		if cur := a.node.Load(); a.freeze.Load() || (cur != nil && cur.Recovery != nil) {
			retry.Reset(time.Second)
			again = retry.C
		}
		select {
		case <-ctx.Done():
			return
		case <-again:
		case <-a.recoveryWake:
		}
	}
}

func (a *Agent) recoveryStep(ctx context.Context) {
	if frozen, why := a.wantFrozen(); frozen {
		a.freeze.Store(true)
		a.metrics.frozen.Set(1)
		inv, err := a.inventory(ctx)
		if err != nil {
			a.log.Warn("cannot list domains for the restore inventory; retrying", "why", why, "error", err)
			return
		}
		a.publish(ctx, inv)
		return
	}
	if !a.freeze.Load() {
		if cur := a.node.Load(); cur != nil && cur.Recovery != nil {
			a.publish(ctx, nil)
		}
		return
	}
	// Thawing: the caches must first reflect everything the recovery wrote, which came before
	// the cluster record said it is done; a stale cached assignment must not be acted on.
	r := a.cluster.Get(a.space.Cluster())
	if r == nil {
		return
	}
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for _, inf := range []*etcdutil.Informer{a.assigns.Informer, a.fences.Informer, a.cmdsInf.Informer} {
		if err := inf.Sync(sctx, r.ModRevision); err != nil {
			a.log.Warn("restore recovery is done, but the caches are not current yet; staying frozen", "error", err)
			return
		}
	}
	a.freeze.Store(false)
	a.metrics.frozen.Set(0)
	a.log.Info("restore recovery is done: acting on the records again", "recovery", a.maxGen.Load())
	a.events.Record("node/"+a.hwid, "thawed", "restore recovery %d done", a.maxGen.Load())
	a.publish(ctx, nil)
	a.enqueueAll(ctx)
	a.enqueueReported(ctx)
}

// frozenNow says whether the agent is frozen; reconcile then does nothing at all.
func (a *Agent) frozenNow() bool { return a.freeze.Load() }

// inventory lists every herd domain here.
func (a *Agent) inventory(ctx context.Context) (*keys.Inventory, error) {
	doms, err := a.hv.List(ctx)
	if err != nil {
		return nil, err
	}
	inv := &keys.Inventory{Wants: int(a.restoreWant.Load()), Domains: []keys.InventoryDomain{}}
	if r := a.cluster.Get(a.space.Cluster()); r.OK() && r.Value.Collecting() {
		inv.Generation = r.Value.Restore.Generation
	}
	for _, d := range doms {
		if d.Managed {
			inv.Domains = append(inv.Domains, keys.InventoryDomain{Name: d.Name, UID: d.UID, Epoch: d.Epoch, UUID: d.UUID, State: herdState(d.State)})
		}
	}
	sort.Slice(inv.Domains, func(i, j int) bool { return inv.Domains[i].Name < inv.Domains[j].Name })
	return inv, nil
}

// publish writes the node record with inv (nil: none) under the current lease, unless it says so
// already. Registering again (a new lease) carries the latest inventory too.
func (a *Agent) publish(ctx context.Context, inv *keys.Inventory) {
	a.inv.Store(inv)
	if a.publishNode(ctx) && inv != nil {
		a.log.Info("restore inventory published", "domains", len(inv.Domains), "recovery", inv.Generation, "wants", inv.Wants)
	}
}

// publishNode writes the node record again under the current lease if what the agent has to say
// in it (the restore inventory, a problem of the hypervisor) changed. It reports whether it wrote.
func (a *Agent) publishNode(ctx context.Context) bool {
	a.pubMu.Lock()
	defer a.pubMu.Unlock()
	cur, lease := a.node.Load(), clientv3.LeaseID(a.leaseID.Load())
	inv, problem := a.inv.Load(), a.problem()
	if cur == nil || lease == 0 || !a.leaseAlive() || (sameJSON(cur.Recovery, inv) && cur.Problem == problem) {
		return false
	}
	n := *cur
	n.Recovery, n.Problem = inv, problem
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	if _, err := a.cfg.Client.Put(cctx, a.space.Node(a.hwid), keys.MustEncode(&n), clientv3.WithLease(lease)); err != nil {
		a.log.Warn("cannot update the node record; retrying", "error", err)
		return false
	}
	a.node.Store(&n)
	return true
}

// problem is what keeps this node from running VMs now ("" when nothing does).
func (a *Agent) problem() string {
	if p := a.hvProblem.Load(); p != nil {
		return *p
	}
	if p := a.diskProblem.Load(); p != nil {
		return *p
	}
	return ""
}

// hypervisorHealth follows whether libvirtd answers: while it does not, the node registers the
// problem and the leader schedules nothing here; its guests keep running (they outlive
// libvirtd), and once it answers again the agent reconnects and adopts them as they are.
func (a *Agent) hypervisorHealth(ctx context.Context, err error) {
	if ctx.Err() != nil {
		return // stopping: the error says nothing about libvirtd
	}
	var now string
	if err != nil {
		now = "libvirtd does not answer: " + err.Error()
	}
	was := a.problem()
	if (was == "") == (now == "") {
		return
	}
	if now == "" {
		a.hvProblem.Store(nil)
		a.log.Info("libvirtd answers again: the node takes VMs again")
		a.events.Record("node/"+a.hwid, "libvirtd-back", "libvirtd answers again")
	} else {
		a.hvProblem.Store(&now)
		a.log.Error("libvirtd does not answer: the node takes no VMs until it does; guests keep running", "error", err)
		a.events.Record("node/"+a.hwid, "libvirtd-down", "%v", err)
	}
	a.publishNode(ctx)
}

func sameJSON(x, y *keys.Inventory) bool {
	if x == nil || y == nil {
		return x == y
	}
	bx, _ := json.Marshal(x)
	by, _ := json.Marshal(y)
	return string(bx) == string(by)
}
