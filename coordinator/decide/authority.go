package decide

import (
	"fmt"
	"sort"

	"github.com/herdhq/herd/lib/keys"
)

// Authority over where a VM runs. The leader writes a placement and the node's assignment in one
// transaction, so the two agree unless someone else wrote (root with etcdctl, a restored backup, a
// bug). The leader never trusts that a missing record means nothing runs: before it decides anything
// else about a VM, it makes its records agree with where the VM's uid may be running, which is, in
// order of trust:
//
//  1. an assignment the VM could run under (not incoming, not withdrawn): that is what the node
//     follows;
//  2. a node's status report of the uid (the agent keeps a domain it has no evidence against, and
//     says so);
//  3. the placement itself, when no node has anything of the uid;
//  4. the last placement the caches saw deleted by someone else.
//
// The first found is kept (the placement is restored to it, or its assignment re-issued); every
// other assignment of the uid is withdrawn: the node stops and undefines the domain and reports
// "withdrawn", or is fenced, and only then the assignment goes. A VM is placed anew only when no
// node has any assignment or report of its uid.

// authority is what the reconciliation decided for one VM.
type authority struct {
	// restored is the placement this round's write restores; nothing else is decided for the VM
	// until the caches show the result.
	restored *keys.Placement
	// blocked says why the VM may not be placed anew although it has no usable placement.
	blocked string
}

// runnable says whether an assignment lets its node run the VM.
func runnable(a *keys.Assignment) bool { return a.Incoming == "" && !a.Withdraw }

// bestAssignment picks the assignment a VM's placement is restored to: the highest epoch, then the
// oldest key.
func bestAssignment(cands map[string]*rec[keys.Assignment]) (string, *rec[keys.Assignment]) {
	var bestNode string
	var best *rec[keys.Assignment]
	for hwid, kv := range cands {
		a, b := kv.Value, (*keys.Assignment)(nil)
		if best != nil {
			b = best.Value
		}
		switch {
		case best == nil, a.Epoch > b.Epoch,
			a.Epoch == b.Epoch && kv.CreateRevision < best.CreateRevision,
			a.Epoch == b.Epoch && kv.CreateRevision == best.CreateRevision && hwid < bestNode:
			bestNode, best = hwid, kv
		}
	}
	return bestNode, best
}

// reportsOf returns, per node, the status reports of a VM's uid that say a domain of it is there.
func (s *view) reportsOf(name string, uid int64) map[string]*keys.VMStatus {
	out := map[string]*keys.VMStatus{}
	for hwid, r := range s.Reports[name] {
		if r.OK() && r.Value.UID == uid && r.Value.State != keys.StateWithdrawn {
			out[hwid] = r.Value
		}
	}
	return out
}

