package decide

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/herdhq/herd/coordinator/scheduler"
	"github.com/herdhq/herd/lib/keys"
)

// Rolling upgrades. The operator's request (/herd/rollout) names the image, the fleet, the budget
// and whether to run, pause or abort; the leader's progress (/herd/rolloutstatus) holds each node's
// phase. The leader advances it one step per round, in ONE transaction that also carries every
// node-state and node-command write the step needs, conditioned on the revisions it read. So a
// leader killed at any point leaves a record that says exactly what was done, and the next leader
// continues from it.
//
// Per node: pending -> draining (cordoned and drained by the rollout, pinned to the image: the
// node state names the rollout) -> rebooting (a reboot command bound to the node's current boot
// id) -> done (the node registered with another boot id and the image; the rollout's cordon
// lifted). A node already on the image is skipped. The operator's own cordon (the node spec) is
// never touched. Unavailable = in progress (cordoned by the rollout) or not ready; a node starts only
// while fewer than max_unavailable are, decided from the state at the start of the round, and only
// if the other nodes can take its VMs (the scheduler, over the same snapshot).

// rolloutStep collects one round's changes.
type rolloutStep struct {
	s      *view
	req    *keys.Rollout
	ro     *keys.RolloutStatus
	now    time.Time
	conds  []Cond
	ops    []Write
	notes  []Note
	placed []scheduler.VM             // what the round's snapshot has placed, for the capacity check
	states map[string]*keys.NodeState // node states read (and maybe changed) this step
	write  map[string]bool            // ... and those to write back, once each, at the end
	dirty  bool
}

func (s *view) rolloutRound(placed []scheduler.VM) []Action {
	sp := s.cfg.Space
	rkv, skv := s.Rollout, s.Progress
	if rkv != nil && rkv.Err != nil {
		s.log(Error, "unreadable rollout request; the rollout is stuck until it is fixed or deleted", "key", rkv.Key, "error", rkv.Err)
		return nil
	}
	if skv != nil && skv.Err != nil {
		s.log(Error, "unreadable rollout status; delete it to let the leader start it again", "key", skv.Key, "error", skv.Err)
		return nil
	}
	// Private copies: the cached objects are shared.
	var req *keys.Rollout
	var ro *keys.RolloutStatus
	if rkv != nil {
		req, _ = keys.Decode[keys.Rollout](rkv.Raw)
		if err := req.Validate(); err != nil {
			s.log(Error, "invalid rollout request; nothing is done until it is fixed", "key", rkv.Key, "error", err)
			return nil
		}
	}
	if skv != nil {
		ro, _ = keys.Decode[keys.RolloutStatus](skv.Raw)
	}
	st := &rolloutStep{s: s, req: req, ro: ro, placed: placed, now: s.Now.UTC(), states: map[string]*keys.NodeState{}, write: map[string]bool{}}
	st.conds = append(st.conds, ModRev(sp.Rollout(), modRev(rkv)), ModRev(sp.RolloutStatus(), modRev(skv)))
	switch {
	case ro != nil && ro.Ended.IsZero() && (req == nil || req.ID != ro.ID):
		// The request of a rollout under way was deleted or replaced (etcdctl): stop it as an
		// abort would, so that no node stays cordoned by a rollout nobody follows.
		if req == nil {
			req = &keys.Rollout{ID: ro.ID}
		} else {
			req = &keys.Rollout{ID: ro.ID, Image: req.Image}
		}
		st.req = req
		st.abort("its request was deleted or replaced")
	case req == nil:
		st.releaseStale("")
	case ro == nil || ro.ID != req.ID:
		st.ro = &keys.RolloutStatus{ID: req.ID, State: keys.RolloutRunning, Nodes: append([]string(nil), req.Nodes...), Resumes: req.Resumes, Per: map[string]*keys.RolloutNode{}}
		st.dirty = true
		st.step()
	case !ro.Ended.IsZero():
		st.releaseStale(ro.ID)
	default:
		st.step()
	}
	if !st.dirty {
		return nil
	}
	for _, hwid := range sortedNames(st.write) {
		st.ops = append(st.ops, Put(sp.NodeState(hwid), keys.MustEncode(st.states[hwid])))
	}
	what := "rollout/-"
	if ro = st.ro; ro != nil {
		ro.Updated = st.now
		st.ops = append(st.ops, Put(sp.RolloutStatus(), keys.MustEncode(ro)))
		what = "rollout/" + ro.ID
	}
	return []Action{{Object: what, What: "rollout step", Conds: st.conds, Writes: st.ops, Notes: st.notes}}
}

