package coordinator

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/herdhq/herd/coordinator/scheduler"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

// Live migration, as the reference design has it: one leader transaction sets placement.migration
// and writes both nodes' assignments (the target's says "incoming": expect it, never start it; the
// source's says where to send it). Nobody starts or resumes a VM while a migration is open. The
// source migrates and reports; the leader commits {node: to, epoch + 1} when the target reports the
// domain running, or the source reports it done. Every decision comes from what the agents report
// of their libvirt, so a leader, source or target dying mid-way is settled by the next round.

// openMigration is what a round knows about one open migration.
type openMigration struct {
	name string
	v    vmKeys
	spec *keys.VMSpec
	pl   *keys.Placement
}

// status returns a VM's status on a node, decoded, or nil.
func (s *snapshotView) status(node, name string) *keys.VMStatus {
	kv := s.statuses[node][name]
	if kv == nil || kv.Err != nil {
		return nil
	}
	return kv.Obj.(*keys.VMStatus)
}

// settle decides an open migration: commit, abort, or wait.
func (c *Coordinator) settle(g etcdutil.Guard, s *snapshotView, m openMigration, fates map[string]nodeFate) (action, bool) {
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
			return c.finishMigration(g, m, "restarted"), true
		}
		if dstFenced {
			return c.abortMigration(g, m, "the target node was lost"), true
		}
	default:
		switch {
		case dstRunning || srcResult == keys.MigrationDone:
			// The domain lives on the target now (even if the target died since: its fence then
			// moves the VM on from there).
			return c.finishMigration(g, m, "migrated"), true
		case strings.HasPrefix(srcResult, keys.MigrationFailed):
			return c.abortMigration(g, m, srcResult), true
		case srcFenced:
			// The source is fenced: no migration can still complete, and the target does not
			// run the VM. Back to the source's placement, which the fence then moves.
			return c.abortMigration(g, m, "the source node was lost before the migration completed"), true
		case dstFenced:
			return c.abortMigration(g, m, "the target node was lost"), true
		}
	}
	return action{}, false
}

// finishMigration commits the VM to the target with epoch + 1: placement, the target's assignment
// (no longer incoming), the source's assignment and status removed.
func (c *Coordinator) finishMigration(g etcdutil.Guard, m openMigration, how string) action {
	pl := m.pl
	npl := *pl
	npl.Node, npl.Epoch, npl.Migration = pl.Migration.To, pl.Epoch+1, nil
	npl.Since, npl.By, npl.Term = time.Now().UTC(), c.cfg.Name, g.Rev
	setSpec(&npl, m.v.spec.ModRevision, m.spec)
	asg := assignmentFor(&npl, m.spec)
	src, dst, took := pl.Node, pl.Migration.To, time.Since(pl.Migration.Started)
	return action{vm: m.name, what: "commit migration",
		conds: []etcdutil.Cmp{etcdutil.ModRev(c.space.Placement(m.name), m.v.placement.ModRevision)},
		ops: []etcdutil.Op{
			etcdutil.OpPut(c.space.Placement(m.name), keys.MustEncode(&npl)),
			etcdutil.OpPut(c.space.Assign(dst, m.name), keys.MustEncode(&asg)),
			etcdutil.OpDelete(c.space.Assign(src, m.name)),
			etcdutil.OpDelete(c.space.Status(src, m.name)),
			etcdutil.OpDelete(c.space.Problem(m.name)),
		},
		after: func() {
			c.m.migrations.WithLabelValues("done").Inc()
			c.m.migrationSeconds.Observe(took.Seconds())
			c.log.Info("migration committed", "vm", m.name, "from", src, "to", dst, "epoch", npl.Epoch, "took", took.Round(time.Millisecond))
			c.events.Record("vm/"+m.name, "moved", "%s from %s to %s (epoch %d) in %s", how, src, dst, npl.Epoch, took.Round(time.Millisecond))
		}}
}

