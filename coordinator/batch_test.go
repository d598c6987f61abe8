package coordinator

import (
	"fmt"
	"strings"
	"testing"

	"github.com/herdhq/herd/coordinator/decide"
)

// TestBatch: actions sharing a key are never in one batch; batches keep the plan's order and stay
// within etcd's bounds; independent actions share one.
func TestBatch(t *testing.T) {
	place := func(vm, node string) decide.Action {
		return decide.Action{Object: "vm/" + vm, What: "place",
			Conds: []decide.Cond{decide.ModRev("/herd/vms/"+vm+"/spec", 5), decide.ModRev("/herd/placements/"+vm, 0)},
			Writes: []decide.Write{decide.Put("/herd/placements/"+vm, "{}"), decide.Put("/herd/assign/"+node+"/"+vm, "{}"),
				decide.Del("/herd/problems/" + vm)}}
	}
	var acts []decide.Action
	for i := range 120 {
		acts = append(acts, place(fmt.Sprintf("v%03d", i), fmt.Sprintf("n%d", i%7)))
		if i == 1 { // two actions about one VM (a stale plan could hold both): never in one transaction
			acts = append(acts, place("v001", "n9"))
		}
	}
	for _, vm := range []string{"gone1", "gone2"} { // withdrawals, each alone (see batch)
		acts = append(acts, decide.Action{Object: "vm/" + vm, What: "withdraw",
			Writes: []decide.Write{{Key: "/herd/assign/n1/" + vm, Delete: true}}})
	}
	big := place("huge", "n1")
	big.Writes[0].Value = strings.Repeat("x", batchBytes)
	acts = append(acts, big, place("last", "n2"))

	bs := batch(acts, func(key string) bool { return strings.HasPrefix(key, "/herd/assign/") })
	var order []*decide.Action
	for _, b := range bs {
		owner := map[string]*decide.Action{}
		conds, writes := 0, 0
		for _, a := range b {
			order = append(order, a)
			for _, k := range append(condKeys(a), writeKeys(a)...) {
				if o, ok := owner[k]; ok && o != a {
					t.Fatalf("key %s in two actions of one batch", k)
				}
				owner[k] = a
			}
			conds, writes = conds+len(a.Conds), writes+len(a.Writes)
		}
		if len(b) > 1 && (conds > batchOps || writes > batchOps) {
			t.Fatalf("batch of %d compares and %d writes", conds, writes)
		}
	}
	if len(order) != len(acts) {
		t.Fatalf("%d actions batched, %d planned", len(order), len(acts))
	}
	for i := range acts {
		if order[i] != &acts[i] {
			t.Fatalf("action %d out of order", i)
		}
	}
	// 120 placements of 2 compares and 3 writes (the problem record's deletion does not isolate
	// them), cut after the second by the duplicate, then by 33s; each withdrawal alone, the
	// oversized one alone, and the last.
	if len(bs) < 8 || len(bs) > 11 {
		t.Fatalf("%d batches", len(bs))
	}
	for _, b := range bs {
		for _, a := range b {
			if (a.Object == "vm/huge" || a.What == "withdraw") && len(b) != 1 {
				t.Fatalf("an oversized action shares a batch of %d", len(b))
			}
		}
	}
}

func condKeys(a *decide.Action) []string {
	var out []string
	for _, c := range a.Conds {
		out = append(out, c.Key)
	}
	return out
}

func writeKeys(a *decide.Action) []string {
	var out []string
	for _, w := range a.Writes {
		out = append(out, w.Key)
	}
	return out
}
