package coordinator

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/coordinator/fence"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

// Node loss, in the order that is the safety argument (docs/architecture.md):
//
//  1. the node key disappears; the leader checks the lease itself: a key deleted by hand (lease
//     alive) or a clean departure (the agent marked the key leaving) is not a death;
//  2. after the grace period, a fence record {phase: fencing} is written in a transaction guarded by
//     the election key AND the node key's absence: the commit point, after which any leader
//     finishes the job;
//  3. the fencer runs (retried with backoff; a failure leaves the VMs placed, with problem records);
//  4. {phase: fenced}; only then are the node's VMs placed elsewhere with epoch + 1, rate-limited.
//
// A burst of losses larger than the mass-failure guard allows stops step 2 until an operator
// confirms. Every step is level-triggered from etcd's state, so a new leader picks up where the
// last one stopped.

// nodeFate is what the round should do with VMs placed on a node.
type nodeFate struct {
	// move: the node's boot is fenced; its VMs go elsewhere.
	move bool
	// fence is the fence record's key and revision the move is conditioned on.
	fenceKey string
	fenceRev int64
	// osdEpoch is the osdmap epoch a Ceph fence came into force at.
	osdEpoch int64
	// stranded: the node is lost but not fenced; its VMs stay, with this problem.
	stranded string
}

// lastSeen returns the node's last registration as the leader recorded it.
func (s *snapshotView) lastSeen(hwid string) *keys.NodeState {
	if kv := s.states[hwid]; kv != nil && kv.Err == nil {
		return kv.Obj.(*keys.NodeState)
	}
	return nil
}

// fenceFor returns the fence record of one boot of a node.
func (s *snapshotView) fenceFor(hwid, boot string) *etcdutil.KV {
	for _, kv := range s.fences[hwid] {
		if kv.Err == nil && kv.Obj.(*keys.Fence).BootID == boot {
			return kv
		}
	}
	return nil
}

// bookkeeping keeps each node's state (the leader's record) in step: the live registration (boot,
// the lease etcd says the key hangs on, addresses), a clean departure, the capacity the node may
// offer, the migration address the leader vouches for, why a present key is not trusted, and the
// operator's image pin. One write per node, conditioned on the state as read.
func (c *Coordinator) bookkeeping(s *snapshotView) []action {
	muts := map[string][]func(*keys.NodeState) bool{}
	add := func(hwid string, f func(*keys.NodeState) bool) { muts[hwid] = append(muts[hwid], f) }
	for hwid, kv := range s.live {
		n, lease := kv.Obj.(*keys.Node), kv.Lease
		vouched := s.vouchMigration(hwid, n)
		add(hwid, func(ns *keys.NodeState) bool {
			changed := false
			addr := n.Addresses
			if ns.BootID != n.BootID || ns.Lease != lease || ns.Left || ns.Addresses == nil || ns.Addresses.Management != addr.Management || ns.Addresses.Storage != addr.Storage || ns.Addresses.Migration != addr.Migration {
				ns.BootID, ns.Lease, ns.Left, ns.Addresses = n.BootID, lease, false, &addr
				changed = true
			}
			if ns.Capacity == nil {
				// Trust on first use: what the node says at its first registration (unless the
				// hardware record says what to expect) is what it may offer from then on.
				ns.Capacity = &keys.Capacity{CPUs: n.CPUs, MemoryMiB: n.MemoryMiB}
				changed = true
			}
			if ns.MigrationIP != vouched {
				ns.MigrationIP = vouched
				changed = true
			}
			if ns.Capped != s.capped[hwid] || ns.Doubt != "" {
				ns.Capped, ns.Doubt = s.capped[hwid], ""
				changed = true
			}
			return changed
		})
	}
	for hwid, why := range s.untrusted {
		add(hwid, func(ns *keys.NodeState) bool {
			if ns.Doubt == why {
				return false
			}
			ns.Doubt = why
			return true
		})
	}
	c.mu.Lock()
	left := make(map[string]string, len(c.left))
	for k, v := range c.left {
		left[k] = v
	}
	c.mu.Unlock()
	for hwid, boot := range left {
		if _, alive := s.live[hwid]; alive {
			continue
		}
		add(hwid, func(ns *keys.NodeState) bool {
			if ns.BootID != boot || ns.Left {
				return false
			}
			ns.Left = true
			return true
		})
	}
	for hwid, kv := range s.specs {
		if kv.Err != nil {
			continue
		}
		pin := kv.Obj.(*keys.NodeSpec).Image
		add(hwid, func(ns *keys.NodeState) bool {
			if ns.PinApplied == pin {
				return false
			}
			// The operator changed the pin: it takes over from whatever a rollout set.
			ns.Image, ns.PinApplied = pin, pin
			return true
		})
	}
	var acts []action
	for hwid, fs := range muts {
		ns := keys.NodeState{}
		var rev int64
		if kv := s.states[hwid]; kv != nil {
			if kv.Err != nil {
				continue // an operator must fix it; never overwrite what we cannot read
			}
			cp, err := keys.Decode[keys.NodeState](kv.Value) // a copy: the cached object is shared
			if err != nil {
				continue
			}
			ns, rev = *cp, kv.ModRevision
		}
		prev := ns
		changed := false
		for _, f := range fs {
			if f(&ns) {
				changed = true
			}
		}
		if !changed {
			continue
		}
		id, after := hwid, ns
		acts = append(acts, action{vm: "node/" + hwid, what: "record node state",
			conds: []etcdutil.Cmp{etcdutil.ModRev(c.space.NodeState(hwid), rev)},
			ops:   []etcdutil.Op{etcdutil.OpPut(c.space.NodeState(hwid), keys.MustEncode(&ns))},
			after: func() { c.noteNodeState(id, &prev, &after) }})
	}
	return acts
}