// abortMigration clears the migration: the VM stays (or is again) the source's.
func (c *Coordinator) abortMigration(g etcdutil.Guard, m openMigration, why string) action {
	pl := m.pl
	npl := *pl
	npl.Migration, npl.By, npl.Term = nil, c.cfg.Name, g.Rev
	src, dst := pl.Node, pl.Migration.To
	ops := []etcdutil.Op{
		etcdutil.OpPut(c.space.Placement(m.name), keys.MustEncode(&npl)),
		etcdutil.OpDelete(c.space.Assign(dst, m.name)),
		etcdutil.OpDelete(c.space.Status(dst, m.name)),
	}
	asg := assignmentFor(&npl, m.spec)
	ops = append(ops, etcdutil.OpPut(c.space.Assign(src, m.name), keys.MustEncode(&asg)))
	p := keys.Problem{UID: pl.UID, Kind: keys.ProblemMigration, Message: fmt.Sprintf("migration to %s failed: %s", dst, why), Since: time.Now().UTC()}
	ops = append(ops, etcdutil.OpPut(c.space.Problem(m.name), keys.MustEncode(&p)))
	return action{vm: m.name, what: "abort migration",
		conds: []etcdutil.Cmp{etcdutil.ModRev(c.space.Placement(m.name), m.v.placement.ModRevision)},
		ops:   ops,
		after: func() {
			c.m.migrations.WithLabelValues("failed").Inc()
			c.noteMigrationFailure(m.name)
			c.log.Warn("migration aborted; the VM stays on its source", "vm", m.name, "from", src, "to", dst, "why", why)
			c.events.Record("vm/"+m.name, "migration-aborted", "to %s: %s", dst, why)
		}}
}

func (c *Coordinator) noteMigrationFailure(name string) {
	c.mu.Lock()
	c.migFailures[name] = time.Now()
	c.mu.Unlock()
}

// recentlyFailed: a VM whose migration failed waits before the next attempt, so a drain does not
// hammer a broken target.
func (c *Coordinator) recentlyFailed(name string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	t, ok := c.migFailures[name]
	if ok && time.Since(t) > 30*time.Second {
		delete(c.migFailures, name)
		return false
	}
	return ok
}

// wantMove is a VM someone wants elsewhere: an operator's request, or a drain.
type wantMove struct {
	name   string
	v      vmKeys
	spec   *keys.VMSpec
	pl     *keys.Placement
	to     string // requested target, or "" for the scheduler's choice
	reason string
}

// startMigrations picks targets for the wanted moves within the per-node limit and returns the
// transactions that open them. busy counts open migrations per node (source or target).
func (c *Coordinator) startMigrations(g etcdutil.Guard, s *snapshotView, wants []wantMove, placed []scheduler.VM, busy map[string]int) []action {
	var acts []action
	sort.Slice(wants, func(i, j int) bool { return wants[i].pl.UID < wants[j].pl.UID })
	for _, w := range wants {
		src := w.pl.Node
		if busy[src] >= c.cfg.MaxMigrationsPerNode || c.recentlyFailed(w.name) {
			continue
		}
		nodes := make([]scheduler.Node, 0, len(s.nodes))
		for _, n := range s.nodes {
			if n.HWID == src || (w.to != "" && n.HWID != w.to) || busy[n.HWID] >= c.cfg.MaxMigrationsPerNode {
				continue
			}
			nodes = append(nodes, n)
		}
		vm := schedVM(w.name, w.pl.UID, w.spec, "")
		plan := scheduler.Schedule(scheduler.Snapshot{Nodes: nodes, Placed: placed, Pending: []scheduler.VM{vm}}, c.cfg.Scheduler)
		if len(plan.Placements) == 0 {
			msg := "no node can take it"
			if len(plan.Failures) > 0 {
				msg = plan.Failures[0].Message
			}
			if a, ok := c.setProblem(w.name, w.pl.UID, w.v.problem, keys.ProblemPending, fmt.Sprintf("cannot move off %s (%s): %s", src, w.reason, msg), nil); ok {
				acts = append(acts, a)
			}
			continue
		}
		dst := plan.Placements[0].Node
		mode := keys.ModeLive
		if w.spec.MigrationPolicy == keys.MigrateRestart || !w.spec.WantsRunning() {
			mode = keys.ModeRestart
		}
		target := s.live[dst].Obj.(*keys.Node)
		if mode == keys.ModeLive && target.MigrationURI == "" {
			if a, ok := c.setProblem(w.name, w.pl.UID, w.v.problem, keys.ProblemPending, fmt.Sprintf("cannot migrate to %s: its agent advertises no --migration-uri", dst), nil); ok {
				acts = append(acts, a)
			}
			continue
		}
		acts = append(acts, c.openMigration(g, w, dst, mode, target))
		busy[src]++
		busy[dst]++
		vm.Node = dst
		placed = append(placed, vm) // reserve the target for the rest of this round
	}
	return acts
}