func modRev[T any](kv *rec[T]) int64 {
	if kv == nil {
		return 0
	}
	return kv.ModRevision
}

// step moves an active rollout along as its request asks.
func (st *rolloutStep) step() {
	ro, req := st.ro, st.req
	if ro.Per == nil {
		ro.Per = map[string]*keys.RolloutNode{}
	}
	for _, hwid := range ro.Nodes {
		if ro.Per[hwid] == nil {
			ro.Per[hwid] = &keys.RolloutNode{Phase: keys.PhasePending}
			st.dirty = true
		}
	}
	switch {
	case req.State == keys.RolloutAborting:
		st.abort("aborted by " + orSomeone(req.By))
		return
	case req.State == keys.RolloutPaused && ro.State != keys.RolloutPaused:
		ro.State, ro.Reason = keys.RolloutPaused, "paused by an operator"
		st.dirty = true
	case req.State == keys.RolloutRunning && ro.State == keys.RolloutPaused && (req.Resumes > ro.Resumes || ro.Reason == "paused by an operator"):
		// Resumed: a node the rollout paused on is retried (advance clears its error).
		ro.State, ro.Reason, ro.Resumes = keys.RolloutRunning, "", req.Resumes
		st.dirty = true
		st.event("rollout/"+ro.ID, "resumed", "by %s", orSomeone(req.By))
	}
	if req.Resumes > ro.Resumes {
		ro.Resumes = req.Resumes
		st.dirty = true
	}
	st.releaseStale(ro.ID)
	st.follow()
	st.advance()
	if ro.State == keys.RolloutRunning {
		st.start()
		st.finish()
	}
	st.gauge()
}

func orSomeone(by string) string {
	if by == "" {
		return "an operator"
	}
	return by
}

// releaseStale lifts the cordon of nodes that name a rollout other than the current one (its
// status gone, say, with etcdctl): nothing else would ever lift it.
func (st *rolloutStep) releaseStale(current string) {
	for _, hwid := range sortedNames(st.s.States) {
		kv := st.s.States[hwid]
		if kv.Err != nil {
			continue
		}
		if id := kv.Value.Rollout; id != "" && id != current {
			ns := st.state(hwid)
			ns.Rollout, ns.Drained = "", false
			st.putState(hwid)
			st.event("node/"+hwid, "rollout-released", "cordoned by rollout %s, which is no longer under way: schedulable again", id)
		}
	}
}

// gauge publishes the node count per phase; a phase no node is in reads 0, not absent.
func (st *rolloutStep) gauge() {
	n := map[string]int{}
	for _, ph := range []string{keys.PhasePending, keys.PhaseDraining, keys.PhaseRebooting, keys.PhaseDone, keys.PhaseSkipped, keys.PhaseAborted, keys.PhaseRemoved} {
		n[ph] = 0
	}
	for _, p := range st.ro.Per {
		n[p.Phase]++
	}
	st.s.plan.Rollout = n
}

func (st *rolloutStep) event(object, action, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	st.notes = append(st.notes, Note{Level: Info, Log: "rollout: " + action, Args: []any{"object", object, "rollout", st.ro.ID, "message", msg},
		Object: object, Event: action, Message: "rollout " + st.ro.ID + ": " + msg})
}

// node returns the live node record, or nil.
func (st *rolloutStep) node(hwid string) *keys.Node {
	if r := st.s.live[hwid]; r != nil {
		return r.Value
	}
	return nil
}

// ready: registered and not fenced.
func (st *rolloutStep) ready(hwid string) bool {
	n := st.node(hwid)
	return n != nil && st.s.fenceFor(hwid, n.BootID) == nil
}

// state returns the node's state as this step sees it (a copy to modify), recording the revision
// the write will be conditioned on the first time.
func (st *rolloutStep) state(hwid string) *keys.NodeState {
	if ns := st.states[hwid]; ns != nil {
		return ns
	}
	key := st.s.cfg.Space.NodeState(hwid)
	ns := &keys.NodeState{}
	var rev int64
	if kv := st.s.States[hwid]; kv != nil {
		rev = kv.ModRevision
		if kv.Err == nil {
			if cp, err := keys.Decode[keys.NodeState](kv.Raw); err == nil {
				ns = cp
			}
		}
	}
	st.conds = append(st.conds, ModRev(key, rev))
	st.states[hwid] = ns
	return ns
}

