package decide

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/herdhq/herd/coordinator/fence"
	"github.com/herdhq/herd/lib/keys"
)

// Node loss, in the order that is the safety argument (docs/architecture.md):
//
//  1. the node's registration disappears (its key goes, or is no longer trusted); the leader
//     checks the lease itself: a key deleted by hand (lease alive) or a clean departure (the agent
//     marked the key leaving) is not a death;
//  2. after the grace period, a fence record {phase: fencing} is written in a transaction guarded by
//     the election key AND the node's registration being as judged: the commit point, after which
//     any leader finishes the job;
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
	// fenceKey and fenceRev are the fence record the move is conditioned on.
	fenceKey string
	fenceRev int64
	// osdEpoch is the osdmap epoch a Ceph fence came into force at.
	osdEpoch int64
	// stranded: the node is lost but not fenced; its VMs stay, with this problem.
	stranded string
}

// FenceBackoff is the wait before retrying a failed fencer.
func FenceBackoff(attempts int) time.Duration {
	d := time.Second << min(attempts, 6)
	return min(d, time.Minute)
}

// failover decides, per absent node, between waiting, holding, committing a fence, fencing and
// moving. It returns the writes (side work goes to the plan) and each node's fate.
func (s *view) failover(placedOn map[string][]string) ([]Action, map[string]nodeFate) {
	var acts []Action
	fates := map[string]nodeFate{}
	now := s.Now

	// Absent nodes whose lease is really gone.
	var dead []string
	for _, hwid := range sortedNames(s.States) {
		r := s.States[hwid]
		if r.Err != nil {
			continue
		}
		ns := r.Value
		if _, alive := s.live[hwid]; alive || ns.BootID == "" || ns.Left {
			delete(s.st.Absent, hwid)
			continue
		}
		if s.fenceFor(hwid, ns.BootID) != nil {
			continue // committed already; handled below
		}
		if len(placedOn[hwid]) == 0 {
			continue // nothing to protect or move: it is just down
		}
		if s.leaseAlive(ns.Lease) {
			// The key went but the lease lives: deleted by hand, the agent puts it back.
			delete(s.st.Absent, hwid)
			continue
		}
		dead = append(dead, hwid)
	}

	// The mass-failure guard, over every node found dead within the window.
	lost := s.noteLosses(dead)
	total := len(s.live) + len(lost)
	guardOn := len(lost) > s.cfg.MassFailureMin && float64(len(lost)) > s.cfg.MassFailureFraction*float64(total)
	if guardOn && s.Guard == nil {
		gd := keys.LossGuard{Nodes: lost, Since: now.UTC()}
		acts = append(acts, Action{Object: "cluster", What: "hold failover",
			Conds:  []Cond{CreateRev(s.cfg.Space.LossGuard(), 0)},
			Writes: []Write{Put(s.cfg.Space.LossGuard(), keys.MustEncode(&gd))},
			Notes: []Note{{Level: Error, Log: "mass node loss: fencing and rescheduling held until an operator confirms", Args: []any{"nodes", lost},
				Object: "cluster", Event: "failover-held", Message: fmt.Sprintf("%d of %d nodes lost within %s (%s): confirm with 'herdctl cluster confirm-loss'", len(lost), total, s.cfg.MassFailureWindow, strings.Join(lost, ", "))}}})
	}
	acts = append(acts, s.growGuard(dead)...)
	held := s.heldByGuard(guardOn)

	for _, hwid := range dead {
		ns := s.lastSeen(hwid)
		since, seen := s.st.Absent[hwid]
		if !seen {
			since = now
			s.st.Absent[hwid] = now
		}
		switch {
		case held(hwid) && s.guardConfirmed():
			fates[hwid] = nodeFate{stranded: "node lost after a confirmed mass loss; held until the confirmed nodes are fenced, then judged anew"}
		case held(hwid):
			fates[hwid] = nodeFate{stranded: "node lost; failover held by the mass-failure guard: confirm with 'herdctl cluster confirm-loss'"}
		case now.Sub(since) < s.cfg.Grace:
			s.after(s.cfg.Grace - now.Sub(since))
		default:
			acts = append(acts, s.commitFence(hwid, ns.BootID))
		}
	}

	// Fence records: run fencers, and decide what their nodes' VMs do.
	for _, hwid := range sortedNames(s.Fences) {
		for _, r := range s.Fences[hwid] {
			if r.Err != nil {
				continue
			}
			f := r.Value
			if n := s.live[hwid]; (n != nil && n.Value.BootID != f.BootID) || f.Phase == keys.FenceClearing {
				// Rebooted (the old boot is surely dead) or cleared by an operator: undo the
				// fence (blocklist entries) and drop the record.
				s.plan.Work = append(s.plan.Work, Work{Kind: Unfence, Key: r.Key + "#unfence", Rev: r.ModRevision, Fence: f})
				continue
			}
			switch f.Phase {
			case keys.FenceFenced:
				epoch, _ := strconv.ParseInt(f.Details[fence.DetailEpoch], 10, 64)
				fates[hwid] = nodeFate{move: true, fenceKey: r.Key, fenceRev: r.ModRevision, osdEpoch: epoch}
				s.plan.Work = append(s.plan.Work, Work{Kind: Renew, Key: r.Key + "#renew", Rev: r.ModRevision, Fence: f})
			case keys.FenceFencing, keys.FenceFailed:
				if f.Phase == keys.FenceFailed {
					fates[hwid] = nodeFate{stranded: fmt.Sprintf("node lost; fencing failed (%d attempts): %s; the VM stays placed until fencing succeeds", f.Attempts, f.Error)}
				} else {
					fates[hwid] = nodeFate{stranded: "node lost; fencing in progress"}
				}
				if !held(hwid) {
					s.startFencer(r, placedOn[hwid])
				}
			}
		}
	}
	if s.guardConfirmed() {
		// Confirmed: clear the guard once each listed node is fenced or back.
		done := true
		listed := s.Guard.Value.Nodes
		for _, hwid := range listed {
			if _, alive := s.live[hwid]; alive {
				continue
			}
			if f := fates[hwid]; !f.move {
				done = false
			}
		}
		if done {
			// Confirmed losses no longer count towards a new hold.
			for _, hwid := range listed {
				delete(s.st.LostAt, hwid)
			}
			acts = append(acts, Action{Object: "cluster", What: "release failover guard",
				Conds: []Cond{ModRev(s.Guard.Key, s.Guard.ModRevision)}, Writes: []Write{Del(s.Guard.Key)},
				Notes: []Note{event("cluster", "failover-released", "all confirmed nodes fenced or back")}})
		}
	}
	return acts, fates
}