// openMigration writes placement.migration and both assignments in one transaction.
func (c *Coordinator) openMigration(g etcdutil.Guard, w wantMove, dst, mode string, target *keys.Node) action {
	mig := &keys.Migration{ID: uuid.NewString(), To: dst, Mode: mode, Reason: w.reason, Started: time.Now().UTC()}
	npl := *w.pl
	npl.Migration, npl.By, npl.Term = mig, c.cfg.Name, g.Rev
	setSpec(&npl, w.v.spec.ModRevision, w.spec)
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
	conds := []etcdutil.Cmp{
		etcdutil.ModRev(c.space.Placement(w.name), w.v.placement.ModRevision),
		etcdutil.ModRev(c.space.VMSpec(w.name), w.v.spec.ModRevision),
	}
	ops := []etcdutil.Op{
		etcdutil.OpPut(c.space.Placement(w.name), keys.MustEncode(&npl)),
		etcdutil.OpPut(c.space.Assign(w.pl.Node, w.name), keys.MustEncode(&srcAsg)),
		etcdutil.OpPut(c.space.Assign(dst, w.name), keys.MustEncode(&dstAsg)),
	}
	if w.v.migrate != nil {
		conds = append(conds, etcdutil.ModRev(w.v.migrate.Key, w.v.migrate.ModRevision))
		ops = append(ops, etcdutil.OpDelete(w.v.migrate.Key))
	}
	src := w.pl.Node
	return action{vm: w.name, what: "open migration", conds: conds, ops: ops,
		after: func() {
			c.m.migrations.WithLabelValues("started").Inc()
			c.log.Info("migration started", "vm", w.name, "from", src, "to", dst, "mode", mode, "reason", w.reason)
			c.events.Record("vm/"+w.name, "migrating", "%s from %s to %s (%s)", mode, src, dst, w.reason)
		}}
}

// drainBookkeeping marks draining nodes drained once nothing is placed on or moving to them, and
// forgets a drain that is no longer asked for (uncordoned, or the rollout moved on).
func (c *Coordinator) drainBookkeeping(s *snapshotView, placedOn map[string][]string, busy map[string]int) []action {
	var acts []action
	for hwid, kv := range s.states {
		if kv.Err != nil {
			continue
		}
		ns := kv.Obj.(*keys.NodeState)
		a := s.admin(hwid)
		var drained bool
		switch {
		case !a.Draining && ns.Drained:
			drained = false
		case a.Draining && !ns.Drained && len(placedOn[hwid]) == 0 && busy[hwid] == 0:
			drained = true
		default:
			continue
		}
		n := *ns
		n.Drained = drained
		id := hwid
		acts = append(acts, action{vm: "node/" + hwid, what: "mark drained",
			conds: []etcdutil.Cmp{etcdutil.ModRev(kv.Key, kv.ModRevision)},
			ops:   []etcdutil.Op{etcdutil.OpPut(kv.Key, keys.MustEncode(&n))},
			after: func() {
				if drained {
					c.log.Info("node drained", "node", id)
					c.events.Record("node/"+id, "drained", "no VM left")
				}
			}})
	}
	return acts
}
