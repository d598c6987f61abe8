package decide

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/herdhq/herd/lib/keys"
)

// DefaultRecoveryWait bounds how long a restore recovery waits for live nodes' inventories.
const DefaultRecoveryWait = time.Minute

// etcd restored from a backup (docs/architecture.md has the safety argument).
//
// A replica or a node that sees etcd's revision go back asks for a recovery one generation above
// any it knew. The leader then marks the cluster record collecting: every agent freezes (starts,
// stops and destroys nothing) and publishes an inventory of its domains in its node record. When
// every live node has answered, or the wait has passed, the leader makes the records say what
// runs: a VM running on a node is placed there at an epoch above anything seen, and every other
// assignment of it goes; a VM whose spec the restore lost is kept where it runs as an orphan; a
// VM that runs on no node that answered is held (it may have been deleted after the backup) until
// an operator writes its spec again. Only then is the recovery done and the agents thaw.

// recovery returns the round's restore recovery actions and whether the round stops there: while
// a recovery is collecting, nothing else is decided.
func (s *view) recovery() ([]Action, bool) {
	if !s.Cluster.OK() {
		return nil, false
	}
	cl := s.Cluster.Value
	gen := cl.RestoreGeneration()
	want, who := s.RestoreWant, "a coordinator saw etcd's revision go back"
	for _, hwid := range sortedNames(s.live) {
		if inv := s.live[hwid].Value.Recovery; inv != nil && inv.Wants > want {
			want, who = inv.Wants, "node "+hwid+" saw etcd's revision go back"
		}
	}
	if !cl.Collecting() {
		if want <= gen {
			return nil, false
		}
		wait := s.cfg.RecoveryWait
		if wait == 0 {
			wait = DefaultRecoveryWait
		}
		r := keys.Restore{Generation: max(gen+1, want), Phase: keys.RestoreCollecting, Since: s.Now.UTC(), Until: s.Now.Add(wait).UTC(), Why: who}
		s.after(wait)
		return []Action{s.putRestore(&r, Note{Level: Error, Log: "etcd was restored from a backup: every node freezes and reports what it runs before anything is decided",
			Args: []any{"recovery", r.Generation, "why", who, "wait", wait}, Object: "cluster", Event: "restore-recovery",
			Message: fmt.Sprintf("recovery %d started: %s", r.Generation, who)})}, true
	}
	r := cl.Restore
	inv, missing := s.inventories(r.Generation)
	if len(missing) > 0 && s.Now.Before(r.Until) {
		s.after(r.Until.Sub(s.Now))
		s.log(Info, "restore recovery: waiting for the inventories of live nodes", "recovery", r.Generation, "missing", len(missing), "until", r.Until)
		return nil, true
	}
	if acts := s.adopt(inv); len(acts) > 0 {
		return acts, true
	}
	done := *r
	done.Phase, done.Done, done.Missing = keys.RestoreDone, s.Now.UTC(), missing
	msg := fmt.Sprintf("recovery %d done in %s: the records say what runs", r.Generation, s.Now.Sub(r.Since).Round(time.Millisecond))
	if len(missing) > 0 {
		msg += "; no inventory from " + strings.Join(missing, ", ")
	}
	return []Action{s.putRestore(&done, Note{Level: Warn, Log: "restore recovery done: deciding again", Args: []any{"recovery", r.Generation, "missing", missing},
		Object: "cluster", Event: "restore-recovered", Message: msg})}, true
}

func (s *view) putRestore(r *keys.Restore, note Note) Action {
	cl := *s.Cluster.Value
	cl.Restore = r
	return Action{Object: "cluster", What: "restore recovery " + r.Phase,
		Conds: []Cond{ModRev(s.Cluster.Key, s.Cluster.ModRevision)}, Writes: []Write{Put(s.Cluster.Key, keys.MustEncode(&cl))},
		Notes: []Note{note}}
}

// held is one domain of an inventory.
type held struct {
	node string
	dom  keys.InventoryDomain
}

// inventories gathers the domains live nodes reported for recovery gen, by VM name, and the live
// nodes that have not reported.
func (s *view) inventories(gen int) (map[string][]held, []string) {
	out := map[string][]held{}
	var missing []string
	for _, hwid := range sortedNames(s.live) {
		inv := s.live[hwid].Value.Recovery
		if inv == nil || inv.Generation != gen {
			missing = append(missing, hwid)
			continue
		}
		for _, d := range inv.Domains {
			out[d.Name] = append(out[d.Name], held{node: hwid, dom: d})
		}
	}
	return out, missing
}

// reported says whether a node answered with an inventory (its silence about a VM means something).
func (s *view) reported(gen int) map[string]bool {
	out := map[string]bool{}
	for hwid, n := range s.live {
		if r := n.Value.Recovery; r != nil && r.Generation == gen {
			out[hwid] = true
		}
	}
	return out
}