// putState marks a node state obtained from state() for writing (its final value, at the end).
func (st *rolloutStep) putState(hwid string) {
	st.write[hwid] = true
	st.dirty = true
}

func (st *rolloutStep) command(hwid string, p *keys.RolloutNode) (*keys.NodeCommand, *rec[keys.NodeCommand]) {
	kv := st.s.NodeCmds[st.s.cfg.Space.NodeCmd(hwid, cmdID(st.ro.ID, p.Attempt))]
	if !kv.OK() {
		return nil, kv
	}
	return kv.Value, kv
}

func cmdID(rollout string, attempt int) string { return fmt.Sprintf("%s-%d", rollout, attempt) }

func (st *rolloutStep) pause(hwid string, p *keys.RolloutNode, why string) {
	p.Error = why
	st.ro.State, st.ro.Reason = keys.RolloutPaused, fmt.Sprintf("node %s: %s", hwid, why)
	st.dirty = true
	st.event("rollout/"+st.ro.ID, "paused", "node %s: %s; fix it, then 'herdctl rollout resume' (or abort)", hwid, why)
}

// reboot sends the node a reboot command for its current boot.
func (st *rolloutStep) reboot(hwid string, p *keys.RolloutNode, n *keys.Node) {
	p.Attempt++
	key := st.s.cfg.Space.NodeCmd(hwid, cmdID(st.ro.ID, p.Attempt))
	cmd := keys.NodeCommand{Command: keys.CmdReboot, IfBootID: n.BootID, Issued: st.now, By: "rollout/" + st.ro.ID}
	st.conds = append(st.conds, CreateRev(key, 0))
	st.ops = append(st.ops, Put(key, keys.MustEncode(&cmd)))
	p.Phase, p.BootID, p.Since, p.Error = keys.PhaseRebooting, n.BootID, st.now, ""
	st.dirty = true
	st.event("node/"+hwid, "rollout-rebooting", "drained; reboot into %s requested (boot %s)", st.req.Image, n.BootID)
}

// release lifts the rollout's cordon of a node (the operator's own cordon, if any, stays).
func (st *rolloutStep) release(hwid string) {
	ns := st.state(hwid)
	ns.Rollout, ns.Drained = "", false
	st.putState(hwid)
}

// specRev is the ModRevision of the node's spec (0 without one).
func (st *rolloutStep) specRev(hwid string) int64 { return modRev(st.s.Specs[hwid]) }

// uncordoned says whether an operator uncordoned the node after its upgrade began.
func (st *rolloutStep) uncordoned(hwid string, p *keys.RolloutNode) bool {
	kv := st.s.Specs[hwid]
	return kv.OK() && kv.ModRevision > p.SpecRev && !kv.Value.Cordoned
}

// advance moves every node in progress along, in any state but aborting: a paused rollout still
// lets a node that is back finish (leaving it cordoned would only lose capacity).
func (st *rolloutStep) advance() {
	ro, req := st.ro, st.req
	running := ro.State == keys.RolloutRunning
	timeout := time.Duration(req.NodeTimeoutSeconds) * time.Second
	for _, hwid := range ro.Nodes {
		p := ro.Per[hwid]
		n := st.node(hwid)
		switch p.Phase {
		case keys.PhasePending:
			if running && st.ready(hwid) && n.Image == req.Image {
				ns := st.state(hwid)
				if ns.Image != req.Image {
					ns.Image = req.Image
					st.putState(hwid)
				}
				p.Phase, p.Finished = keys.PhaseSkipped, st.now
				st.dirty = true
				st.event("node/"+hwid, "rollout-skipped", "already runs %s", req.Image)
			}
		case keys.PhaseDraining:
			ns := st.state(hwid)
			switch {
			case st.uncordoned(hwid, p):
				// The operator wants the node in service: the rollout lets go of it and waits.
				p.SpecRev = st.specRev(hwid)
				st.release(hwid)
				if running {
					st.pause(hwid, p, "it was uncordoned during its upgrade")
				}
				st.dirty = true
			case running && p.Error != "":
				p.Error, p.Since = "", st.now // resumed: take the node again and wait afresh
				if ns.Rollout != ro.ID {
					ns.Rollout, ns.Drained = ro.ID, false
					st.putState(hwid)
				}
				st.dirty = true
			case ns.Rollout != ro.ID:
				// Let go of (uncordoned, paused): nothing to do until resumed.
			case ns.Drained && st.ready(hwid):
				st.reboot(hwid, p, n)
			case running && st.now.Sub(p.Since) > timeout:
				st.pause(hwid, p, fmt.Sprintf("not drained within %s (see 'herdctl vm list' for VMs that cannot move)", timeout))
			}
		case keys.PhaseRebooting:
			cmd, _ := st.command(hwid, p)
			switch {
			case n != nil && n.BootID != p.BootID && n.Image == req.Image:
				st.release(hwid)
				p.Phase, p.Finished, p.Error = keys.PhaseDone, st.now, ""
				st.dirty = true
				st.event("node/"+hwid, "rollout-upgraded", "back on %s (boot %s) after %s", req.Image, n.BootID, st.now.Sub(p.Began).Round(time.Second))
			case n != nil && n.BootID != p.BootID:
				if p.Error == "" && running {
					st.pause(hwid, p, fmt.Sprintf("rebooted into image %q, not %s: is %s served ('herdctl image list')?", n.Image, req.Image, req.Image))
				}
			case running && p.Error != "":
				// Resumed after a failure or a timeout: ask again if the old boot still runs.
				if n != nil && n.BootID == p.BootID {
					st.reboot(hwid, p, n)
				} else {
					p.Error, p.Since = "", st.now
					st.dirty = true
				}
			case cmd != nil && cmd.Result != nil && cmd.Result.State == keys.CmdFailed && running:
				st.pause(hwid, p, "the reboot command failed: "+cmd.Result.Error)
			case running && st.now.Sub(p.Since) > timeout:
				st.pause(hwid, p, fmt.Sprintf("did not come back on %s within %s", req.Image, timeout))
			}
		}
	}
}

