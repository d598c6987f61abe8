package decide

import (
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/herdhq/herd/coordinator/scheduler"
	"github.com/herdhq/herd/lib/keys"
)

// Live migration, as the reference design has it: one leader transaction sets placement.migration
// and writes both nodes' assignments (the target's says "incoming": expect it, never start it; the
// source's says where to send it). Nobody starts or resumes a VM while a migration is open. The
// source migrates and reports; the leader commits {node: to, epoch + 1} when the target reports the
// domain running, or the source reports it done. Every decision comes from what the agents report
// of their libvirt, so a leader, source or target dying mid-way is settled by the next round.

// MigrationBackoff is how long a VM whose migration failed waits before a drain tries again.
const MigrationBackoff = 30 * time.Second

// openMigration is what a round knows about one open migration.
type openMigration struct {
	name string
	v    *VM
	spec *keys.VMSpec
	pl   *keys.Placement
}

// settle decides an open migration: commit, abort, or wait.
func (s *view) settle(m openMigration, fates map[string]nodeFate) (Action, bool) {
	mig, src, dst := m.pl.Migration, m.pl.Node, m.pl.Migration.To
	srcSt, dstSt := s.status(src, m.name), s.status(dst, m.name)
	srcResult := ""
	if srcSt != nil && srcSt.Migration == mig.ID {
		srcResult = srcSt.MigrationResult
	}
	dstRunning := dstSt != nil && dstSt.Migration == mig.ID && dstSt.UID == m.pl.UID && dstSt.State == keys.StateRunning
	srcFenced, dstFenced := fates[src].move, fates[dst].move

	switch mig.Mode {
	case keys.ModeRestart:
		// The source stopped the VM (or is fenced): it may start on the target.
		if srcResult == keys.MigrationEvicted || srcFenced {
			return s.finishMigration(m, "restarted"), true
		}
		if dstFenced {
			return s.abortMigration(m, "the target node was lost"), true
		}
	default:
		switch {
		case dstRunning || srcResult == keys.MigrationDone:
			// The domain lives on the target now (even if the target died since: its fence then
			// moves the VM on from there).
			return s.finishMigration(m, "migrated"), true
		case strings.HasPrefix(srcResult, keys.MigrationFailed):
			return s.abortMigration(m, srcResult), true
		case srcFenced:
			// The source is fenced: no migration can still complete, and the target does not
			// run the VM. Back to the source's placement, which the fence then moves.
			return s.abortMigration(m, "the source node was lost before the migration completed"), true
		case dstFenced:
			return s.abortMigration(m, "the target node was lost"), true
		}
	}
	return Action{}, false
}

// finishMigration commits the VM to the target with epoch + 1: placement, the target's assignment
// (no longer incoming), the source's assignment and status removed.
func (s *view) finishMigration(m openMigration, how string) Action {
	sp := s.cfg.Space
	pl := m.pl
	npl := *pl
	npl.Node, npl.Epoch, npl.Migration = pl.Migration.To, pl.Epoch+1, nil
	npl.Since, npl.By, npl.Term = s.Now.UTC(), s.cfg.Name, s.cfg.Term
	s.setSpec(&npl, m.v.Spec.ModRevision, m.spec)
	asg := assignmentFor(&npl, m.spec)
	src, dst, took := pl.Node, pl.Migration.To, s.Now.Sub(pl.Migration.Started)
	return Action{Object: "vm/" + m.name, What: "commit migration",
		Conds: []Cond{ModRev(sp.Placement(m.name), m.v.Placement.ModRevision)},
		Writes: []Write{Put(sp.Placement(m.name), keys.MustEncode(&npl)), Put(sp.Assign(dst, m.name), keys.MustEncode(&asg)),
			Del(sp.Assign(src, m.name)), Del(sp.Status(src, m.name)), Del(sp.Problem(m.name))},
		Notes: []Note{{Level: Info, Log: "migration committed", Args: []any{"vm", m.name, "from", src, "to", dst, "epoch", npl.Epoch, "took", took.Round(time.Millisecond)},
			Object: "vm/" + m.name, Event: "moved", Message: fmt.Sprintf("%s from %s to %s (epoch %d) in %s", how, src, dst, npl.Epoch, took.Round(time.Millisecond))}},
		Metrics: []Metric{MetricMigrationDone}, Since: pl.Migration.Started}
}

