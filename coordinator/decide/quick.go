package decide

import (
	"maps"
	"slices"

	"github.com/herdhq/herd/coordinator/scheduler"
	"github.com/herdhq/herd/lib/keys"
)

// Quick rounds. A full round costs what the cluster is (every VM and node, about half a second at
// 100,000 VMs on two cores), whatever changed; while specs trickle in, each one waited for a round
// that was busy with the other 99,999 VMs. A quick round decides only about the VMs whose records
// changed since the last round (Snapshot.Focus) and those waiting for a place; everything else it
// only counts, as capacity. It does what the full round would do for each of those VMs, when the
// VM's situation is one the full round would decide from its own records alone: unplaced with
// nothing of it on any node, or placed on a live, unfenced, undrained node with no migration and
// its records only there. Anything else (a lost node, a migration, a withdrawal, a deleted VM)
// makes the quick round ask for a full one (Plan.Full) and leave the VM to it.
//
// Safety does not rest on this split: every write is guarded by the records it read, as in a full
// round, and a full round still runs at least every interval, after any change that is not a VM's,
// and whenever a round asks for one.

// FullReason says why a quick round asks for a full one.
type FullReason string

// decideQuick is Decide for a snapshot with Focus set.
func decideQuick(snap *Snapshot, st *State, cfg Config) Plan {
	var plan Plan
	s := &view{Snapshot: snap, cfg: &cfg, st: st, plan: &plan}
	s.trust()
	if why := s.fullOnly(); why != "" {
		plan.Full = why
		return plan
	}
	for _, hwid := range sortedNames(s.Fences) {
		if why := s.fencedWithVMs(hwid); why != "" {
			// The VMs of a fenced node are pending in a full round, oldest first, alongside new
			// ones; a quick round would let new VMs take their room.
			plan.Full = why
			return plan
		}
	}
	if len(snap.Avoid) > 0 {
		// The nodes are shared with the full round they came from: filter a copy.
		nodes := make([]scheduler.Node, 0, len(s.nodes))
		for _, n := range s.nodes {
			if !snap.Avoid[n.HWID] {
				nodes = append(nodes, n)
			}
		}
		s.nodes = nodes
	}
	t := newTally(nil)
	t.placed = append(t.placed, snap.Held...)
	for _, name := range snap.Focus {
		v := snap.VMs[name]
		if why := s.needsFull(name, v); why != "" {
			if plan.Full == "" {
				plan.Full = why
			}
			if v != nil {
				for _, sh := range heldBy(v) {
					t.placed = append(t.placed, scheduler.VM{Name: name, Node: sh.key.node, AntiAffinity: sh.key.group, VCPUs: sh.vcpus, MemoryMiB: sh.mem})
				}
			}
			continue
		}
		if v == nil {
			continue // deleted, and nothing of it anywhere
		}
		plan.decided = append(plan.decided, name)
		s.decideVM(t, name, v)
	}
	sched := s.schedule(t)
	s.problems(t, sched)
	plan.Pending = len(sched.Failures)
	plan.Actions = t.acts
	return plan
}

// fullOnly says why no round may be quick now ("" when one may): a drain or a rollout under way
// moves along as VMs move, in bookkeeping only a full round does (a node is drained when its last
// VM is gone; a rollout's next step waits for it).
func (s *view) fullOnly() FullReason {
	var draining string
	if s.Trusted != nil {
		draining = s.Trusted.draining
	} else {
		draining = s.drainingNode()
	}
	if draining != "" {
		return "node " + FullReason(draining) + " is being drained"
	}
	if r := s.Rollout; r != nil {
		p := s.Progress
		if !r.OK() || !p.OK() || p.Value.ID != r.Value.ID || (p.Value.State != keys.RolloutDone && p.Value.State != keys.RolloutAborted) {
			return "a rollout is under way"
		}
	}
	return ""
}

// fencedWithVMs says why a node's VMs move off a fenced boot ("" when they do not).
func (s *view) fencedWithVMs(hwid string) FullReason {
	if !s.Occupied[hwid] {
		return ""
	}
	for _, r := range s.Fences[hwid] {
		if !r.OK() {
			return "node " + FullReason(hwid) + " has an unreadable fence record"
		}
		if n := s.live[hwid]; r.Value.Phase == keys.FenceFenced && (n == nil || n.Value.BootID == r.Value.BootID) {
			return "node " + FullReason(hwid) + " is fenced"
		}
	}
	return ""
}

// needsFull says why a VM must be left to a full round ("" when a quick round decides it as a
// full round would).
func (s *view) needsFull(name string, v *VM) FullReason {
	switch {
	case v == nil:
		if len(s.Assigns[name]) > 0 || len(s.Reports[name]) > 0 {
			return "vm " + FullReason(name) + " was deleted"
		}
		return ""
	case v.Spec == nil:
		return "vm " + FullReason(name) + " was deleted"
	case v.Migrate != nil:
		return "vm " + FullReason(name) + " has a migrate request"
	case s.Vanished[name] != nil:
		return "vm " + FullReason(name) + " lost its placement"
	}
	if len(s.Avoid) > 0 {
		for _, hwid := range append(slices.Collect(maps.Keys(s.Assigns[name])), slices.Collect(maps.Keys(s.Reports[name]))...) {
			if s.Avoid[hwid] {
				return "vm " + FullReason(name) + " has records on node " + FullReason(hwid) + ", changed since the nodes were read"
			}
		}
	}
	node := ""
	if r := v.Placement; r != nil {
		if !r.OK() || r.Value.Orphan || r.Value.UID != keys.SpecUID(v.Spec) || r.Value.Migration != nil {
			return "vm " + FullReason(name) + "'s placement needs a full round"
		}
		node = r.Value.Node
		if s.Avoid[node] {
			return "vm " + FullReason(name) + "'s node " + FullReason(node) + " changed since the nodes were read"
		}
		if s.live[node] == nil || len(s.Fences[node]) > 0 || s.draining(node) {
			return "vm " + FullReason(name) + "'s node " + FullReason(node) + " is not plainly live"
		}
	}
	for hwid := range s.Assigns[name] {
		if hwid != node {
			return "vm " + FullReason(name) + " has an assignment elsewhere"
		}
	}
	for hwid := range s.Reports[name] {
		if hwid != node {
			return "vm " + FullReason(name) + " is reported elsewhere"
		}
	}
	return ""
}