// start begins the next nodes while the unavailability budget and the capacity allow, and says
// why it waits when it cannot.
func (st *rolloutStep) start() {
	ro, req := st.ro, st.req
	var inProgress, notReady []string
	pendingReady := 0
	for _, hwid := range ro.Nodes {
		p := ro.Per[hwid]
		switch {
		case p.Error != "":
			return // a paused node must be dealt with first
		case p.Phase == keys.PhaseRemoved:
		case p.Phase == keys.PhaseDraining || p.Phase == keys.PhaseRebooting:
			inProgress = append(inProgress, hwid)
		case !st.ready(hwid):
			notReady = append(notReady, hwid)
		case p.Phase == keys.PhasePending:
			pendingReady++
		}
	}
	slots := req.MaxUnavailable - len(inProgress) - len(notReady)
	if len(inProgress) == 0 {
		switch {
		case pendingReady > 0 && slots <= 0:
			st.wait(fmt.Sprintf("waiting: %s not ready, which uses up max-unavailable %d (bring it back, or raise the budget: abort and start again)",
				strings.Join(notReady, ", "), req.MaxUnavailable))
			return
		case pendingReady == 0 && len(notReady) > 0 && !st.allOver(notReady):
			st.wait(fmt.Sprintf("waiting for %s to become ready: a node is upgraded while it runs (abort and start again with --nodes to leave it out)",
				strings.Join(notReady, ", ")))
			return
		}
	}
	out := map[string]bool{} // nodes whose VMs must find room elsewhere
	for _, h := range inProgress {
		out[h] = true
	}
	for _, hwid := range ro.Nodes {
		if slots <= 0 {
			break
		}
		p := ro.Per[hwid]
		if p.Phase != keys.PhasePending || !st.ready(hwid) {
			continue
		}
		out[hwid] = true
		if why := st.s.fits(st.placed, out); why != "" {
			delete(out, hwid)
			st.wait(fmt.Sprintf("waiting for capacity: the VMs of %s do not fit on the other nodes (%s)", hwid, why))
			return
		}
		ns := st.state(hwid)
		p.Phase, p.Began, p.Since = keys.PhaseDraining, st.now, st.now
		p.PrevImage, p.SpecRev = ns.Image, st.specRev(hwid)
		ns.Rollout, ns.Drained, ns.Image = ro.ID, false, req.Image
		st.putState(hwid)
		ro.Reason = ""
		slots--
		st.event("node/"+hwid, "rollout-draining", "cordoned, pinned to %s, draining", req.Image)
	}
}

// wait records why the rollout cannot start a node, with an event when the reason changes.
func (st *rolloutStep) wait(reason string) {
	if st.ro.Reason == reason {
		return
	}
	st.ro.Reason = reason
	st.dirty = true
	st.event("rollout/"+st.ro.ID, "waiting", "%s", reason)
}

func (st *rolloutStep) allOver(hwids []string) bool {
	for _, h := range hwids {
		if !st.ro.Per[h].Over() {
			return false
		}
	}
	return true
}