// noteNodeState logs and records what changed in a node's state that an operator should know of.
func (c *Coordinator) noteNodeState(hwid string, prev, cur *keys.NodeState) {
	if cur.Doubt != "" && cur.Doubt != prev.Doubt {
		c.log.Warn("node key not trusted: the node counts as absent", "node", hwid, "why", cur.Doubt)
		c.events.Record("node/"+hwid, "untrusted", "%s: the node counts as absent", cur.Doubt)
	}
	if cur.Capped != "" && cur.Capped != prev.Capped {
		c.log.Warn("node capacity capped", "node", hwid, "why", cur.Capped)
		c.events.Record("node/"+hwid, "capacity-capped", "%s", cur.Capped)
	}
	if cur.Addresses != nil && cur.Addresses.Migration != "" && cur.MigrationIP == "" &&
		(prev.Addresses == nil || prev.Addresses.Migration != cur.Addresses.Migration || prev.MigrationIP != "") {
		c.log.Warn("migration address not vouched for: the node gets no migration certificate", "node", hwid, "address", cur.Addresses.Migration)
		c.events.Record("node/"+hwid, "migration-address-refused", "%s is held by another node or not the hardware record's migration_ip", cur.Addresses.Migration)
	}
	if cur.PinApplied != prev.PinApplied {
		c.events.Record("node/"+hwid, "pin-applied", "boots %q next (\"\" = the current image)", cur.Image)
	}
}

// vouchMigration is the live-migration address the leader vouches for on a node's behalf (the name
// its migration certificate may carry): the address the node registers, if it is the hardware
// record's migration_ip when that is set, and if no other node holds it.
func (s *snapshotView) vouchMigration(hwid string, n *keys.Node) string {
	addr := n.Addresses.Migration
	if addr == "" {
		return ""
	}
	if hw := s.hardware[hwid]; hw != nil && hw.MigrationIP != "" && hw.MigrationIP != addr {
		return ""
	}
	if s.migrationHolders()[addr] != hwid {
		return ""
	}
	return addr
}

// migrationHolders maps each migration address to the one node it may be vouched for: the node
// whose hardware record names it, else the node whose state holds it, else (nobody holds it yet)
// the first by id of the live nodes that register it. Computed once per round.
func (s *snapshotView) migrationHolders() map[string]string {
	if s.migHolders != nil {
		return s.migHolders
	}
	s.migHolders = map[string]string{}
	claims := map[string]string{}
	for hwid, kv := range s.live {
		ip := kv.Obj.(*keys.Node).Addresses.Migration
		if first, ok := claims[ip]; ip != "" && (!ok || hwid < first) {
			claims[ip] = hwid
		}
	}
	for hwid, kv := range s.states {
		if kv.Err == nil {
			if ip := kv.Obj.(*keys.NodeState).MigrationIP; ip != "" {
				claims[ip] = hwid
			}
		}
	}
	for hwid, hw := range s.hardware {
		if hw.MigrationIP != "" {
			claims[hw.MigrationIP] = hwid
		}
	}
	s.migHolders = claims
	return claims
}