// abortMigration clears the migration: the VM stays (or is again) the source's.
func (s *view) abortMigration(m openMigration, why string) Action {
	sp := s.cfg.Space
	pl := m.pl
	npl := *pl
	npl.Migration, npl.By, npl.Term = nil, s.cfg.Name, s.cfg.Term
	src, dst := pl.Node, pl.Migration.To
	asg := assignmentFor(&npl, m.spec)
	p := keys.Problem{UID: pl.UID, Kind: keys.ProblemMigration, Message: fmt.Sprintf("migration to %s failed: %s", dst, why), Since: s.Now.UTC()}
	// Backing off starts now: should the write conflict, the next round looks again anyway.
	s.st.MigFailed[m.name] = s.Now
	return Action{Object: "vm/" + m.name, What: "abort migration",
		Conds: []Cond{ModRev(sp.Placement(m.name), m.v.Placement.ModRevision)},
		Writes: []Write{Put(sp.Placement(m.name), keys.MustEncode(&npl)), Del(sp.Assign(dst, m.name)), Del(sp.Status(dst, m.name)),
			Put(sp.Assign(src, m.name), keys.MustEncode(&asg)), Put(sp.Problem(m.name), keys.MustEncode(&p))},
		Notes: []Note{{Level: Warn, Log: "migration aborted; the VM stays on its source", Args: []any{"vm", m.name, "from", src, "to", dst, "why", why},
			Object: "vm/" + m.name, Event: "migration-aborted", Message: fmt.Sprintf("to %s: %s", dst, why)}},
		Metrics: []Metric{MetricMigrationFailed}}
}

// recentlyFailed: a VM whose migration failed waits before the next attempt, so a drain does not
// hammer a broken target.
func (s *view) recentlyFailed(name string) bool {
	t, ok := s.st.MigFailed[name]
	if ok && s.Now.Sub(t) > MigrationBackoff {
		delete(s.st.MigFailed, name)
		return false
	}
	if ok {
		s.after(MigrationBackoff - s.Now.Sub(t))
	}
	return ok
}

// wantMove is a VM someone wants elsewhere: an operator's request, or a drain.
type wantMove struct {
	name   string
	v      *VM
	spec   *keys.VMSpec
	pl     *keys.Placement
	to     string // requested target, or "" for the scheduler's choice
	reason string
}

// startMigrations picks targets for the wanted moves within the per-node limit and returns the
// transactions that open them. busy counts open migrations per node (source or target).
func (s *view) startMigrations(wants []wantMove, placed []scheduler.VM, busy map[string]int) []Action {
	var acts []Action
	sort.Slice(wants, func(i, j int) bool { return wants[i].pl.UID < wants[j].pl.UID })
	limit := s.cfg.MaxMigrationsPerNode
	for _, w := range wants {
		src := w.pl.Node
		if busy[src] >= limit || s.recentlyFailed(w.name) {
			continue
		}
		// A migration target: any node placement allows but the VM's own, one of the operator's
		// choosing if it chose, and one with a free migration slot.
		checks := append(scheduler.Placement(),
			scheduler.Excluding("the VM's own node", map[string]bool{src: true}),
			scheduler.NewChecker("migration-slots", func(n *scheduler.NodeUse, _ *scheduler.VM) string {
				if busy[n.HWID] >= limit {
					return fmt.Sprintf("at its limit of %d open migrations", limit)
				}
				return ""
			}))
		if w.to != "" {
			checks = append(checks, scheduler.Only(w.to))
		}
		vm := onNICs(schedVM(w.name, w.pl.UID, w.spec, ""), w.pl.NICs)
		sched := scheduler.Schedule(scheduler.Snapshot{Nodes: s.nodes, Placed: placed, Pending: []scheduler.VM{vm}, Checkers: checks}, s.cfg.Scheduler)
		if len(sched.Placements) == 0 {
			msg := "no node can take it"
			if len(sched.Failures) > 0 {
				msg = sched.Failures[0].Message
			}
			if a, ok := s.setProblem(w.name, w.pl.UID, w.v.Problem, keys.ProblemPending, fmt.Sprintf("cannot move off %s (%s): %s", src, w.reason, msg), nil); ok {
				acts = append(acts, a)
			}
			continue
		}
		dst := sched.Placements[0].Node
		mode := keys.ModeLive
		if w.spec.MigrationPolicy == keys.MigrateRestart || !w.spec.WantsRunning() {
			mode = keys.ModeRestart
		}
		target := s.live[dst].Value
		if mode == keys.ModeLive && target.MigrationURI == "" {
			if a, ok := s.setProblem(w.name, w.pl.UID, w.v.Problem, keys.ProblemPending, fmt.Sprintf("cannot migrate to %s: its agent advertises no --migration-uri; give the VM migration_policy restart (herdctl vm apply) to move it by a restart, or the nodes a --migration-uri", dst), nil); ok {
				acts = append(acts, a)
			}
			continue
		}
		acts = append(acts, s.openMigration(w, dst, mode, target))
		busy[src]++
		busy[dst]++
		vm.Node = dst
		placed = append(placed, vm) // reserve the target for the rest of this round
	}
	return acts
}

