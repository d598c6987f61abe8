package decide

import (
	"strings"
	"testing"
	"time"

	"github.com/herdhq/herd/lib/keys"
)

// restoredWorld is issue 18's scenario as records: a, b, c, d placed (the backup), then etcd
// restored from it while, in the present, a runs elsewhere at epoch 2, c was deleted, e was
// created on n1. The coordinator saw etcd go back.
func restoredWorld(t *testing.T) (*world, map[string]string) {
	w := newWorld(t)
	for _, n := range []string{"n1", "n2", "n3"} {
		w.node(n, 8, 16)
	}
	for _, v := range []string{"a", "b", "c", "d"} {
		w.vm(v, 1, 512)
	}
	w.settle()
	on := map[string]string{}
	for _, v := range []string{"a", "b", "c", "d"} {
		on[v] = w.placedOn(v)
	}
	w.restoreWant = 1
	return w, on
}

// inventory publishes a node's inventory for recovery gen, as its frozen agent would.
func (w *world) inventory(hwid string, gen int, doms ...keys.InventoryDomain) {
	k := w.sp.Node(hwid)
	n := get[keys.Node](w, k)
	n.Recovery = &keys.Inventory{Wants: 1, Generation: gen, Domains: doms}
	w.put(k, n, w.kv[k].lease)
}

func (w *world) restore() *keys.Restore { return get[keys.Cluster](w, w.sp.Cluster()).Restore }

func running(name string, uid, epoch int64) keys.InventoryDomain {
	return keys.InventoryDomain{Name: name, UID: uid, Epoch: epoch, State: keys.StateRunning}
}

func other(hwid string) string {
	if hwid == "n1" {
		return "n2"
	}
	return "n1"
}

func TestRestoreRecovery(t *testing.T) {
	w, on := restoredWorld(t)
	// Collecting: the cluster record says so, and nothing else is decided (a new VM waits).
	w.round()
	if r := w.restore(); r == nil || r.Phase != keys.RestoreCollecting || r.Generation != 1 {
		t.Fatalf("restore %+v", r)
	}
	w.vm("f", 1, 512)
	w.settle()
	if w.placedOn("f") != "" {
		t.Fatal("a VM was placed while the recovery collects")
	}
	// The present, as the nodes report it.
	moved := other(on["a"])
	invs := map[string][]keys.InventoryDomain{}
	invs[moved] = append(invs[moved], running("a", w.uid("a"), 2))
	invs[on["b"]] = append(invs[on["b"]], running("b", w.uid("b"), 1))
	invs[on["d"]] = append(invs[on["d"]], running("d", w.uid("d"), 1))
	invs["n1"] = append(invs["n1"], running("e", 9999, 1))
	for _, n := range []string{"n1", "n2"} {
		w.inventory(n, 1, invs[n]...)
	}
	w.settle()
	if w.restore().Phase != keys.RestoreCollecting {
		t.Fatal("done before every live node reported")
	}
	w.inventory("n3", 1, invs["n3"]...)
	w.settle()
	if r := w.restore(); r.Phase != keys.RestoreDone || len(r.Missing) != 0 {
		t.Fatalf("restore %+v", r)
	}
	// a: adopted where it runs, above any epoch seen; runnable there only.
	pl := get[keys.Placement](w, w.sp.Placement("a"))
	if pl.Node != moved || pl.Epoch != 3 {
		t.Fatalf("a placed %s epoch %d, want %s epoch 3", pl.Node, pl.Epoch, moved)
	}
	if r := w.runnable("a"); len(r) != 1 || r[0] != moved {
		t.Fatalf("a runnable on %v", r)
	}
	// b and d: the records agreed; untouched.
	for _, v := range []string{"b", "d"} {
		if p := get[keys.Placement](w, w.sp.Placement(v)); p.Node != on[v] || p.Epoch != 1 {
			t.Fatalf("%s placed %+v", v, p)
		}
	}
	// c: ran nowhere (deleted after the backup?): held, assigned nowhere.
	if w.placedOn("c") != "" || len(w.runnable("c")) != 0 || !strings.HasPrefix(w.problem("c"), keys.ProblemRestoreHold) {
		t.Fatalf("c placed on %q, runnable %v, problem %q", w.placedOn("c"), w.runnable("c"), w.problem("c"))
	}
	// e: no spec: an orphan on n1, assigned nowhere.
	if p := get[keys.Placement](w, w.sp.Placement("e")); !p.Orphan || p.Node != "n1" || p.UID != 9999 {
		t.Fatalf("e %+v", p)
	}
	// f, created during the recovery, is placed once it is done.
	if w.placedOn("f") == "" {
		t.Fatal("f not placed after the recovery")
	}
	// The nodes thaw: their inventories go; nothing changes.
	for _, n := range []string{"n1", "n2", "n3"} {
		k := w.sp.Node(n)
		nd := get[keys.Node](w, k)
		nd.Recovery = nil
		w.put(k, nd, w.kv[k].lease)
	}
	w.settle()
	if w.placedOn("c") != "" || w.placedOn("e") != "n1" {
		t.Fatalf("after the thaw: c on %q, e on %q", w.placedOn("c"), w.placedOn("e"))
	}
	// An operator releases c (writes its spec again): it is placed.
	w.put(w.sp.VMSpec("c"), w.kv[w.sp.VMSpec("c")].val, 0)
	w.settle()
	if w.placedOn("c") == "" || w.problem("c") != "" {
		t.Fatalf("c after release: on %q, problem %q", w.placedOn("c"), w.problem("c"))
	}
	// And forgets e: its placement goes (its node then removes the domain).
	w.put(w.sp.ForgetRequest("e"), &keys.Request{Of: w.kv[w.sp.Placement("e")].create}, 0)
	w.settle()
	if w.has(w.sp.Placement("e")) || w.has(w.sp.ForgetRequest("e")) {
		t.Fatal("e not forgotten")
	}
}