// adopt returns the writes that make the records say what the inventories show runs.
func (s *view) adopt(inv map[string][]held) []Action {
	gen := s.Cluster.Value.Restore.Generation
	reported := s.reported(gen)
	names := map[string]bool{}
	for n := range inv {
		names[n] = true
	}
	for n := range s.VMs {
		names[n] = true
	}
	for n := range s.Assigns {
		names[n] = true
	}
	var acts []Action
	for _, name := range sortedNames(names) {
		acts = append(acts, s.adoptVM(name, inv[name], reported)...)
	}
	// A restored status report of a domain its node does not hold describes the other history:
	// nothing may be concluded from it (the authority rules restore placements from reports).
	for _, name := range sortedNames(s.Reports) {
		for _, hwid := range sortedNames(s.Reports[name]) {
			if !reported[hwid] || holds(inv[name], hwid) {
				continue
			}
			r := s.Reports[name][hwid]
			acts = append(acts, Action{Object: "vm/" + name, What: "drop restored status",
				Conds: []Cond{ModRev(r.Key, r.ModRevision)}, Writes: []Write{Del(r.Key)}})
		}
	}
	return acts
}

func holds(hs []held, hwid string) bool {
	for _, h := range hs {
		if h.node == hwid {
			return true
		}
	}
	return false
}