// failover decides, per absent node, between waiting, holding, committing a fence, fencing and
// moving. It starts fencers in the background and returns the writes and each node's fate.
func (c *Coordinator) failover(ctx context.Context, g etcdutil.Guard, s *snapshotView, placedOn map[string][]string) ([]action, map[string]nodeFate) {
	var acts []action
	fates := map[string]nodeFate{}
	now := time.Now()

	// Absent nodes whose lease is really gone.
	var dead []string
	for hwid, kvs := range s.states {
		if kvs.Err != nil {
			continue
		}
		ns := kvs.Obj.(*keys.NodeState)
		if _, alive := s.live[hwid]; alive || ns.BootID == "" || ns.Left {
			c.forgetAbsence(hwid)
			continue
		}
		if s.fenceFor(hwid, ns.BootID) != nil {
			continue // committed already; handled below
		}
		if len(placedOn[hwid]) == 0 {
			continue // nothing to protect or move: it is just down
		}
		if c.leaseAlive(ctx, ns.Lease) {
			// The key went but the lease lives: deleted by hand, the agent puts it back.
			c.forgetAbsence(hwid)
			continue
		}
		dead = append(dead, hwid)
	}
	sort.Strings(dead)

	// The mass-failure guard, over every node found dead within the window.
	held := c.guardHeld(s)
	lost := c.noteLosses(dead, now)
	total := len(s.live) + len(lost)
	guardOn := len(lost) > c.cfg.MassFailureMin && float64(len(lost)) > c.cfg.MassFailureFraction*float64(total)
	if guardOn && s.guard == nil {
		gd := keys.LossGuard{Nodes: lost, Since: now.UTC()}
		acts = append(acts, action{vm: "cluster", what: "hold failover",
			conds: []etcdutil.Cmp{etcdutil.CreateRev(c.space.LossGuard(), 0)},
			ops:   []etcdutil.Op{etcdutil.OpPut(c.space.LossGuard(), keys.MustEncode(&gd))},
			after: func() {
				c.log.Error("mass node loss: fencing and rescheduling held until an operator confirms", "nodes", lost)
				c.events.Record("cluster", "failover-held", "%d of %d nodes lost within %s (%s): confirm with 'herdctl cluster confirm-loss'", len(lost), total, c.cfg.MassFailureWindow, strings.Join(lost, ", "))
			}})
		held = true
	}

	for _, hwid := range dead {
		ns := s.lastSeen(hwid)
		since := c.absentSince(hwid, now)
		switch {
		case held:
			fates[hwid] = nodeFate{stranded: "node lost; failover held by the mass-failure guard: confirm with 'herdctl cluster confirm-loss'"}
		case now.Sub(since) < c.cfg.Grace:
			c.pokeAfter(c.cfg.Grace - now.Sub(since))
		default:
			acts = append(acts, c.commitFence(g, s, hwid, ns.BootID))
		}
	}

	// Fence records: run fencers, and decide what their nodes' VMs do.
	for hwid, kvs := range s.fences {
		for _, kv := range kvs {
			if kv.Err != nil {
				continue
			}
			f := kv.Obj.(*keys.Fence)
			liveKV, alive := s.live[hwid]
			if (alive && liveKV.Obj.(*keys.Node).BootID != f.BootID) || f.Phase == keys.FenceClearing {
				// Rebooted (the old boot is surely dead) or cleared by an operator: undo the
				// fence (blocklist entries) and drop the record.
				c.startUnfence(ctx, g, kv, f)
				continue
			}
			switch f.Phase {
			case keys.FenceFenced:
				epoch, _ := strconv.ParseInt(f.Details[fence.DetailEpoch], 10, 64)
				fates[hwid] = nodeFate{move: true, fenceKey: kv.Key, fenceRev: kv.ModRevision, osdEpoch: epoch}
				c.startRenew(ctx, g, kv, f)
			case keys.FenceFencing, keys.FenceFailed:
				if f.Phase == keys.FenceFailed {
					fates[hwid] = nodeFate{stranded: fmt.Sprintf("node lost; fencing failed (%d attempts): %s; the VM stays placed until fencing succeeds", f.Attempts, f.Error)}
				} else {
					fates[hwid] = nodeFate{stranded: "node lost; fencing in progress"}
				}
				if !held || s.guardConfirmed() {
					c.startFencer(ctx, g, s, kv, f, placedOn[hwid])
				}
			}
		}
	}
	if s.guardConfirmed() {
		// Confirmed: clear the guard once each listed node is fenced or back.
		done := true
		for _, hwid := range s.guard.Obj.(*keys.LossGuard).Nodes {
			if _, alive := s.live[hwid]; alive {
				continue
			}
			if f := fates[hwid]; !f.move {
				done = false
			}
		}
		if done {
			listed := s.guard.Obj.(*keys.LossGuard).Nodes
			acts = append(acts, action{vm: "cluster", what: "release failover guard",
				conds: []etcdutil.Cmp{etcdutil.ModRev(s.guard.Key, s.guard.ModRevision)},
				ops:   []etcdutil.Op{etcdutil.OpDelete(s.guard.Key)},
				after: func() {
					// Confirmed losses no longer count towards a new hold.
					c.mu.Lock()
					for _, hwid := range listed {
						delete(c.lostAt, hwid)
					}
					c.mu.Unlock()
					c.events.Record("cluster", "failover-released", "all confirmed nodes fenced or back")
				}})
		}
	}
	return acts, fates
}

