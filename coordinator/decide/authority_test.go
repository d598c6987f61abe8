package decide

import (
	"math/rand"
	"sort"
	"strings"
	"testing"

	"github.com/herdhq/herd/lib/keys"
)

func TestAuthority(t *testing.T) {
	cases := []struct {
		name  string
		check func(t *testing.T, w *world)
	}{
		{"a placement deleted by hand is restored from the assignment, never made anew", func(t *testing.T, w *world) {
			on := w.placedOn("a")
			pl := get[keys.Placement](w, w.sp.Placement("a"))
			w.del(w.sp.Placement("a"))
			w.settle()
			got := get[keys.Placement](w, w.sp.Placement("a"))
			if got.Node != on || got.UUID != pl.UUID || got.Epoch != pl.Epoch {
				t.Fatalf("restored %+v, was %+v", got, pl)
			}
			if r := w.runnable("a"); len(r) != 1 || r[0] != on {
				t.Fatalf("runnable on %v", r)
			}
		}},
		{"placement and assignment deleted: restored from the node's report", func(t *testing.T, w *world) {
			on := w.placedOn("a")
			uuid := get[keys.Placement](w, w.sp.Placement("a")).UUID
			w.del(w.sp.Placement("a"))
			w.del(w.sp.Assign(on, "a"))
			w.settle()
			if w.placedOn("a") != on || get[keys.Assignment](w, w.sp.Assign(on, "a")).UUID != uuid {
				t.Fatalf("on %q", w.placedOn("a"))
			}
		}},
		{"everything of it deleted but the caches' memory: restored from the vanished placement", func(t *testing.T, w *world) {
			on := w.placedOn("a")
			w.vanished["a"] = get[keys.Placement](w, w.sp.Placement("a"))
			w.del(w.sp.Placement("a"))
			w.del(w.sp.Assign(on, "a"))
			w.del(w.sp.Status(on, "a"))
			w.settle()
			if w.placedOn("a") != on {
				t.Fatalf("on %q, want %s", w.placedOn("a"), on)
			}
		}},
		{"an assignment deleted by hand is re-issued on the placement's node", func(t *testing.T, w *world) {
			on := w.placedOn("a")
			w.del(w.sp.Assign(on, "a"))
			w.settle()
			if r := w.runnable("a"); len(r) != 1 || r[0] != on {
				t.Fatalf("runnable on %v", r)
			}
		}},
		{"a stray assignment on another node is withdrawn, and dropped once the node says so", func(t *testing.T, w *world) {
			on := w.placedOn("a")
			other := "n1"
			if on == "n1" {
				other = "n2"
			}
			a := get[keys.Assignment](w, w.sp.Assign(on, "a"))
			w.put(w.sp.Assign(other, "a"), a, 0)
			w.round()
			wa := get[keys.Assignment](w, w.sp.Assign(other, "a"))
			if !wa.Withdraw || wa.Spec == nil {
				t.Fatalf("stray %+v (a withdrawal keeps the spec copy)", wa)
			}
			w.report(other, "a", keys.StateWithdrawn)
			w.settle()
			if w.has(w.sp.Assign(other, "a")) || w.has(w.sp.Status(other, "a")) || w.placedOn("a") != on {
				t.Fatal("withdrawal not finished")
			}
		}},
		{"a domain reported where no assignment is gets taken back", func(t *testing.T, w *world) {
			on := w.placedOn("a")
			other := "n1"
			if on == "n1" {
				other = "n2"
			}
			w.report(other, "a", keys.StateOrphan)
			w.round()
			if wa := get[keys.Assignment](w, w.sp.Assign(other, "a")); !wa.Withdraw {
				t.Fatalf("take-back %+v", wa)
			}
		}},
		{"an assignment of an earlier VM of the same name is dropped", func(t *testing.T, w *world) {
			on := w.placedOn("a")
			other := "n1"
			if on == "n1" {
				other = "n2"
			}
			w.put(w.sp.Assign(other, "a"), &keys.Assignment{UID: 1, Epoch: 1, UUID: "old"}, 0)
			if got := actions(w.decide()); !contains(got, "drop assignment vm/a") {
				t.Fatalf("actions %v", got)
			}
		}},
		{"an unreadable assignment blocks the VM until it is fixed", func(t *testing.T, w *world) {
			on := w.placedOn("a")
			w.del(w.sp.Placement("a"))
			w.put(w.sp.Assign(on, "a"), `{"v":99}`, 0)
			w.settle()
			if w.placedOn("a") != "" || !strings.Contains(w.problem("a"), "unreadable assignment") {
				t.Fatalf("on %q problem %q", w.placedOn("a"), w.problem("a"))
			}
		}},
		{"withdrawal from a fenced node needs no answer", func(t *testing.T, w *world) {
			on := w.placedOn("a")
			other := "n1"
			if on == "n1" {
				other = "n2"
			}
			w.put(w.sp.Assign(other, "a"), get[keys.Assignment](w, w.sp.Assign(on, "a")), 0)
			w.round()
			w.lose(other)
			w.fenceOutcome(other, "boot-1", keys.FenceFenced)
			w.settle()
			if w.has(w.sp.Assign(other, "a")) {
				t.Fatal("withdrawn assignment of a fenced node left")
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { c.check(t, steady(t)) })
	}
}

// agents plays every node's agent after a round: a runnable assignment is started (and reported
// running); a withdrawal is stopped and reported withdrawn; a domain whose assignment vanished
// keeps running, reported as such, for lack of evidence against it (the agent's rule). It returns
// which nodes run each VM.
type agents struct{ runs map[string]map[string]bool }

func (ag *agents) act(w *world) {
	if ag.runs == nil {
		ag.runs = map[string]map[string]bool{}
	}
	for k, s := range w.kv {
		hwid, name, ok := keys.ParseNodeScoped(w.sp.AssignRoot(), k)
		if !ok {
			continue
		}
		a, err := keys.DecodeAssignmentHead([]byte(s.val))
		if err != nil {
			continue
		}
		if ag.runs[name] == nil {
			ag.runs[name] = map[string]bool{}
		}
		switch {
		case a.Withdraw:
			delete(ag.runs[name], hwid)
			w.report(hwid, name, keys.StateWithdrawn)
		case runnable(a) && w.has(w.sp.VMSpec(name)) && w.uid(name) == a.UID:
			ag.runs[name][hwid] = true
			w.report(hwid, name, keys.StateRunning)
		}
	}
	for name, on := range ag.runs {
		for hwid := range on {
			if !w.has(w.sp.VMSpec(name)) {
				delete(on, hwid)
				continue
			}
			if !w.has(w.sp.Assign(hwid, name)) && !w.has(w.sp.Status(hwid, name)) {
				w.put(w.sp.Status(hwid, name), &keys.VMStatus{UID: w.uid(name), State: keys.StateOrphan, Since: w.now}, 0)
			}
		}
	}
}

// TestNoDeletionMakesAVMRunTwice deletes leader records at random (root with etcdctl, a restored
// backup) between rounds, with agents following their rules, and checks after every round that no
// VM runs on two nodes.
func TestNoDeletionMakesAVMRunTwice(t *testing.T) {
	for seed := int64(1); seed <= 30; seed++ {
		w := steady(t)
		w.node("n3", 4, 8)
		w.vm("c", 1, 512)
		w.settle()
		// An empty, larger node: a VM placed anew would go there, away from where it runs.
		w.node("n4", 16, 64)
		w.settle()
		var ag agents
		rng := rand.New(rand.NewSource(seed))
		for step := 0; step < 40; step++ {
			var leaderKeys []string
			for k := range w.kv {
				for _, p := range []string{w.sp.PlacementPrefix(), w.sp.AssignRoot(), w.sp.StatusRoot(), w.sp.ProblemPrefix()} {
					if strings.HasPrefix(k, p) {
						leaderKeys = append(leaderKeys, k)
					}
				}
			}
			sort.Strings(leaderKeys)
			for i := rng.Intn(3); i > 0 && len(leaderKeys) > 0; i-- {
				k := leaderKeys[rng.Intn(len(leaderKeys))]
				if !w.has(k) {
					continue
				}
				if strings.HasPrefix(k, w.sp.PlacementPrefix()) && rng.Intn(2) == 0 {
					// The caches saw it go only sometimes (a restored backup is no event).
					w.vanished[strings.TrimPrefix(k, w.sp.PlacementPrefix())] = get[keys.Placement](w, k)
				}
				w.del(k)
			}
			w.round()
			ag.act(w)
			for name, on := range ag.runs {
				if len(on) > 1 {
					t.Fatalf("seed %d step %d: %s runs on %v", seed, step, name, on)
				}
			}
		}
		// And it converges: every VM placed where it runs.
		for i := 0; i < 10; i++ {
			w.settle()
			ag.act(w)
		}
		for _, name := range []string{"a", "b", "c"} {
			on := w.placedOn(name)
			if on == "" || !ag.runs[name][on] {
				t.Fatalf("seed %d: %s placed on %q, runs on %v, problem %q", seed, name, on, ag.runs[name], w.problem(name))
			}
		}
	}
}