func (s *view) guardConfirmed() bool { return s.Guard.OK() && s.Guard.Value.Confirmed }

// heldByGuard says, per node, whether the guard holds its failover. An unconfirmed guard holds
// every loss, listed or not. A confirmed one lets its listed nodes go; a node lost after the
// confirmation (the operator did not see it) is held while the losses within the window still
// make a mass failure, and judged anew once the confirmed nodes are done and the guard released,
// so that a fencer failing on one confirmed node cannot hold an unrelated later loss forever. A
// guard written this round (guardOn, none read yet) holds all.
func (s *view) heldByGuard(guardOn bool) func(hwid string) bool {
	if s.Guard == nil {
		return func(string) bool { return guardOn }
	}
	if !s.guardConfirmed() {
		return func(string) bool { return true }
	}
	listed := s.guardListed()
	return func(hwid string) bool { return guardOn && !listed[hwid] }
}

// guardListed is the set of nodes the (readable) guard record lists.
func (s *view) guardListed() map[string]bool {
	listed := map[string]bool{}
	for _, hwid := range s.Guard.Value.Nodes {
		listed[hwid] = true
	}
	return listed
}

// growGuard adds nodes lost while failover is held to the guard's list, so that the record (and
// herdctl cluster show) names every node waiting for the operator, not only the first ones. A
// confirmed guard no longer grows: what was confirmed stays what the operator saw, and later losses
// wait for its release and a new guard (or, below the threshold then, the grace period).
func (s *view) growGuard(dead []string) []Action {
	g := s.Guard
	if !g.OK() || g.Value.Confirmed {
		return nil
	}
	listed := s.guardListed()
	var added []string
	for _, hwid := range dead {
		if !listed[hwid] {
			added = append(added, hwid)
		}
	}
	if len(added) == 0 {
		return nil
	}
	gd := *g.Value
	gd.Nodes = append(append([]string(nil), gd.Nodes...), added...)
	sort.Strings(gd.Nodes)
	return []Action{{Object: "cluster", What: "grow failover guard",
		Conds:  []Cond{ModRev(g.Key, g.ModRevision)},
		Writes: []Write{Put(g.Key, keys.MustEncode(&gd))},
		Notes: []Note{{Level: Error, Log: "more nodes lost while failover is held", Args: []any{"nodes", added, "listed", len(gd.Nodes)},
			Object: "cluster", Event: "failover-held", Message: fmt.Sprintf("%d more nodes lost while failover is held (%s); %d listed: confirm with 'herdctl cluster confirm-loss'", len(added), strings.Join(added, ", "), len(gd.Nodes))}}}}
}