// reconcileVM makes a VM's placement and assignments agree (see the comment at the top of the
// file). spec is the VM's valid spec, or nil when it has none; uid is its spec's (keys.SpecUID).
func (s *view) reconcileVM(name string, v *VM, uid int64, spec *keys.VMSpec) (authority, []Action) {
	var acts []Action
	var pl *keys.Placement
	if v.Placement.OK() && v.Placement.Value.UID == uid {
		pl = v.Placement.Value
	}
	mine := map[string]*rec[keys.Assignment]{} // this uid's readable assignments, by node
	run := map[string]*rec[keys.Assignment]{}  // ... those the node may run the VM under
	unreadable := ""
	for _, hwid := range sortedNames(s.Assigns[name]) {
		kv := s.Assigns[name][hwid]
		if kv.Err != nil {
			// Written by a newer herd, or by hand: the node cannot read it either. Whose it is
			// cannot be told, so it blocks everything for this VM until someone fixes it.
			unreadable = hwid
			s.log(Error, "unreadable assignment; the VM is left alone until it is fixed or deleted", "key", kv.Key, "error", kv.Err)
			continue
		}
		a := kv.Value
		if a.UID != uid {
			// An earlier VM of the same name: its node removes the domain on the evidence that
			// the name belongs to a newer uid.
			acts = append(acts, dropAssignment(name, hwid, kv, "it belongs to an earlier VM of the same name"))
			continue
		}
		mine[hwid] = kv
		if runnable(a) {
			run[hwid] = kv
		}
	}
	if unreadable != "" {
		return authority{blocked: "an unreadable assignment on " + unreadable + " (fix or delete it with etcdctl)"}, acts
	}
	reports := s.reportsOf(name, uid)
	for hwid := range reports {
		if kv := mine[hwid]; kv != nil && kv.Value.Withdraw {
			delete(reports, hwid) // being taken back: no place to keep the VM
		}
	}

	// Where the uid is kept, and whether the records must be restored to say so.
	if pl == nil || run[pl.Node] == nil {
		restore, source := s.restoreTarget(name, uid, pl, run, reports)
		switch {
		case restore == nil && pl == nil:
			if why := presenceWhy(mine, reports); why != "" {
				return authority{blocked: why}, acts
			}
			return authority{}, acts // runs nowhere: free to be placed
		case restore == nil:
			// The placement's node is busy giving the VM back (a withdrawal): wait for it.
			return authority{blocked: "its assignment on " + pl.Node + " is being withdrawn"}, acts
		}
		if spec == nil && run[restore.pl.Node] == nil {
			// Re-issuing an assignment needs a valid spec to hand the node.
			return authority{blocked: "it must be restored on " + restore.pl.Node + " from " + source + ", which needs a valid spec"}, acts
		}
		acts = append(acts, s.restorePlacement(name, v, uid, spec, restore, run, source))
		return authority{restored: restore.pl}, acts
	}

	// The placement stands: every other assignment of the uid is withdrawn, and a domain of the uid
	// reported from a node that has no assignment is taken back the same way.
	for _, hwid := range sortedNames(mine) {
		kv := mine[hwid]
		a := kv.Value
		if hwid == pl.Node && runnable(a) {
			continue
		}
		if m := pl.Migration; m != nil && hwid == m.To && a.Incoming == m.ID {
			continue
		}
		acts = append(acts, s.withdraw(name, hwid, kv, a)...)
	}
	for _, hwid := range sortedNames(reports) {
		st := reports[hwid]
		if mine[hwid] != nil || hwid == pl.Node {
			continue
		}
		skv := s.Reports[name][hwid]
		if s.nodeFenced(hwid) {
			acts = append(acts, Action{Object: "vm/" + name, What: "drop status of a fenced node",
				Conds: []Cond{ModRev(skv.Key, skv.ModRevision)}, Writes: []Write{Del(skv.Key)}})
			continue
		}
		wa := keys.Assignment{UID: uid, Epoch: st.Epoch, UUID: st.UUID, Withdraw: true}
		key := s.cfg.Space.Assign(hwid, name)
		acts = append(acts, Action{Object: "vm/" + name, What: "take back a domain that runs without assignment",
			Conds:  []Cond{CreateRev(key, 0), ModRev(skv.Key, skv.ModRevision)},
			Writes: []Write{Put(key, keys.MustEncode(&wa))},
			Notes: []Note{{Level: Warn, Log: "a domain of this VM runs where it is not placed: withdrawing it", Args: []any{"vm", name, "node", hwid, "placed_on", pl.Node},
				Object: "vm/" + name, Event: "withdrawing", Message: fmt.Sprintf("%s reports uid %d (%s) but the VM is placed on %s: its domain is stopped and removed there", hwid, uid, st.State, pl.Node)}}})
	}
	return authority{}, acts
}

// presenceWhy says why a VM without placement must not be placed anew ("" when nothing of its uid
// is anywhere).
func presenceWhy(mine map[string]*rec[keys.Assignment], reports map[string]*keys.VMStatus) string {
	for hwid := range mine {
		return "its assignment on " + hwid + " is being withdrawn"
	}
	for hwid := range reports {
		return hwid + " reports a domain of it without its uuid: waiting for the agent to report it"
	}
	return ""
}