// openMigration writes placement.migration and both assignments in one transaction.
func (s *view) openMigration(w wantMove, dst, mode string, target *keys.Node) Action {
	sp := s.cfg.Space
	mig := &keys.Migration{ID: s.cfg.id(), To: dst, Mode: mode, Reason: w.reason, Started: s.Now.UTC()}
	npl := *w.pl
	npl.Migration, npl.By, npl.Term = mig, s.cfg.Name, s.cfg.Term
	s.setSpec(&npl, w.v.Spec.ModRevision, w.spec)
	srcAsg := assignmentFor(&npl, w.spec)
	addr := target.Addresses.Migration
	if addr == "" {
		addr = target.Addresses.Management
	}
	srcAsg.Outgoing = &keys.Outgoing{ID: mig.ID, To: dst, Mode: mode, PeerURI: target.MigrationURI, Address: addr}
	// The target expects the VM and never starts it itself; for a restart, the leader's commit
	// (after the source stopped it) turns this into a plain assignment that starts it.
	dstAsg := assignmentFor(&npl, w.spec)
	dstAsg.Incoming = mig.ID
	conds := []Cond{ModRev(sp.Placement(w.name), w.v.Placement.ModRevision), ModRev(sp.VMSpec(w.name), w.v.Spec.ModRevision)}
	writes := []Write{Put(sp.Placement(w.name), keys.MustEncode(&npl)), Put(sp.Assign(w.pl.Node, w.name), keys.MustEncode(&srcAsg)),
		Put(sp.Assign(dst, w.name), keys.MustEncode(&dstAsg))}
	if w.v.Migrate != nil {
		conds = append(conds, ModRev(w.v.Migrate.Key, w.v.Migrate.ModRevision))
		writes = append(writes, Del(w.v.Migrate.Key))
	}
	src := w.pl.Node
	return Action{Object: "vm/" + w.name, What: "open migration", Conds: conds, Writes: writes,
		Notes: []Note{{Level: Info, Log: "migration started", Args: []any{"vm", w.name, "from", src, "to", dst, "mode", mode, "reason", w.reason},
			Object: "vm/" + w.name, Event: "migrating", Message: fmt.Sprintf("%s from %s to %s (%s)", mode, src, dst, w.reason)}},
		Metrics: []Metric{MetricMigrationStarted}}
}

// drainBookkeeping marks draining nodes drained once nothing is placed on or moving to them, says
// why one is not (the first VM on it that cannot leave), and forgets a drain that is no longer
// asked for (uncordoned, or the rollout moved on).
func (s *view) drainBookkeeping(placedOn map[string][]string, busy map[string]int) []Action {
	var acts []Action
	for _, hwid := range sortedNames(s.States) {
		r := s.States[hwid]
		if r.Err != nil {
			continue
		}
		ns := r.Value
		drained, waiting := ns.Drained, ""
		switch {
		case !s.admin(hwid).Draining:
			drained = false
		case ns.Drained:
		case len(placedOn[hwid]) == 0 && busy[hwid] == 0:
			drained = true
		default:
			waiting = s.drainBlocker(placedOn[hwid])
		}
		if drained == ns.Drained && waiting == ns.Waiting {
			continue
		}
		cp, err := keys.Decode[keys.NodeState](r.Raw)
		if err != nil {
			continue
		}
		cp.Drained, cp.Waiting = drained, waiting
		var notes []Note
		switch {
		case drained && !ns.Drained:
			notes = []Note{{Level: Info, Log: "node drained", Args: []any{"node", hwid}, Object: "node/" + hwid, Event: "drained", Message: "no VM left"}}
		case waiting != "":
			notes = []Note{{Level: Warn, Log: "drain waits", Args: []any{"node", hwid, "why", waiting}, Object: "node/" + hwid, Event: "drain-waits", Message: waiting}}
		}
		acts = append(acts, Action{Object: "node/" + hwid, What: "drain bookkeeping",
			Conds: []Cond{ModRev(r.Key, r.ModRevision)}, Writes: []Write{Put(r.Key, keys.MustEncode(cp))}, Notes: notes})
	}
	return acts
}

// drainBlocker says why a draining node still holds VMs: the first of them whose problem says
// it cannot leave, and how many more cannot; "" while they are simply on their way.
func (s *view) drainBlocker(names []string) string {
	var stuck []string
	first := ""
	for _, name := range slices.Sorted(slices.Values(names)) {
		v := s.VMs[name]
		if v == nil || !v.Problem.OK() || !v.Placement.OK() || v.Problem.Value.UID != v.Placement.Value.UID {
			continue
		}
		if first == "" {
			first = "vm/" + name + ": " + v.Problem.Value.Message
		}
		stuck = append(stuck, name)
	}
	if len(stuck) > 1 {
		first += fmt.Sprintf(" (and %d more VMs that cannot leave)", len(stuck)-1)
	}
	return first
}