// leaseAlive says whether etcd still has a lease; not knowing counts as alive: it is never a reason
// to declare a node dead.
func (s *view) leaseAlive(id int64) bool {
	if id == 0 {
		return false
	}
	alive, known := s.LeaseAlive[id]
	return alive || !known
}

// noteLosses remembers when each node was first found dead and returns those within the window.
func (s *view) noteLosses(dead []string) []string {
	for _, hwid := range dead {
		if _, ok := s.st.LostAt[hwid]; !ok {
			s.st.LostAt[hwid] = s.Now
		}
	}
	var out []string
	for hwid, at := range s.st.LostAt {
		if s.Now.Sub(at) <= s.cfg.MassFailureWindow {
			out = append(out, hwid)
		} else {
			delete(s.st.LostAt, hwid)
		}
	}
	sort.Strings(out)
	return out
}

// commitFence writes the fence record: the commit point of the boot's death. It holds only while
// the node has no trusted registration: its key absent, or exactly the untrusted key the round
// judged (no lease, or a lease too long), so a node that came back in time is never fenced.
func (s *view) commitFence(hwid, boot string) Action {
	sp := s.cfg.Space
	f := keys.Fence{HWID: hwid, BootID: boot, Phase: keys.FenceFencing, Method: s.cfg.FencerName,
		Started: s.Now.UTC(), Updated: s.Now.UTC(), By: s.cfg.Name}
	key := sp.Fence(hwid, boot)
	nodeCond := CreateRev(sp.Node(hwid), 0)
	if r := s.Nodes[hwid]; r != nil && s.doubt[hwid] != "" {
		nodeCond = ModRev(r.Key, r.ModRevision)
	}
	return Action{Object: "node/" + hwid, What: "commit fence",
		Conds: []Cond{nodeCond, CreateRev(key, 0)}, Writes: []Write{Put(key, keys.MustEncode(&f))},
		Notes: []Note{{Level: Warn, Log: "node lost: fencing", Args: []any{"node", hwid, "boot_id", boot, "method", f.Method},
			Object: "node/" + hwid, Event: "lost", Message: fmt.Sprintf("boot %s lost its lease; fencing with %s", boot, f.Method)}},
		Metrics: []Metric{MetricNodeLost}}
}

// startFencer asks for the fencer to run on a record (once per record revision, one at a time),
// unless a failed run is still backing off.
func (s *view) startFencer(r *rec[keys.Fence], vms []string) {
	f := r.Value
	if f.Phase == keys.FenceFailed {
		if wait := FenceBackoff(f.Attempts) - s.Now.Sub(f.Updated); wait > 0 {
			s.after(wait)
			return
		}
	}
	sort.Strings(vms)
	t := fence.Target{HWID: f.HWID, BootID: f.BootID, VMs: vms, Disks: s.disksOf(vms)}
	if ns := s.lastSeen(f.HWID); ns != nil && ns.Addresses != nil {
		t.Addresses = *ns.Addresses
	}
	if hw := s.Hardware[f.HWID]; hw != nil {
		t.StorageIP, t.Labels = hw.StorageIP, hw.Labels
	}
	s.plan.Work = append(s.plan.Work, Work{Kind: Fence, Key: r.Key, Rev: r.ModRevision, Fence: f, Target: t})
}