func (s *view) adoptVM(name string, hs []held, reported map[string]bool) []Action {
	sp := s.cfg.Space
	v := s.VMs[name]
	if v == nil {
		v = &VM{}
	}
	var pl *keys.Placement
	var plRev int64
	if v.Placement != nil {
		plRev = v.Placement.ModRevision
		if v.Placement.OK() {
			pl = v.Placement.Value
		}
	}
	assigns := s.Assigns[name]
	var running []held
	maxEpoch := int64(0)
	for _, h := range hs {
		maxEpoch = max(maxEpoch, h.dom.Epoch)
		// A domain of an incarnation older than the spec was deleted before the backup: its node
		// removes it on the ordinary evidence (the name belongs to a newer uid).
		if h.dom.State == keys.StateRunning && !(v.Spec.OK() && h.dom.UID < keys.SpecUID(v.Spec)) {
			running = append(running, h)
		}
	}
	if pl != nil {
		maxEpoch = max(maxEpoch, pl.Epoch)
	}
	for _, a := range assigns {
		if a.OK() {
			maxEpoch = max(maxEpoch, a.Value.Epoch)
		}
	}
	// Every assignment of the name goes but the kept one's. With silent, those on nodes that did
	// not answer stay too: such a node may run the VM, and its assignment is what has it fenced
	// before the VM is placed anew.
	dropOthers := func(keep string, silent bool, conds []Cond, writes []Write) ([]Cond, []Write) {
		for _, hwid := range sortedNames(assigns) {
			if hwid == keep || (silent && !reported[hwid]) {
				continue
			}
			conds = append(conds, ModRev(assigns[hwid].Key, assigns[hwid].ModRevision))
			writes = append(writes, Del(assigns[hwid].Key))
		}
		return conds, writes
	}

	if len(running) == 0 {
		spec := v.Spec
		if !spec.OK() || !spec.Value.WantsRunning() {
			if spec == nil {
				// Nothing runs and no spec wants it: no assignment may start it later.
				var acts []Action
				for _, hwid := range sortedNames(assigns) {
					acts = append(acts, dropAssignment(name, hwid, assigns[hwid], "after the restore no spec wants it"))
				}
				return acts
			}
			return nil
		}
		uid := keys.SpecUID(spec)
		if spec.ModRevision > s.Cluster.ModRevision {
			// Written after the recovery began: an operator's word of today, not the backup's.
			return nil
		}
		if pl != nil && (pl.Orphan || (pl.UID == uid && !reported[pl.Node])) {
			// Its node did not answer (it may run the VM still): the node-loss rules decide,
			// fence first. An orphan's node went silent: it stays an orphan.
			return nil
		}
		if p := v.Problem; isProblem(p, keys.ProblemRestoreHold) && p.Value.UID == uid && p.Value.SpecRev == spec.ModRevision &&
			v.Placement == nil && !assignedOn(assigns, reported) {
			return nil
		}
		conds := []Cond{ModRev(spec.Key, spec.ModRevision), ModRev(sp.Placement(name), plRev)}
		writes := []Write{Del(sp.Placement(name))}
		conds, writes = dropOthers("", true, conds, writes)
		msg := "after an etcd restore it ran on no node that reported: it may have been deleted after the backup; start it with 'herdctl vm release " + name + "' or delete it"
		if silent := s.silentNodes(reported); len(silent) > 0 {
			msg += "; " + strings.Join(silent, ", ") + " did not report and may run it: release it only once they are back or fenced"
		}
		prob := keys.Problem{UID: uid, Kind: keys.ProblemRestoreHold, SpecRev: spec.ModRevision, Since: s.Now.UTC(), Message: msg}
		writes = append(writes, Put(sp.Problem(name), keys.MustEncode(&prob)))
		return []Action{{Object: "vm/" + name, What: "hold after restore", Conds: conds, Writes: writes,
			Notes: []Note{{Level: Warn, Log: "VM held after the restore: it runs on no node that reported", Args: []any{"vm", name, "uid", uid},
				Object: "vm/" + name, Event: "restore-held", Message: prob.Message}}}}
	}

	// The copy of the spec's incarnation with the newest epoch wins; any other running copy
	// (none, unless something started one before the freeze) loses its assignment and is
	// removed by its node on the placement's evidence. A copy of an older incarnation is removed
	// by its node too (the name now belongs to the spec's uid); one of a newer incarnation than
	// the spec (re-created after the backup) is kept and reported as an orphan by its node.
	spec := v.Spec
	sort.SliceStable(running, func(i, j int) bool {
		mi, mj := spec.OK() && running[i].dom.UID == keys.SpecUID(spec), spec.OK() && running[j].dom.UID == keys.SpecUID(spec)
		if mi != mj {
			return mi
		}
		return running[i].dom.Epoch > running[j].dom.Epoch
	})
	win := running[0]
	var note string
	if len(running) > 1 {
		note = fmt.Sprintf("; it also ran on %d other nodes, whose copies go", len(running)-1)
	}
	if spec.OK() && keys.SpecUID(spec) == win.dom.UID {
		uid := keys.SpecUID(spec)
		if a := assigns[win.node]; pl != nil && pl.UID == uid && pl.Node == win.node && pl.Migration == nil && !pl.Orphan &&
			pl.Epoch >= win.dom.Epoch && a.OK() && a.Value.UID == uid && a.Value.Epoch == pl.Epoch && runnable(a.Value) && len(assigns) == 1 {
			return nil
		}
		np := keys.Placement{UID: uid, Node: win.node, Epoch: maxEpoch + 1, UUID: win.dom.UUID, Since: s.Now.UTC(), By: s.cfg.Name, Term: s.cfg.Term}
		if pl != nil && pl.UID == uid {
			np.UUID, np.MACs, np.NICs = pl.UUID, pl.MACs, pl.NICs
		} else if a := assigns[win.node]; a.OK() && a.Value.UID == uid {
			np.MACs, np.NICs = a.Value.MACs, a.Value.NICs
		}
		s.setSpec(&np, spec.ModRevision, spec.Value)
		asg := assignmentFor(&np, spec.Value)
		var asgRev int64
		if a := assigns[win.node]; a != nil {
			asgRev = a.ModRevision
		}
		conds := []Cond{ModRev(spec.Key, spec.ModRevision), ModRev(sp.Placement(name), plRev), ModRev(sp.Assign(win.node, name), asgRev)}
		writes := []Write{Put(sp.Placement(name), keys.MustEncode(&np)), Put(sp.Assign(win.node, name), keys.MustEncode(&asg)), Del(sp.Problem(name))}
		conds, writes = dropOthers(win.node, false, conds, writes)
		msg := fmt.Sprintf("runs on %s (domain epoch %d): placed there at epoch %d%s", win.node, win.dom.Epoch, np.Epoch, note)
		return []Action{{Object: "vm/" + name, What: "adopt after restore", Conds: conds, Writes: writes,
			Notes: []Note{{Level: Warn, Log: "VM adopted where it runs after the restore", Args: []any{"vm", name, "node", win.node, "epoch", np.Epoch},
				Object: "vm/" + name, Event: "restore-adopted", Message: msg}}}}
	}
	// Its spec is gone (created after the backup) or names another incarnation: an orphan, kept
	// where it runs, assigned nowhere, until an operator forgets it.
	if pl != nil && pl.Orphan && pl.UID == win.dom.UID && pl.Node == win.node && len(assigns) == 0 {
		return nil
	}
	np := keys.Placement{UID: win.dom.UID, Node: win.node, Epoch: win.dom.Epoch, UUID: win.dom.UUID, Since: s.Now.UTC(), By: s.cfg.Name, Term: s.cfg.Term, Orphan: true}
	conds := []Cond{ModRev(sp.Placement(name), plRev)}
	writes := []Write{Put(sp.Placement(name), keys.MustEncode(&np))}
	conds, writes = dropOthers("", false, conds, writes)
	msg := fmt.Sprintf("runs on %s (uid %d, epoch %d) but the restore has no spec of it: kept as an orphan; 'herdctl vm forget %s' removes it%s", win.node, win.dom.UID, win.dom.Epoch, name, note)
	return []Action{{Object: "vm/" + name, What: "keep orphan after restore", Conds: conds, Writes: writes,
		Notes: []Note{{Level: Warn, Log: "VM kept as an orphan after the restore: its spec is gone", Args: []any{"vm", name, "node", win.node, "uid", win.dom.UID},
			Object: "vm/" + name, Event: "restore-orphan", Message: msg}}}}
}

// assignedOn says whether any assignment is on a node that answered.
func assignedOn[T any](assigns map[string]T, reported map[string]bool) bool {
	for hwid := range assigns {
		if reported[hwid] {
			return true
		}
	}
	return false
}

// silentNodes are the live nodes that have not answered this recovery.
func (s *view) silentNodes(reported map[string]bool) []string {
	var out []string
	for _, hwid := range sortedNames(s.live) {
		if !reported[hwid] {
			out = append(out, hwid)
		}
	}
	return out
}