// guardHeld reports whether the mass-failure guard stops failover now.
func (c *Coordinator) guardHeld(s *snapshotView) bool {
	return s.guard != nil && !s.guardConfirmed()
}

func (s *snapshotView) guardConfirmed() bool {
	return s.guard != nil && s.guard.Err == nil && s.guard.Obj.(*keys.LossGuard).Confirmed
}

// noteLosses remembers when each node was first found dead and returns those within the window.
func (c *Coordinator) noteLosses(dead []string, now time.Time) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, hwid := range dead {
		if _, ok := c.lostAt[hwid]; !ok {
			c.lostAt[hwid] = now
		}
	}
	var out []string
	for hwid, at := range c.lostAt {
		if now.Sub(at) <= c.cfg.MassFailureWindow {
			out = append(out, hwid)
		} else {
			delete(c.lostAt, hwid)
		}
	}
	sort.Strings(out)
	return out
}

func (c *Coordinator) absentSince(hwid string, now time.Time) time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	if t, ok := c.absent[hwid]; ok {
		return t
	}
	c.absent[hwid] = now
	return now
}

func (c *Coordinator) forgetAbsence(hwid string) {
	c.mu.Lock()
	delete(c.absent, hwid)
	c.mu.Unlock()
}

// pokeAfter asks for a round after d (the end of a grace period).
func (c *Coordinator) pokeAfter(d time.Duration) {
	time.AfterFunc(d+50*time.Millisecond, func() { c.poke("", nil, nil) })
}

// leaseAlive asks etcd whether a lease still lives. An error counts as alive: not knowing is never
// a reason to declare a node dead.
func (c *Coordinator) leaseAlive(ctx context.Context, id int64) bool {
	if id == 0 {
		return false
	}
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	resp, err := c.cfg.Client.TimeToLive(cctx, clientv3.LeaseID(id))
	if err != nil {
		c.log.Warn("lease check failed; assuming alive", "lease", fmt.Sprintf("%x", id), "error", err)
		return true
	}
	return resp.TTL > 0
}

// commitFence writes the fence record: the commit point of the boot's death. It holds only while
// the node has no trusted registration: its key absent, or exactly the untrusted key the round
// judged (no lease, or a lease too long), so a node that came back in time is never fenced.
func (c *Coordinator) commitFence(g etcdutil.Guard, s *snapshotView, hwid, boot string) action {
	f := keys.Fence{HWID: hwid, BootID: boot, Phase: keys.FenceFencing, Method: c.cfg.Fencer.Name(),
		Started: time.Now().UTC(), Updated: time.Now().UTC(), By: c.cfg.Name}
	key := c.space.Fence(hwid, boot)
	nodeCond := etcdutil.CreateRev(c.space.Node(hwid), 0)
	if kv := s.keys[hwid]; kv != nil && s.untrusted[hwid] != "" {
		nodeCond = etcdutil.ModRev(kv.Key, kv.ModRevision)
	}
	return action{vm: "node/" + hwid, what: "commit fence",
		conds: []etcdutil.Cmp{nodeCond, etcdutil.CreateRev(key, 0)},
		ops:   []etcdutil.Op{etcdutil.OpPut(key, keys.MustEncode(&f))},
		after: func() {
			c.log.Warn("node lost: fencing", "node", hwid, "boot_id", boot, "method", f.Method)
			c.events.Record("node/"+hwid, "lost", "boot %s lost its lease; fencing with %s", boot, f.Method)
			c.m.nodesLost.Inc()
		}}
}