// disksOf lists the shared-storage disks (pool/image) of VMs.
func (s *view) disksOf(vms []string) []string {
	var out []string
	for _, name := range vms {
		v, ok := s.VMs[name]
		if !ok || !v.Spec.OK() {
			continue
		}
		for _, d := range v.Spec.Value.DiskList() {
			out = append(out, d.Pool+"/"+keys.DiskImage(name, keys.SpecUID(v.Spec), d.Name))
		}
	}
	return out
}

// move places a VM of a fenced node on another node: epoch + 1, the new node's assignment, and the
// old node's assignment and status removed, all in one transaction that also requires the fence
// record to be exactly the fenced one read.
func (s *view) move(name string, v *VM, spec *keys.VMSpec, pl *keys.Placement, to string, fate nodeFate) Action {
	sp := s.cfg.Space
	npl := *pl
	npl.Node, npl.Epoch, npl.Since, npl.By, npl.Term = to, pl.Epoch+1, s.Now.UTC(), s.cfg.Name, s.cfg.Term
	s.setSpec(&npl, v.Spec.ModRevision, spec)
	asg := assignmentFor(&npl, spec)
	asg.MinOSDMapEpoch = fate.osdEpoch
	from := pl.Node
	return Action{Object: "vm/" + name, What: "move",
		Conds: []Cond{ModRev(sp.Placement(name), v.Placement.ModRevision), ModRev(sp.VMSpec(name), v.Spec.ModRevision),
			ModRev(fate.fenceKey, fate.fenceRev)},
		Writes: []Write{Put(sp.Placement(name), keys.MustEncode(&npl)), Put(sp.Assign(to, name), keys.MustEncode(&asg)),
			Del(sp.Assign(from, name)), Del(sp.Status(from, name)), Del(sp.Problem(name))},
		Notes:   []Note{event("vm/"+name, "moved", fmt.Sprintf("from fenced %s to %s (epoch %d)", from, to, npl.Epoch))},
		Metrics: []Metric{MetricMove}}
}

