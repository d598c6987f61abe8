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
	quick := []Action{place("a", "n1"), {Object: "vm/b", What: "set problem", Writes: []Write{Put(sp.Problem("b"), "{}")}}}
	var since Touched
	since.Add(sp, quick)
	if !since.VMs["a"] || !since.VMs["b"] || !since.Nodes["n1"] || len(since.Nodes) != 1 {
		t.Fatalf("touched %+v", since)
	}
	full := Plan{Actions: []Action{
		place("a", "n2"), // a: placed by a quick round already
		{Object: "vm/b", What: "set problem", Writes: []Write{Put(sp.Problem("b"), "{}")}},
		place("c", "n1"), // n1's room was counted without a
		place("d", "n2"),
		{Object: "node/n3", What: "record boot", Writes: []Write{Put(sp.NodeState("n3"), "{}")}},
	}}
	dropped := full.Rebase(sp, since)
	if want := []string{"a", "b", "c"}; !slices.Equal(dropped, want) {
		t.Fatalf("dropped %v, want %v", dropped, want)
	}
	var kept []string
	for _, a := range full.Actions {
		kept = append(kept, a.Object)
	}
	if want := []string{"vm/d", "node/n3"}; !slices.Equal(kept, want) {
		t.Fatalf("kept %v, want %v", kept, want)
	}
	// Nothing committed meanwhile: the plan is whole.
	again := Plan{Actions: []Action{place("e", "n1")}}
	if d := again.Rebase(sp, Touched{}); d != nil || len(again.Actions) != 1 {
		t.Fatalf("an untouched plan lost %v", d)
	}
}
