package decide

import (
	"strings"
	"testing"
	"time"

	"github.com/herdhq/herd/coordinator/scheduler"
	"github.com/herdhq/herd/lib/keys"
)

// Table tests of the decision core: a cluster fixture in, the plan out. Each case builds a world,
// lets it settle where the case needs a steady state, changes one thing, and checks what the next
// rounds decide. No etcd, no goroutine, no clock: each case runs in microseconds.

func withDisk(pool string, gib int64) func(*keys.VMSpec) {
	return func(s *keys.VMSpec) { s.Disk = &keys.Disk{Pool: pool, SizeGiB: gib} }
}

func withSelector(k, v string) func(*keys.VMSpec) {
	return func(s *keys.VMSpec) { s.NodeSelector = map[string]string{k: v} }
}

func withAntiAffinity(group string) func(*keys.VMSpec) {
	return func(s *keys.VMSpec) { s.AntiAffinity = group }
}

// steady is two enrolled nodes, n1 and n2 (4 CPUs, 8 GiB), and VMs a and b (1 vCPU, 1 GiB each)
// placed and running.
func steady(t testing.TB) *world {
	w := newWorld(t)
	w.node("n1", 4, 8)
	w.node("n2", 4, 8)
	w.vm("a", 1, 1024)
	w.vm("b", 1, 1024)
	w.settle()
	for _, name := range []string{"a", "b"} {
		w.report(w.placedOn(name), name, keys.StateRunning)
	}
	w.settle()
	return w
}

// lose crashes a node and runs rounds through the grace period to the fence record.
func (w *world) lose(hwid string) {
	w.t.Helper()
	w.crash(hwid)
	w.round()
	w.advance(w.cfg.Grace + time.Second)
	w.round()
	if !w.has(w.sp.Fence(hwid, "boot-1")) {
		w.t.Fatalf("no fence record for %s after the grace period; last plan %v", hwid, actions(w.last))
	}
}

