package decide

import (
	"slices"
	"testing"

	"github.com/herdhq/herd/lib/keys"
)

// A full round's plan, landing after quick rounds committed: what they acted on, and whatever
// takes room on a node they placed on, is dropped; the rest lands.
func TestRebaseDropsWhatQuickRoundsOvertook(t *testing.T) {
	sp, err := keys.NewSpace("/herd")
	if err != nil {
		t.Fatal(err)
	}
	place := func(name, node string) Action {
		return Action{Object: "vm/" + name, What: "place", Writes: []Write{Put(sp.Placement(name), "{}"), Put(sp.Assign(node, name), "{}")}}
	}
	// x took 10.0.0.5 in a quick round (on n4, which the full round does not place on).
	withAddr := func(a Action, ip string) Action {
		a.Writes = append(a.Writes, Put(sp.Address("prod", ip), "{}"))
		return a
	}
	quick := []Action{place("a", "n1"), {Object: "vm/b", What: "set problem", Writes: []Write{Put(sp.Problem("b"), "{}")}},
		withAddr(place("x", "n4"), "10.0.0.5")}
	var since Touched
	since.Add(sp, quick)
	if !since.VMs["a"] || !since.VMs["b"] || !since.Nodes["n1"] || len(since.Nodes) != 2 || !since.Addresses[sp.Address("prod", "10.0.0.5")] {
		t.Fatalf("touched %+v", since)
	}
	full := Plan{Actions: []Action{
		place("a", "n2"), // a: placed by a quick round already
		{Object: "vm/b", What: "set problem", Writes: []Write{Put(sp.Problem("b"), "{}")}},
		place("c", "n1"), // n1's room was counted without a
		place("d", "n2"),
		withAddr(place("y", "n2"), "10.0.0.5"), // the address x took meanwhile
		withAddr(place("z", "n2"), "10.0.0.6"),
		{Object: "node/n3", What: "record boot", Writes: []Write{Put(sp.NodeState("n3"), "{}")}},
	}}
	dropped := full.Rebase(sp, since)
	if want := []string{"a", "b", "c", "y"}; !slices.Equal(dropped, want) {
		t.Fatalf("dropped %v, want %v", dropped, want)
	}
	var kept []string
	for _, a := range full.Actions {
		kept = append(kept, a.Object)
	}
	if want := []string{"vm/d", "vm/z", "node/n3"}; !slices.Equal(kept, want) {
		t.Fatalf("kept %v, want %v", kept, want)
	}
	// Nothing committed meanwhile: the plan is whole.
	again := Plan{Actions: []Action{place("e", "n1")}}
	if d := again.Rebase(sp, Touched{}); d != nil || len(again.Actions) != 1 {
		t.Fatalf("an untouched plan lost %v", d)
	}
}