// fenceBackoff is the wait before retrying a failed fencer.
func fenceBackoff(attempts int) time.Duration {
	d := time.Second << min(attempts, 6)
	return min(d, time.Minute)
}

// startFencer runs the fencer for one record in the background (one at a time per record) and
// records the outcome by compare-and-swap under the leader guard.
func (c *Coordinator) startFencer(ctx context.Context, g etcdutil.Guard, s *snapshotView, kv *etcdutil.KV, f *keys.Fence, vms []string) {
	if f.Phase == keys.FenceFailed {
		if wait := fenceBackoff(f.Attempts) - time.Since(f.Updated); wait > 0 {
			c.pokeAfter(wait)
			return
		}
	}
	c.mu.Lock()
	// One run per record revision: the record changes when a run ends, so a round that still sees
	// the old revision (its cache not caught up yet) does not start the same run again.
	if c.fencing[kv.Key] || c.fencedRev[kv.Key] == kv.ModRevision {
		c.mu.Unlock()
		return
	}
	c.fencing[kv.Key] = true
	c.fencedRev[kv.Key] = kv.ModRevision
	c.mu.Unlock()

	t := fence.Target{HWID: f.HWID, BootID: f.BootID, VMs: vms, Disks: s.disksOf(vms)}
	if ns := s.lastSeen(f.HWID); ns != nil && ns.Addresses != nil {
		t.Addresses = *ns.Addresses
	}
	if hw := s.hardware[f.HWID]; hw != nil {
		t.StorageIP, t.Labels = hw.StorageIP, hw.Labels
	}
	go func() {
		defer func() {
			c.mu.Lock()
			delete(c.fencing, kv.Key)
			c.mu.Unlock()
			c.poke("", nil, nil)
		}()
		details, err := c.cfg.Fencer.Fence(ctx, t)
		if ctx.Err() != nil {
			return // leadership ended: the next leader runs it again
		}
		nf := *f
		nf.Attempts++
		nf.Updated = time.Now().UTC()
		nf.By = c.cfg.Name
		if err != nil {
			nf.Phase, nf.Error = keys.FenceFailed, err.Error()
			c.log.Error("fencing failed; the node's VMs stay placed", "node", f.HWID, "boot_id", f.BootID, "attempt", nf.Attempts, "error", err)
			c.events.Record("node/"+f.HWID, "fence-failed", "attempt %d: %v", nf.Attempts, err)
			c.m.fenceFailures.Inc()
		} else {
			nf.Phase, nf.Error, nf.Details = keys.FenceFenced, "", details
			c.log.Warn("node fenced: moving its VMs", "node", f.HWID, "boot_id", f.BootID, "method", f.Method)
			c.events.Record("node/"+f.HWID, "fenced", "boot %s fenced with %s; %d VMs to move", f.BootID, f.Method, len(vms))
		}
		if _, err := etcdutil.GuardedTxn(ctx, c.cfg.Client, g,
			[]etcdutil.Cmp{etcdutil.ModRev(kv.Key, kv.ModRevision)},
			[]etcdutil.Op{etcdutil.OpPut(kv.Key, keys.MustEncode(&nf))}); err != nil {
			c.log.Warn("could not record the fence outcome", "node", f.HWID, "error", err)
		}
	}()
}