// follow keeps the fleet in step with the hardware records: a node whose record was deleted before
// its turn leaves the rollout (it can no longer join); with a selector that follows enrolment,
// hardware enrolled since the start joins at the end of the order.
func (st *rolloutStep) follow() {
	ro := st.ro
	for _, hwid := range ro.Nodes {
		p := ro.Per[hwid]
		if p.Phase == keys.PhasePending && st.s.Hardware[hwid] == nil {
			p.Phase, p.Finished = keys.PhaseRemoved, st.now
			st.dirty = true
			st.event("node/"+hwid, "rollout-removed", "hardware record deleted: left out of the rollout")
		}
	}
	sel, err := keys.ParseNodeSelector(st.req.Selector)
	if err != nil || sel.Fixed() {
		return // a record edited into nonsense keeps the nodes it has
	}
	var added []string
	for hwid, h := range st.s.Hardware {
		if ro.Per[hwid] == nil && sel.Matches(hwid, h) {
			added = append(added, hwid)
		}
	}
	sort.Strings(added)
	for _, hwid := range added {
		ro.Nodes = append(ro.Nodes, hwid)
		ro.Per[hwid] = &keys.RolloutNode{Phase: keys.PhasePending}
		st.dirty = true
		st.event("node/"+hwid, "rollout-added", "enrolled during the rollout: joins it after the others")
	}
}

// fits reports why the VMs on the nodes in out would not fit on the others ("" if they do),
// asking the scheduler over the round's snapshot.
func (s *view) fits(placed []scheduler.VM, out map[string]bool) string {
	var stay, move []scheduler.VM
	for _, vm := range placed {
		if out[vm.Node] {
			vm.Node = ""
			move = append(move, vm)
		} else {
			stay = append(stay, vm)
		}
	}
	if len(move) == 0 {
		return ""
	}
	sort.Slice(move, func(i, j int) bool { return move[i].UID < move[j].UID })
	checks := append(scheduler.Placement(), scheduler.Excluding("taken out by the rollout", out))
	sched := scheduler.Schedule(scheduler.Snapshot{Nodes: s.nodes, Placed: stay, Pending: move, Checkers: checks}, s.cfg.Scheduler)
	if len(sched.Failures) == 0 {
		return ""
	}
	f := sched.Failures[0]
	return fmt.Sprintf("%d VMs without room, e.g. %s: %s", len(sched.Failures), f.VM, f.Message)
}

// finish ends a rollout whose every node is done.
func (st *rolloutStep) finish() {
	ro := st.ro
	var took []string
	for _, hwid := range ro.Nodes {
		p := ro.Per[hwid]
		if !p.Over() {
			return
		}
		if p.Phase == keys.PhaseDone {
			took = append(took, p.Finished.Sub(p.Began).Round(time.Second).String())
		}
	}
	ro.State, ro.Ended, ro.Reason = keys.RolloutDone, st.now, ""
	st.dirty = true
	st.event("rollout/"+ro.ID, "done", "%d nodes on %s in %s (per node: %s)", len(ro.Nodes), st.req.Image,
		st.now.Sub(st.req.Started).Round(time.Second), strings.Join(took, ", "))
}

// abort stops the rollout: nodes not yet rebooted get their pin back; a node whose reboot is under
// way keeps its pin (it boots the new image); every node the rollout cordoned is released.
func (st *rolloutStep) abort(why string) {
	ro := st.ro
	for _, hwid := range ro.Nodes {
		p := ro.Per[hwid]
		if p == nil {
			continue
		}
		switch p.Phase {
		case keys.PhaseDraining:
			st.release(hwid)
			st.states[hwid].Image = p.PrevImage
		case keys.PhaseRebooting:
			cmd, kv := st.command(hwid, p)
			st.release(hwid)
			if cmd != nil && cmd.Result == nil {
				// Not picked up yet: withdraw it, and the pin with it.
				st.conds = append(st.conds, ModRev(kv.Key, kv.ModRevision))
				st.ops = append(st.ops, Del(kv.Key))
				st.states[hwid].Image = p.PrevImage
			}
		default:
			continue
		}
		p.Phase, p.Finished = keys.PhaseAborted, st.now
		st.dirty = true
	}
	st.releaseStale(ro.ID)
	ro.State, ro.Ended, ro.Reason = keys.RolloutAborted, st.now, why
	st.dirty = true
	st.event("rollout/"+ro.ID, "aborted", "%s: nodes not yet rebooted keep their image; every node is schedulable", why)
	st.gauge()
}