func TestPlacement(t *testing.T) {
	cases := []struct {
		name  string
		setup func(w *world)
		check func(t *testing.T, w *world)
	}{
		{"a new VM is placed with its assignment in one write", func(w *world) {
			w.node("n1", 4, 8)
			w.vm("a", 2, 2048)
		}, func(t *testing.T, w *world) {
			p := w.decide()
			if got := actions(p); !contains(got, "place vm/a") {
				t.Fatalf("actions %v", got)
			}
			w.apply(p)
			if w.placedOn("a") != "n1" || len(w.runnable("a")) != 1 {
				t.Fatalf("placed on %q, runnable on %v", w.placedOn("a"), w.runnable("a"))
			}
			pl := get[keys.Placement](w, w.sp.Placement("a"))
			if pl.Epoch != 1 || pl.UID != w.uid("a") || pl.VCPUs != 2 || pl.MemoryMiB != 2048 || pl.By != "c1" || pl.Term != 1 {
				t.Fatalf("placement %+v", pl)
			}
			if p.Count(MetricPlacement) != 1 {
				t.Fatal("a placement is counted")
			}
		}},
		{"spread puts two VMs on two nodes", func(w *world) {
			w.node("n1", 4, 8)
			w.node("n2", 4, 8)
			w.vm("a", 1, 1024)
			w.vm("b", 1, 1024)
		}, func(t *testing.T, w *world) {
			w.settle()
			if w.placedOn("a") == w.placedOn("b") {
				t.Fatalf("both on %s", w.placedOn("a"))
			}
		}},
		{"a VM that fits nowhere gets a pending problem with every node's reason", func(w *world) {
			w.node("n1", 4, 8)
			w.vm("big", 2, 64*1024)
		}, func(t *testing.T, w *world) {
			w.settle()
			if w.placedOn("big") != "" || !strings.HasPrefix(w.problem("big"), keys.ProblemPending+": ") {
				t.Fatalf("placed %q, problem %q", w.placedOn("big"), w.problem("big"))
			}
			if p := get[keys.Problem](w, w.sp.Problem("big")); p.Reasons[scheduler.ReasonMemory] != 1 {
				t.Fatalf("reasons %v", p.Reasons)
			}
			if w.last.Pending != 1 {
				t.Fatalf("pending %d", w.last.Pending)
			}
		}},
		{"an invalid spec is a problem, never a placement", func(w *world) {
			w.node("n1", 4, 8)
			w.vm("bad", 0, 1024)
		}, func(t *testing.T, w *world) {
			w.settle()
			if w.placedOn("bad") != "" || !strings.HasPrefix(w.problem("bad"), keys.ProblemInvalid) {
				t.Fatalf("placed %q, problem %q", w.placedOn("bad"), w.problem("bad"))
			}
		}},
		{"a spec in an unknown pool is invalid", func(w *world) {
			w.node("n1", 4, 8)
			w.vm("d", 1, 512, withDisk("nope", 10))
		}, func(t *testing.T, w *world) {
			w.settle()
			if !strings.Contains(w.problem("d"), "nope") {
				t.Fatalf("problem %q", w.problem("d"))
			}
		}},
		{"a cordoned node takes nothing", func(w *world) {
			w.node("n1", 4, 8)
			w.node("n2", 4, 8)
			w.put(w.sp.NodeSpec("n1"), &keys.NodeSpec{Cordoned: true}, 0)
			for _, n := range []string{"a", "b", "c"} {
				w.vm(n, 1, 512)
			}
		}, func(t *testing.T, w *world) {
			w.settle()
			for _, n := range []string{"a", "b", "c"} {
				if w.placedOn(n) != "n2" {
					t.Fatalf("%s on %q", n, w.placedOn(n))
				}
			}
		}},
		{"a node selector picks the labelled node, and names the others' reason", func(w *world) {
			w.node("n1", 4, 8)
			w.node("n2", 4, 8, "disk=ssd")
			w.vm("s", 1, 512, withSelector("disk", "ssd"))
			w.vm("x", 1, 512, withSelector("disk", "nvme"))
		}, func(t *testing.T, w *world) {
			w.settle()
			if w.placedOn("s") != "n2" {
				t.Fatalf("s on %q", w.placedOn("s"))
			}
			if p := get[keys.Problem](w, w.sp.Problem("x")); p.Reasons[scheduler.ReasonSelector] != 2 {
				t.Fatalf("x: %+v", p)
			}
		}},
		{"anti-affinity keeps a group apart, and the third waits", func(w *world) {
			w.node("n1", 4, 8)
			w.node("n2", 4, 8)
			for _, n := range []string{"a", "b", "c"} {
				w.vm(n, 1, 512, withAntiAffinity("db"))
			}
		}, func(t *testing.T, w *world) {
			w.settle()
			if w.placedOn("a") == w.placedOn("b") || w.placedOn("c") != "" {
				t.Fatalf("a %q b %q c %q", w.placedOn("a"), w.placedOn("b"), w.placedOn("c"))
			}
			if p := get[keys.Problem](w, w.sp.Problem("c")); p.Reasons[scheduler.ReasonAntiAffinity] != 2 {
				t.Fatalf("c: %+v", p)
			}
		}},
		{"a node without a hardware record is not used", func(w *world) {
			w.node("n1", 4, 8)
			w.del(w.sp.Hardware("n1"))
			w.vm("a", 1, 512)
		}, func(t *testing.T, w *world) {
			w.settle()
			if w.placedOn("a") != "" || !strings.Contains(w.problem("a"), "not enrolled") {
				t.Fatalf("placed %q problem %q", w.placedOn("a"), w.problem("a"))
			}
		}},
		{"the oldest pending VM is placed first", func(w *world) {
			w.node("n1", 1, 8)
			w.vm("first", 4, 1024)
			w.vm("second", 4, 1024)
			w.cfg.Scheduler.CPUOvercommit = 4
		}, func(t *testing.T, w *world) {
			w.settle()
			if w.placedOn("first") != "n1" || w.placedOn("second") != "" {
				t.Fatalf("first %q second %q", w.placedOn("first"), w.placedOn("second"))
			}
		}},
		{"a changed spec is handed to the node with the placement", func(w *world) {
			w.node("n1", 4, 8)
			w.vm("a", 1, 512)
			w.settle()
			w.vm("a", 2, 1024)
		}, func(t *testing.T, w *world) {
			if got := actions(w.decide()); !contains(got, "update spec vm/a") {
				t.Fatalf("actions %v", got)
			}
			w.settle()
			a := get[keys.Assignment](w, w.sp.Assign("n1", "a"))
			pl := get[keys.Placement](w, w.sp.Placement("a"))
			if a.Spec.VCPUs != 2 || pl.VCPUs != 2 || pl.SpecRev != w.kv[w.sp.VMSpec("a")].mod || pl.Epoch != 1 {
				t.Fatalf("assignment %+v placement %+v", a.Spec, pl)
			}
		}},
		{"a deleted VM is unplaced and its assignment dropped", func(w *world) {
			w.node("n1", 4, 8)
			w.vm("a", 1, 512)
			w.settle()
			w.del(w.sp.VMSpec("a"))
		}, func(t *testing.T, w *world) {
			got := actions(w.decide())
			if !contains(got, "unplace vm/a") || !contains(got, "drop assignment vm/a") {
				t.Fatalf("actions %v", got)
			}
			w.settle()
			if w.has(w.sp.Placement("a")) || w.has(w.sp.Assign("n1", "a")) {
				t.Fatal("records left")
			}
		}},
		{"a re-created VM is unplaced as its old uid, then placed as the new one", func(w *world) {
			w.node("n1", 4, 8)
			w.vm("a", 1, 512)
			w.settle()
			w.del(w.sp.VMSpec("a"))
			w.vm("a", 1, 512)
		}, func(t *testing.T, w *world) {
			w.settle()
			pl := get[keys.Placement](w, w.sp.Placement("a"))
			if pl.UID != w.uid("a") || get[keys.Assignment](w, w.sp.Assign("n1", "a")).UID != w.uid("a") {
				t.Fatalf("placement uid %d, want %d", pl.UID, w.uid("a"))
			}
		}},
		{"a placed VM's problem is cleared", func(w *world) {
			w.node("n1", 4, 8)
			w.vm("a", 1, 512)
			w.settle()
			w.put(w.sp.Problem("a"), &keys.Problem{UID: w.uid("a"), Kind: keys.ProblemPending, Message: "stale"}, 0)
		}, func(t *testing.T, w *world) {
			if got := actions(w.decide()); !contains(got, "clear problem vm/a") {
				t.Fatalf("actions %v", got)
			}
		}},
		{"a missing cluster record is made anew", func(w *world) {
			w.del(w.sp.Cluster())
		}, func(t *testing.T, w *world) {
			w.settle()
			if c := get[keys.Cluster](w, w.sp.Cluster()); c.ID == "" || c.ID == "test" || len(c.Pools) != 2 || c.Schema != keys.SchemaVersion {
				t.Fatalf("cluster %+v", c)
			}
		}},
		{"a steady cluster decides nothing", func(w *world) {
			*w = *steady(w.t)
		}, func(t *testing.T, w *world) {
			if p := w.decide(); len(p.Actions) != 0 || len(p.Work) != 0 {
				t.Fatalf("actions %v work %v", actions(p), works(p))
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			w := newWorld(t)
			c.setup(w)
			c.check(t, w)
		})
	}
}

// TestNodeWithAProblem: a node that registers a problem (its libvirtd does not start) takes no VM,
// says why, and its zero capacity is not recorded as what it may offer.
func TestNodeWithAProblem(t *testing.T) {
	w := newWorld(t)
	w.node("n1", 4, 8)
	n := get[keys.Node](w, w.sp.Node("n1"))
	n.CPUs, n.MemoryMiB, n.Problem = 0, 0, "cannot connect to libvirt"
	w.put(w.sp.Node("n1"), n, w.kv[w.sp.Node("n1")].lease)
	w.vm("a", 1, 512)
	w.settle()
	if w.placedOn("a") != "" || !strings.Contains(w.problem("a"), "node problem: cannot connect to libvirt") {
		t.Fatalf("on %q problem %q", w.placedOn("a"), w.problem("a"))
	}
	if ns := get[keys.NodeState](w, w.sp.NodeState("n1")); ns.Capacity != nil {
		t.Fatalf("capacity recorded from a node with a problem: %+v", ns.Capacity)
	}
	// Fixed: it registers its capacity, which is recorded, and takes the VM.
	w.register("n1", "boot-1", 4, 8)
	w.settle()
	if w.placedOn("a") != "n1" || get[keys.NodeState](w, w.sp.NodeState("n1")).Capacity == nil {
		t.Fatal("the node did not take the VM once fixed")
	}
}