func TestRestoreRecoveryWaitIsBounded(t *testing.T) {
	w, on := restoredWorld(t)
	w.round()
	for _, n := range []string{"n1", "n2"} {
		var doms []keys.InventoryDomain
		for v, h := range on {
			if h == n {
				doms = append(doms, running(v, w.uid(v), 1))
			}
		}
		w.inventory(n, 1, doms...)
	}
	w.settle()
	if w.restore().Phase != keys.RestoreCollecting {
		t.Fatal("done while n3 is silent and the wait lasts")
	}
	if after := w.last.After; after <= 0 || after > DefaultRecoveryWait+time.Second {
		t.Fatalf("next round after %s: the wait's end must bring one", after)
	}
	w.advance(DefaultRecoveryWait + time.Second)
	w.settle()
	r := w.restore()
	if r.Phase != keys.RestoreDone || len(r.Missing) != 1 || r.Missing[0] != "n3" {
		t.Fatalf("restore %+v", r)
	}
	// What the silent node was placed with stays placed there: the node-loss rules decide, fence
	// first, should it be dead.
	for v, h := range on {
		if h == "n3" && w.placedOn(v) != "n3" {
			t.Fatalf("%s moved off the silent n3 to %q", v, w.placedOn(v))
		}
	}
}

func TestRestoreRecoveryTwoCopiesKeepTheNewest(t *testing.T) {
	w, on := restoredWorld(t)
	w.round()
	// Something started a stale copy before the freeze: a at epoch 1 where the backup had it, and
	// at epoch 2 where it moved since.
	moved := other(on["a"])
	for _, n := range []string{"n1", "n2", "n3"} {
		var doms []keys.InventoryDomain
		if n == on["a"] {
			doms = append(doms, running("a", w.uid("a"), 1))
		}
		if n == moved {
			doms = append(doms, running("a", w.uid("a"), 2))
		}
		w.inventory(n, 1, doms...)
	}
	w.settle()
	pl := get[keys.Placement](w, w.sp.Placement("a"))
	if pl.Node != moved || pl.Epoch <= 2 {
		t.Fatalf("a placed %+v, want on %s above epoch 2", pl, moved)
	}
	if r := w.runnable("a"); len(r) != 1 || r[0] != moved {
		t.Fatalf("a runnable on %v", r)
	}
}

// TestAdoptOrphan: an orphan kept after a restore is taken over by a spec that adopts its uid
// (herdctl vm adopt): placed where it runs, runnable there only, at a higher epoch. A spec that
// adopts nothing, or another uid, is refused with a problem, and nothing is placed from it.
func TestAdoptOrphan(t *testing.T) {
	w := newWorld(t)
	w.node("n1", 8, 16)
	w.node("n2", 8, 16)
	w.settle()
	orphan := func(name string, uid int64) {
		w.put(w.sp.Placement(name), &keys.Placement{UID: uid, Node: "n1", Epoch: 4, UUID: "u-" + name, Orphan: true}, 0)
	}
	orphan("plain", 3)
	orphan("wrong", 4)
	orphan("good", 5)
	w.vm("plain", 1, 512)
	w.vm("wrong", 1, 512, func(s *keys.VMSpec) { s.AdoptUID = 99 })
	w.vm("good", 1, 512, func(s *keys.VMSpec) { s.AdoptUID = 5 })
	w.vm("nothing", 1, 512, func(s *keys.VMSpec) { s.AdoptUID = 2 })
	w.settle()

	if p := w.problem("plain"); !strings.Contains(p, "herdctl vm adopt plain") {
		t.Errorf("a spec over an orphan: problem %q", p)
	}
	if p := w.problem("wrong"); !strings.Contains(p, "adopt_uid 99 is not the uid of the orphan") {
		t.Errorf("a spec adopting another uid: problem %q", p)
	}
	for _, n := range []string{"plain", "wrong"} {
		if pl := get[keys.Placement](w, w.sp.Placement(n)); !pl.Orphan || len(w.runnable(n)) != 0 {
			t.Errorf("%s: placement %+v, runnable on %v", n, pl, w.runnable(n))
		}
	}
	if p := w.problem("nothing"); !strings.HasPrefix(p, keys.ProblemInvalid) || w.placedOn("nothing") != "" {
		t.Errorf("adopting a uid no placement carries: problem %q, placed on %q", p, w.placedOn("nothing"))
	}
	pl := get[keys.Placement](w, w.sp.Placement("good"))
	if pl.Orphan || pl.UID != 5 || pl.Node != "n1" || pl.Epoch != 5 || pl.UUID != "u-good" {
		t.Fatalf("adopted placement %+v", pl)
	}
	if r := w.runnable("good"); len(r) != 1 || r[0] != "n1" {
		t.Fatalf("adopted VM runnable on %v", r)
	}
	if p := w.problem("good"); p != "" {
		t.Fatalf("adopted VM keeps a problem %q", p)
	}
	// From then on it is an ordinary VM of uid 5: a spec change reaches its node, and nothing
	// takes it for a re-created VM.
	w.vm("good", 2, 512, func(s *keys.VMSpec) { s.AdoptUID = 5 })
	w.settle()
	if a := get[keys.Assignment](w, w.sp.Assign("n1", "good")); a.UID != 5 || a.Spec.VCPUs != 2 {
		t.Fatalf("assignment after a spec change: %+v", a)
	}
	if pl := get[keys.Placement](w, w.sp.Placement("good")); pl.UID != 5 || pl.Node != "n1" {
		t.Fatalf("placement after a spec change: %+v", pl)
	}
}