// restoring is a placement to restore, and the assignment it comes from (nil when the node's
// assignment must be re-issued).
type restoring struct {
	pl  *keys.Placement
	asg *rec[keys.Assignment]
}

// restoreTarget finds where a VM whose placement is missing, or not where its node's assignment is,
// is kept. It returns nil when there is nowhere to restore it to.
func (s *view) restoreTarget(name string, uid int64, pl *keys.Placement, run map[string]*rec[keys.Assignment], reports map[string]*keys.VMStatus) (*restoring, string) {
	now := s.Now.UTC()
	if hwid, kv := bestAssignment(run); kv != nil {
		a := kv.Value
		p := keys.Placement{UID: uid, Node: hwid, Epoch: a.Epoch, UUID: a.UUID, SpecRev: a.SpecRev, MACs: a.MACs, NICs: a.NICs, Since: now}
		if sp, err := a.SpecCopy(); err == nil {
			p.VCPUs, p.MemoryMiB, p.AntiAffinity = sp.VCPUs, sp.MemoryMiB, sp.AntiAffinity
		}
		if out := a.Outgoing; out != nil {
			// A migration was open: keep it open, so that the ordinary settling decides from
			// both nodes' reports whether the VM now lives on the target.
			if in := s.Assigns[name][out.To]; in.OK() && in.Value.Incoming == out.ID {
				p.Migration = &keys.Migration{ID: out.ID, To: out.To, Mode: out.Mode, Reason: "restored", Started: now}
			}
		}
		return &restoring{pl: &p, asg: kv}, "its assignment on " + hwid
	}
	if hwid, st := bestReport(reports); st != nil && st.UUID != "" {
		p := keys.Placement{UID: uid, Node: hwid, Epoch: st.Epoch, UUID: st.UUID, Since: now}
		if pl != nil && pl.UUID == st.UUID {
			p.MACs, p.NICs = pl.MACs, pl.NICs
		}
		return &restoring{pl: &p}, fmt.Sprintf("the report of %s (%s)", hwid, st.State)
	}
	if len(reports) > 0 {
		return nil, ""
	}
	if pl != nil {
		if a := s.Assigns[name][pl.Node]; a != nil {
			return nil, "" // a withdrawal is under way there
		}
		p := *pl
		return &restoring{pl: &p}, "its placement"
	}
	if p := s.Vanished[name]; p != nil && p.UID == uid {
		cp := *p
		cp.Migration = nil
		return &restoring{pl: &cp}, "its placement as last seen before it was deleted"
	}
	return nil, ""
}

// bestReport picks the report a placement is restored from: a running domain first, then the
// highest epoch, then the node's id. A migration target waiting for the domain ("incoming") has
// none, so it is never picked.
func bestReport(reports map[string]*keys.VMStatus) (string, *keys.VMStatus) {
	nodes := make([]string, 0, len(reports))
	for hwid, st := range reports {
		if st.State != keys.StateIncoming {
			nodes = append(nodes, hwid)
		}
	}
	sort.Slice(nodes, func(i, j int) bool {
		a, b := reports[nodes[i]], reports[nodes[j]]
		if ar, br := a.DomainRunning(), b.DomainRunning(); ar != br {
			return ar
		}
		if a.Epoch != b.Epoch {
			return a.Epoch > b.Epoch
		}
		return nodes[i] < nodes[j]
	})
	if len(nodes) == 0 {
		return "", nil
	}
	return nodes[0], reports[nodes[0]]
}

