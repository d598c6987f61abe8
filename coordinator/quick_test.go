package coordinator

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
	"github.com/herdhq/herd/lib/keys"
)

// TestQuickAndFullRounds runs a leader against a real etcd with an interval long enough that no
// round is due by the clock: new specs must be placed by quick rounds alone (no full round between
// them), a change to a node must bring a full round that sees it, and a deleted VM, which only a
// full round decides, must be unplaced by the full round a quick one asks for.
func TestQuickAndFullRounds(t *testing.T) {
	srv := etcdtest.Start(t)
	c := etcdtest.NewClient(t, srv.Endpoints)
	ctx := context.Background()
	addNode(t, c, "n1", 64, 65536, nil)
	addNode(t, c, "n2", 64, 65536, nil)
	r := startReplicaWith(t, srv.Endpoints, "c1", func(cfg *Config) { cfg.Interval = time.Hour })
	leads(t, r, "the only replica")
	rounds := func(kind string) int { return int(testutil.ToFloat64(r.c.m.rounds.WithLabelValues(kind))) }
	placedOn := func(name string) string {
		var pl keys.Placement
		if err := decodeInto(get(t, c, space.Placement(name)), &pl); err != nil {
			return ""
		}
		return pl.Node
	}
	eventually(t, "the term's first rounds", func() error {
		if rounds("full") == 0 {
			return fmt.Errorf("no full round yet")
		}
		return nil
	})
	// Let the term settle: its first rounds write the nodes' state records, whose echo is a
	// change to a node-level key.
	time.Sleep(500 * time.Millisecond)
	full := rounds("full")
	for i := range 20 {
		name := fmt.Sprintf("q%02d", i)
		if _, err := c.Put(ctx, space.VMSpec(name), `{"vcpus":1,"memory_mib":256}`); err != nil {
			t.Fatal(err)
		}
		eventually(t, name+" placed", func() error {
			if placedOn(name) == "" {
				return fmt.Errorf("not placed")
			}
			return nil
		})
	}
	if n := rounds("full"); n != full {
		t.Fatalf("%d full rounds ran while 20 specs were placed: only quick rounds should have (%d quick)", n-full, rounds("quick"))
	}
	if rounds("quick") < 2 {
		t.Fatalf("%d quick rounds placed 20 VMs written one by one", rounds("quick"))
	}

	// A node-level change: a full round sees the cordon before the next VM is placed.
	if _, err := c.Put(ctx, space.NodeSpec("n1"), keys.MustEncode(&keys.NodeSpec{Cordoned: true})); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a full round after the cordon", func() error {
		if rounds("full") == full {
			return fmt.Errorf("no full round")
		}
		return nil
	})
	for i := range 5 {
		name := fmt.Sprintf("c%02d", i)
		if _, err := c.Put(ctx, space.VMSpec(name), `{"vcpus":1,"memory_mib":256}`); err != nil {
			t.Fatal(err)
		}
		eventually(t, name+" placed", func() error {
			if on := placedOn(name); on != "n2" {
				return fmt.Errorf("placed on %q", on)
			}
			return nil
		})
	}

	// A deletion is a full round's to decide: the quick round asks for one.
	full = rounds("full")
	if _, err := c.Delete(ctx, space.VMSpec("q00")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "q00 unplaced", func() error {
		if get(t, c, space.Placement("q00")) != nil {
			return fmt.Errorf("still placed")
		}
		return nil
	})
	if rounds("full") == full || testutil.ToFloat64(r.c.m.fullRounds.WithLabelValues("vm")) == 0 {
		t.Fatalf("the deletion was decided without a full round asked for by a quick one")
	}
}