// move places a VM of a fenced node on another node: epoch + 1, the new node's assignment, and the
// old node's assignment and status removed, all in one transaction that also requires the fence
// record to be exactly the fenced one read.
func (c *Coordinator) move(g etcdutil.Guard, name string, v vmKeys, spec *keys.VMSpec, pl *keys.Placement, to string, fate nodeFate) action {
	npl := *pl
	npl.Node, npl.Epoch, npl.Since, npl.By, npl.Term = to, pl.Epoch+1, time.Now().UTC(), c.cfg.Name, g.Rev
	setSpec(&npl, v.spec.ModRevision, spec)
	asg := assignmentFor(&npl, spec)
	asg.MinOSDMapEpoch = fate.osdEpoch
	from := pl.Node
	return action{vm: name, what: "move",
		conds: []etcdutil.Cmp{
			etcdutil.ModRev(c.space.Placement(name), v.placement.ModRevision),
			etcdutil.ModRev(c.space.VMSpec(name), v.spec.ModRevision),
			etcdutil.ModRev(fate.fenceKey, fate.fenceRev),
		},
		ops: []etcdutil.Op{
			etcdutil.OpPut(c.space.Placement(name), keys.MustEncode(&npl)),
			etcdutil.OpPut(c.space.Assign(to, name), keys.MustEncode(&asg)),
			etcdutil.OpDelete(c.space.Assign(from, name)),
			etcdutil.OpDelete(c.space.Status(from, name)),
			etcdutil.OpDelete(c.space.Problem(name)),
		},
		after: func() {
			c.m.moves.Inc()
			c.events.Record("vm/"+name, "moved", "from fenced %s to %s (epoch %d)", from, to, npl.Epoch)
		}}
}

// disksOf lists the shared-storage disks (pool/image) of VMs.
func (s *snapshotView) disksOf(vms []string) []string {
	var out []string
	for _, name := range vms {
		v, ok := s.vms[name]
		if !ok || v.spec == nil || v.spec.Err != nil {
			continue
		}
		if d := v.spec.Obj.(*keys.VMSpec).Disk; d != nil {
			out = append(out, d.Pool+"/"+keys.VolumeImage(name, v.spec.CreateRevision))
		}
	}
	return out
}

// background runs fn once per key at a time, then pokes a round.
func (c *Coordinator) background(key string, fn func()) {
	c.mu.Lock()
	if c.fencing[key] {
		c.mu.Unlock()
		return
	}
	c.fencing[key] = true
	c.mu.Unlock()
	go func() {
		defer func() {
			c.mu.Lock()
			delete(c.fencing, key)
			c.mu.Unlock()
			c.poke("", nil, nil)
		}()
		fn()
	}()
}

// startUnfence undoes a fence (removes Ceph blocklist entries) and deletes its record.
func (c *Coordinator) startUnfence(ctx context.Context, g etcdutil.Guard, kv *etcdutil.KV, f *keys.Fence) {
	c.background(kv.Key+"#unfence", func() {
		if u, ok := c.cfg.Fencer.(fence.Unfencer); ok && len(f.Details) > 0 {
			if err := u.Unfence(ctx, f.Details); err != nil {
				c.log.Warn("could not undo the fence; retrying", "node", f.HWID, "boot_id", f.BootID, "error", err)
				c.pokeAfter(5 * time.Second)
				return
			}
		}
		if _, err := etcdutil.GuardedTxn(ctx, c.cfg.Client, g,
			[]etcdutil.Cmp{etcdutil.ModRev(kv.Key, kv.ModRevision)}, []etcdutil.Op{etcdutil.OpDelete(kv.Key)}); err == nil {
			c.log.Info("fence cleared", "node", f.HWID, "boot_id", f.BootID)
			c.events.Record("node/"+f.HWID, "fence-cleared", "fence of boot %s (%s) undone and dropped", f.BootID, f.Phase)
		}
	})
}

// startRenew renews a standing fence (Ceph blocklist entries) before it expires.
func (c *Coordinator) startRenew(ctx context.Context, g etcdutil.Guard, kv *etcdutil.KV, f *keys.Fence) {
	r, ok := c.cfg.Fencer.(fence.Renewer)
	if !ok || !r.RenewDue(f.Details) {
		return
	}
	c.background(kv.Key+"#renew", func() {
		d, err := r.Renew(ctx, f.Details)
		if err != nil {
			c.log.Warn("could not renew the fence", "node", f.HWID, "error", err)
			return
		}
		nf := *f
		nf.Details, nf.Updated = d, time.Now().UTC()
		_, _ = etcdutil.GuardedTxn(ctx, c.cfg.Client, g,
			[]etcdutil.Cmp{etcdutil.ModRev(kv.Key, kv.ModRevision)}, []etcdutil.Op{etcdutil.OpPut(kv.Key, keys.MustEncode(&nf))})
	})
}