// restorePlacement writes the restored placement and, unless the node already runs the VM under
// an assignment, the node's assignment: one transaction, conditioned on the records as read.
func (s *view) restorePlacement(name string, v *VM, uid int64, spec *keys.VMSpec, r *restoring, run map[string]*rec[keys.Assignment], source string) Action {
	sp := s.cfg.Space
	p := r.pl
	p.By, p.Term = s.cfg.Name, s.cfg.Term
	var prev int64
	if v.Placement != nil {
		prev = v.Placement.ModRevision
	}
	conds := []Cond{ModRev(sp.Placement(name), prev), CreateRev(sp.VMSpec(name), v.Spec.CreateRevision)}
	var writes []Write
	if run[p.Node] == nil {
		// Re-issued from the spec: the node gets what the spec says now, with the VM's identity.
		s.setSpec(p, v.Spec.ModRevision, spec)
		asg := assignmentFor(p, spec)
		var rev int64
		if kv := s.Assigns[name][p.Node]; kv != nil {
			rev = kv.ModRevision
		}
		conds = append(conds, ModRev(sp.Assign(p.Node, name), rev), ModRev(sp.VMSpec(name), v.Spec.ModRevision))
		writes = append(writes, Put(sp.Assign(p.Node, name), keys.MustEncode(&asg)))
	} else {
		conds = append(conds, ModRev(r.asg.Key, r.asg.ModRevision))
	}
	writes = append(writes, Put(sp.Placement(name), keys.MustEncode(p)))
	return Action{Object: "vm/" + name, What: "restore placement", Conds: conds, Writes: writes,
		Notes: []Note{{Level: Warn, Log: "placement restored: the records did not say where the VM runs", Args: []any{"vm", name, "node", p.Node, "epoch", p.Epoch, "from", source},
			Object: "vm/" + name, Event: "restored", Message: fmt.Sprintf("placement restored from %s: %s epoch %d", source, p.Node, p.Epoch)}}}
}

// withdraw takes an assignment back: first it becomes a withdrawal (the node stops and undefines
// the domain, starts nothing, and reports "withdrawn"), then, once the node says so or is fenced,
// it is deleted with the node's status.
func (s *view) withdraw(name, hwid string, kv *rec[keys.Assignment], a *keys.Assignment) []Action {
	skv := s.Reports[name][hwid]
	done := s.nodeFenced(hwid)
	if skv.OK() {
		if st := skv.Value; st.State == keys.StateWithdrawn && st.UID == a.UID && a.Withdraw {
			done = true
		}
	}
	if done {
		conds := []Cond{ModRev(kv.Key, kv.ModRevision)}
		writes := []Write{Del(kv.Key)}
		if skv != nil {
			conds = append(conds, ModRev(skv.Key, skv.ModRevision))
			writes = append(writes, Del(skv.Key))
		}
		return []Action{{Object: "vm/" + name, What: "drop withdrawn assignment", Conds: conds, Writes: writes,
			Notes: []Note{event("vm/"+name, "withdrawn", "assignment on "+hwid+" withdrawn")}}}
	}
	if a.Withdraw {
		return nil // the node has not answered yet
	}
	wa := *a
	wa.Withdraw, wa.Outgoing, wa.Incoming = true, nil, ""
	// The head decode left the spec copy raw: the rewrite carries it unchanged.
	wa.Spec, _ = a.SpecCopy()
	return []Action{{Object: "vm/" + name, What: "withdraw assignment",
		Conds: []Cond{ModRev(kv.Key, kv.ModRevision)}, Writes: []Write{Put(kv.Key, keys.MustEncode(&wa))},
		Notes: []Note{{Level: Warn, Log: "withdrawing an assignment the placement does not name", Args: []any{"vm", name, "node", hwid, "epoch", a.Epoch},
			Object: "vm/" + name, Event: "withdrawing", Message: fmt.Sprintf("assignment on %s (epoch %d) is not the placement's: its domain is stopped and removed there", hwid, a.Epoch)}}}}
}

// dropAssignment deletes an assignment at once: for VMs that no longer exist (or exist as a newer
// uid), whose nodes remove the domain on their own evidence.
func dropAssignment(name, hwid string, kv *rec[keys.Assignment], why string) Action {
	return Action{Object: "vm/" + name, What: "drop assignment",
		Conds: []Cond{ModRev(kv.Key, kv.ModRevision)}, Writes: []Write{Del(kv.Key)},
		Notes: []Note{info("assignment dropped", "vm", name, "node", hwid, "why", why)}}
}