// bookkeeping keeps each node's state (the leader's record) in step: the live registration (boot,
// the lease etcd says the key hangs on, addresses), a clean departure, the capacity the node may
// offer, the migration address the leader vouches for, why a present key is not trusted, and the
// operator's image pin. One write per node, conditioned on the state as read.
func (s *view) bookkeeping() []Action {
	muts := map[string][]func(*keys.NodeState) bool{}
	add := func(hwid string, f func(*keys.NodeState) bool) { muts[hwid] = append(muts[hwid], f) }
	for hwid, r := range s.live {
		n, lease := r.Value, r.Lease
		vouched, capped := s.vouchMigration(hwid, n), s.capped[hwid]
		add(hwid, func(ns *keys.NodeState) bool {
			changed := false
			addr := n.Addresses
			if ns.BootID != n.BootID || ns.Lease != lease || ns.Left || ns.Addresses == nil || ns.Addresses.Management != addr.Management || ns.Addresses.Storage != addr.Storage || ns.Addresses.Migration != addr.Migration {
				ns.BootID, ns.Lease, ns.Left, ns.Addresses = n.BootID, lease, false, &addr
				changed = true
			}
			if ns.Capacity == nil && n.Problem == "" && n.CPUs > 0 && n.MemoryMiB > 0 {
				// Trust on first use: what the node says at its first registration (unless the
				// hardware record says what to expect) is what it may offer from then on.
				ns.Capacity = &keys.Capacity{CPUs: n.CPUs, MemoryMiB: n.MemoryMiB}
				changed = true
			}
			if ns.MigrationIP != vouched {
				ns.MigrationIP = vouched
				changed = true
			}
			if ns.Capped != capped || ns.Doubt != "" {
				ns.Capped, ns.Doubt = capped, ""
				changed = true
			}
			return changed
		})
	}
	for hwid, why := range s.doubt {
		add(hwid, func(ns *keys.NodeState) bool {
			if ns.Doubt == why {
				return false
			}
			ns.Doubt = why
			return true
		})
	}
	for hwid, boot := range s.Left {
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
	for hwid, r := range s.Specs {
		if r.Err != nil {
			continue
		}
		pin := r.Value.Image
		add(hwid, func(ns *keys.NodeState) bool {
			if ns.PinApplied == pin {
				return false
			}
			// The operator changed the pin: it takes over from whatever a rollout set.
			ns.Image, ns.PinApplied = pin, pin
			return true
		})
	}
	var acts []Action
	for _, hwid := range sortedNames(muts) {
		ns := keys.NodeState{}
		var rev int64
		if r := s.States[hwid]; r != nil {
			if r.Err != nil || r.Value == nil {
				continue // an operator must fix it; never overwrite what we cannot read
			}
			// Most rounds change no node's state: ask the mutations on a shallow copy first (they
			// only assign fields and replace pointers, never write through them), and decode a
			// private copy to write only when one of them changes something. At 10,000 nodes the
			// decode each round was a tenth of the leader's CPU while placing.
			probe, changes := *r.Value, false
			for _, f := range muts[hwid] {
				changes = f(&probe) || changes
			}
			if !changes {
				continue
			}
			cp, err := keys.Decode[keys.NodeState](r.Raw) // a copy: the cached object is shared
			if err != nil {
				continue
			}
			ns, rev = *cp, r.ModRevision
		}
		prev := ns
		changed := false
		for _, f := range muts[hwid] {
			if f(&ns) {
				changed = true
			}
		}
		if !changed {
			continue
		}
		acts = append(acts, Action{Object: "node/" + hwid, What: "record node state",
			Conds: []Cond{ModRev(s.cfg.Space.NodeState(hwid), rev)}, Writes: []Write{Put(s.cfg.Space.NodeState(hwid), keys.MustEncode(&ns))},
			Notes: nodeStateNotes(hwid, &prev, &ns)})
	}
	return acts
}

// nodeStateNotes is what an operator should know of a change in a node's state.
func nodeStateNotes(hwid string, prev, cur *keys.NodeState) []Note {
	var notes []Note
	obj := "node/" + hwid
	if cur.Doubt != "" && cur.Doubt != prev.Doubt {
		notes = append(notes, Note{Level: Warn, Log: "node key not trusted: the node counts as absent", Args: []any{"node", hwid, "why", cur.Doubt},
			Object: obj, Event: "untrusted", Message: cur.Doubt + ": the node counts as absent"})
	}
	if cur.Capped != "" && cur.Capped != prev.Capped {
		notes = append(notes, Note{Level: Warn, Log: "node capacity capped", Args: []any{"node", hwid, "why", cur.Capped},
			Object: obj, Event: "capacity-capped", Message: cur.Capped})
	}
	if cur.Addresses != nil && cur.Addresses.Migration != "" && cur.MigrationIP == "" &&
		(prev.Addresses == nil || prev.Addresses.Migration != cur.Addresses.Migration || prev.MigrationIP != "") {
		notes = append(notes, Note{Level: Warn, Log: "migration address not vouched for: the node gets no migration certificate", Args: []any{"node", hwid, "address", cur.Addresses.Migration},
			Object: obj, Event: "migration-address-refused", Message: cur.Addresses.Migration + " is held by another node or not the hardware record's migration_ip"})
	}
	if cur.PinApplied != prev.PinApplied {
		notes = append(notes, event(obj, "pin-applied", fmt.Sprintf("boots %q next (\"\" = the current image)", cur.Image)))
	}
	return notes
}

// vouchMigration is the live-migration address the leader vouches for on a node's behalf (the name
// its migration certificate may carry): the address the node registers, if it is the hardware
// record's migration_ip when that is set, and if no other node holds it.
func (s *view) vouchMigration(hwid string, n *keys.Node) string {
	addr := n.Addresses.Migration
	if addr == "" {
		return ""
	}
	if hw := s.Hardware[hwid]; hw != nil && hw.MigrationIP != "" && hw.MigrationIP != addr {
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
func (s *view) migrationHolders() map[string]string {
	if s.migHolders != nil {
		return s.migHolders
	}
	claims := map[string]string{}
	for hwid, r := range s.live {
		ip := r.Value.Addresses.Migration
		if first, ok := claims[ip]; ip != "" && (!ok || hwid < first) {
			claims[ip] = hwid
		}
	}
	for hwid, r := range s.States {
		if r.OK() && r.Value.MigrationIP != "" {
			claims[r.Value.MigrationIP] = hwid
		}
	}
	for hwid, hw := range s.Hardware {
		if hw.MigrationIP != "" {
			claims[hw.MigrationIP] = hwid
		}
	}
	s.migHolders = claims
	return claims
}
