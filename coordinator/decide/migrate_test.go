package decide

import (
	"strings"
	"testing"
	"time"

	"github.com/herdhq/herd/lib/keys"
)

// migrating is the steady world with an operator's migrate request for a's VM, opened.
func migrating(t *testing.T) (w *world, name, src, dst string) {
	w = steady(t)
	name = "a"
	src = w.placedOn(name)
	w.put(w.sp.VMMigrate(name), &keys.MigrateRequest{Requested: w.now}, 0)
	w.round()
	pl := get[keys.Placement](w, w.sp.Placement(name))
	if pl.Migration == nil {
		t.Fatalf("no migration opened; last plan %v", actions(w.last))
	}
	return w, name, src, pl.Migration.To
}

func TestMigration(t *testing.T) {
	cases := []struct {
		name  string
		check func(t *testing.T, w *world, name, src, dst string)
	}{
		{"opening writes both assignments and consumes the request in one write", func(t *testing.T, w *world, name, src, dst string) {
			if src == dst || w.has(w.sp.VMMigrate(name)) {
				t.Fatalf("src %s dst %s, request left %v", src, dst, w.has(w.sp.VMMigrate(name)))
			}
			sa, da := get[keys.Assignment](w, w.sp.Assign(src, name)), get[keys.Assignment](w, w.sp.Assign(dst, name))
			pl := get[keys.Placement](w, w.sp.Placement(name))
			if sa.Outgoing == nil || sa.Outgoing.To != dst || sa.Outgoing.Mode != keys.ModeLive || da.Incoming != pl.Migration.ID {
				t.Fatalf("source %+v target %+v", sa.Outgoing, da.Incoming)
			}
			if sa.Outgoing.Address != "10.1.0."+dst[len(dst)-1:] || !strings.HasPrefix(sa.Outgoing.PeerURI, "qemu+tls://"+dst) {
				t.Fatalf("outgoing %+v", sa.Outgoing)
			}
			// Only the source may run it while the migration is open.
			if got := w.runnable(name); len(got) != 1 || got[0] != src {
				t.Fatalf("runnable on %v", got)
			}
		}},
		{"the target reporting the domain running commits it with epoch + 1", func(t *testing.T, w *world, name, src, dst string) {
			id := get[keys.Placement](w, w.sp.Placement(name)).Migration.ID
			w.report(dst, name, keys.StateRunning, func(st *keys.VMStatus) { st.Migration = id })
			p := w.decide()
			if !contains(actions(p), "commit migration vm/"+name) || p.Count(MetricMigrationDone) != 1 {
				t.Fatalf("actions %v", actions(p))
			}
			w.apply(p)
			pl := get[keys.Placement](w, w.sp.Placement(name))
			if pl.Node != dst || pl.Epoch != 2 || pl.Migration != nil || w.has(w.sp.Assign(src, name)) {
				t.Fatalf("placement %+v", pl)
			}
			if a := get[keys.Assignment](w, w.sp.Assign(dst, name)); a.Incoming != "" || a.Epoch != 2 {
				t.Fatalf("target assignment %+v", a)
			}
		}},
		{"the source reporting done commits it too", func(t *testing.T, w *world, name, src, dst string) {
			id := get[keys.Placement](w, w.sp.Placement(name)).Migration.ID
			w.report(src, name, keys.StateMigrating, func(st *keys.VMStatus) { st.Migration, st.MigrationResult = id, keys.MigrationDone })
			w.round()
			if w.placedOn(name) != dst {
				t.Fatalf("on %q", w.placedOn(name))
			}
		}},
		{"a failed migration is aborted: the VM stays on its source with a problem, and backs off", func(t *testing.T, w *world, name, src, dst string) {
			id := get[keys.Placement](w, w.sp.Placement(name)).Migration.ID
			w.report(src, name, keys.StateRunning, func(st *keys.VMStatus) {
				st.Migration, st.MigrationResult = id, keys.MigrationFailed+": connection refused"
			})
			w.round()
			pl := get[keys.Placement](w, w.sp.Placement(name))
			if pl.Node != src || pl.Migration != nil || w.has(w.sp.Assign(dst, name)) || !strings.HasPrefix(w.problem(name), keys.ProblemMigration) {
				t.Fatalf("placement %+v problem %q", pl, w.problem(name))
			}
			if a := get[keys.Assignment](w, w.sp.Assign(src, name)); a.Outgoing != nil {
				t.Fatal("the source still sends")
			}
			// A drain now waits out the backoff before it tries again.
			w.put(w.sp.NodeSpec(src), &keys.NodeSpec{Cordoned: true, Drain: true}, 0)
			if p := w.decide(); hasPrefix(actions(p), "open migration") || p.After <= 0 {
				t.Fatalf("actions %v after %s", actions(p), p.After)
			}
			w.advance(MigrationBackoff + time.Second)
			if got := actions(w.decide()); !contains(got, "open migration vm/"+name) {
				t.Fatalf("after the backoff: %v", got)
			}
		}},
		{"the source fenced mid-way aborts the migration, and the fence moves the VM on", func(t *testing.T, w *world, name, src, dst string) {
			w.lose(src)
			w.fenceOutcome(src, "boot-1", keys.FenceFenced)
			w.settle()
			pl := get[keys.Placement](w, w.sp.Placement(name))
			if pl.Migration != nil || pl.Node == src {
				t.Fatalf("placement %+v", pl)
			}
			if got := w.runnable(name); len(got) != 1 || got[0] == src {
				t.Fatalf("runnable on %v", got)
			}
		}},
		{"the target fenced mid-way aborts the migration", func(t *testing.T, w *world, name, src, dst string) {
			w.lose(dst)
			w.fenceOutcome(dst, "boot-1", keys.FenceFenced)
			w.settle()
			if pl := get[keys.Placement](w, w.sp.Placement(name)); pl.Migration != nil || pl.Node != src {
				t.Fatalf("placement %+v", pl)
			}
		}},
		{"a stale migrate request of a VM no longer placed is dropped", func(t *testing.T, w *world, name, src, dst string) {
			w.put(w.sp.VMMigrate("new"), &keys.MigrateRequest{}, 0)
			w.vm("new", 64, 1024) // fits nowhere: stays unplaced
			w.settle()
			if w.has(w.sp.VMMigrate("new")) {
				t.Fatal("request left")
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			w, name, src, dst := migrating(t)
			c.check(t, w, name, src, dst)
		})
	}
}

func TestDrainAndMigrationTargets(t *testing.T) {
	t.Run("a drained node's VMs migrate within the per-node limit, then it is marked drained", func(t *testing.T) {
		w := newWorld(t)
		w.node("n1", 8, 16)
		w.node("n2", 8, 16)
		for _, n := range []string{"a", "b", "c"} {
			w.vm(n, 1, 512)
		}
		w.put(w.sp.NodeSpec("n2"), &keys.NodeSpec{Cordoned: true}, 0)
		w.settle()
		w.del(w.sp.NodeSpec("n2"))
		w.put(w.sp.NodeSpec("n1"), &keys.NodeSpec{Cordoned: true, Drain: true}, 0)
		p := w.decide()
		if n := p.Count(MetricMigrationStarted); n != w.cfg.MaxMigrationsPerNode {
			t.Fatalf("%d migrations opened, limit %d: %v", n, w.cfg.MaxMigrationsPerNode, actions(p))
		}
		w.apply(p)
		// Each target reports its VM running; the drain continues until n1 is empty.
		for i := 0; i < 5; i++ {
			for _, n := range []string{"a", "b", "c"} {
				if pl := get[keys.Placement](w, w.sp.Placement(n)); pl.Migration != nil {
					w.report(pl.Migration.To, n, keys.StateRunning, func(st *keys.VMStatus) { st.Migration = pl.Migration.ID })
				}
			}
			w.settle()
		}
		for _, n := range []string{"a", "b", "c"} {
			if w.placedOn(n) != "n2" {
				t.Fatalf("%s on %q", n, w.placedOn(n))
			}
		}
		if !get[keys.NodeState](w, w.sp.NodeState("n1")).Drained {
			t.Fatal("n1 not marked drained")
		}
		// Uncordoned: the drained mark goes.
		w.del(w.sp.NodeSpec("n1"))
		w.settle()
		if get[keys.NodeState](w, w.sp.NodeState("n1")).Drained {
			t.Fatal("drained mark kept after the drain ended")
		}
	})
	t.Run("a VM that cannot move says why in its problem, naming the checkers", func(t *testing.T) {
		w := newWorld(t)
		w.node("n1", 4, 8)
		w.node("n2", 4, 8, "zone=b")
		w.vm("a", 1, 512, withSelector("zone", "b"))
		w.settle()
		w.put(w.sp.NodeSpec("n2"), &keys.NodeSpec{Cordoned: true, Drain: true}, 0)
		w.settle()
		pr := w.problem("a")
		if !strings.Contains(pr, "cannot move off n2 (drain)") || !strings.Contains(pr, "1 node: unschedulable: cordoned") || !strings.Contains(pr, "1 node: node selector does not match") {
			t.Fatalf("problem %q", pr)
		}
		// An operator's request: the VM's own node is ruled out by the migration's own checker.
		w.del(w.sp.NodeSpec("n2"))
		w.put(w.sp.VMMigrate("a"), &keys.MigrateRequest{}, 0)
		w.settle()
		if pr := w.problem("a"); !strings.Contains(pr, "cannot move off n2 (operator)") || !strings.Contains(pr, "1 node: the VM's own node") {
			t.Fatalf("problem %q", pr)
		}
	})
	t.Run("a requested target is used, and a requested target that cannot take it is named", func(t *testing.T) {
		w := newWorld(t)
		w.node("n1", 4, 8)
		w.node("n2", 4, 8)
		w.node("n3", 4, 8)
		w.vm("a", 1, 512)
		w.settle()
		src := w.placedOn("a")
		to := "n3"
		if src == "n3" {
			to = "n2"
		}
		w.put(w.sp.VMMigrate("a"), &keys.MigrateRequest{To: to}, 0)
		w.round()
		if pl := get[keys.Placement](w, w.sp.Placement("a")); pl.Migration == nil || pl.Migration.To != to {
			t.Fatalf("placement %+v", pl)
		}

		w2 := newWorld(t)
		w2.node("n1", 4, 8)
		w2.node("n2", 4, 8)
		w2.vm("a", 1, 512)
		w2.settle()
		other := "n1"
		if w2.placedOn("a") == "n1" {
			other = "n2"
		}
		w2.put(w2.sp.NodeSpec(other), &keys.NodeSpec{Cordoned: true}, 0)
		w2.put(w2.sp.VMMigrate("a"), &keys.MigrateRequest{To: other}, 0)
		w2.settle()
		if pr := w2.problem("a"); !strings.Contains(pr, "cordoned") {
			t.Fatalf("problem %q", pr)
		}
	})
	t.Run("a stopped VM moves by restart, not live", func(t *testing.T) {
		w := steady(t)
		spec := get[keys.VMSpec](w, w.sp.VMSpec("a"))
		spec.Power = keys.PowerStopped
		w.put(w.sp.VMSpec("a"), spec, 0)
		w.settle()
		w.put(w.sp.VMMigrate("a"), &keys.MigrateRequest{}, 0)
		w.round()
		pl := get[keys.Placement](w, w.sp.Placement("a"))
		if pl.Migration == nil || pl.Migration.Mode != keys.ModeRestart {
			t.Fatalf("placement %+v", pl.Migration)
		}
		// The source stopped it (evicted): it may start on the target.
		src := pl.Node
		w.report(src, "a", keys.StateStopped, func(st *keys.VMStatus) { st.Migration, st.MigrationResult = pl.Migration.ID, keys.MigrationEvicted })
		w.round()
		if w.placedOn("a") != pl.Migration.To {
			t.Fatalf("on %q", w.placedOn("a"))
		}
	})
	t.Run("a target without a migration URI is refused for a live migration", func(t *testing.T) {
		w := steady(t)
		other := "n2"
		if w.placedOn("a") == "n2" {
			other = "n1"
		}
		n := get[keys.Node](w, w.sp.Node(other))
		n.MigrationURI = ""
		w.put(w.sp.Node(other), n, w.kv[w.sp.Node(other)].lease)
		w.put(w.sp.VMMigrate("a"), &keys.MigrateRequest{}, 0)
		w.settle()
		if pr := w.problem("a"); !strings.Contains(pr, "--migration-uri") {
			t.Fatalf("problem %q", pr)
		}
	})
}
