package coordinator

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	clientv3 "go.etcd.io/etcd/client/v3"

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
	rounds := func(kind string) int { return roundsOf(r, kind) }
	placedOn := func(name string) string { return placedOn(t, c, name) }
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

// TestQuickRoundsWhileAFullRoundDecides holds a full round between its decision and its landing
// (as a pass over 100,000 VMs holds it for a second or more). Meanwhile quick rounds place new
// VMs, never on the node whose change the full round is deciding about; a VM both decided to
// place is placed once, by the quick round, the full round's placement being dropped when it
// lands rather than refused by etcd; and the full round's other decisions land.
func TestQuickRoundsWhileAFullRoundDecides(t *testing.T) {
	srv := etcdtest.Start(t)
	c := etcdtest.NewClient(t, srv.Endpoints)
	ctx := context.Background()
	for _, n := range []string{"n1", "n2", "n3"} {
		addNode(t, c, n, 64, 65536, nil)
	}
	if _, err := c.Put(ctx, space.Hardware("n4"), keys.MustEncode(&keys.Hardware{MAC: "n4"})); err != nil {
		t.Fatal(err)
	}
	var hold atomic.Bool
	held, release := make(chan struct{}, 1), make(chan struct{})
	r := startReplicaWith(t, srv.Endpoints, "c1", func(cfg *Config) {
		cfg.Interval = time.Hour
		cfg.decided = func() {
			if hold.Load() {
				held <- struct{}{}
				<-release
			}
		}
	})
	leads(t, r, "the only replica")
	rounds := func(kind string) int { return roundsOf(r, kind) }
	placedOn := func(name string) string { return placedOn(t, c, name) }
	put := func(name, spec string) {
		t.Helper()
		if _, err := c.Put(ctx, space.VMSpec(name), spec); err != nil {
			t.Fatal(err)
		}
	}
	// A filler of 10 GiB on each node of 64 (one per node: anti-affinity), so that x, of 60,000
	// MiB, fits nowhere and waits.
	fillerOn := map[string]string{}
	for _, f := range []string{"f1", "f2", "f3"} {
		put(f, `{"vcpus":1,"memory_mib":10240,"anti_affinity":"f"}`)
		eventually(t, f+" placed", func() error {
			if fillerOn[f] = placedOn(f); fillerOn[f] == "" {
				return fmt.Errorf("not placed")
			}
			return nil
		})
	}
	put("x", `{"vcpus":1,"memory_mib":60000}`)
	eventually(t, "x waits for room", func() error {
		var p keys.Problem
		if err := decodeInto(get(t, c, space.Problem("x")), &p); err != nil || p.Kind != keys.ProblemPending {
			return fmt.Errorf("problem %+v: %v (placed on %q)", p, err, placedOn("x"))
		}
		return nil
	})
	time.Sleep(300 * time.Millisecond) // the rounds after the problem was written

	// n4 registers: the full round that judges it places x there, and is held.
	hold.Store(true)
	l, err := c.Grant(ctx, 60)
	if err != nil {
		t.Fatal(err)
	}
	n4 := keys.Node{HWID: "n4", Lease: int64(l.ID), BootID: "b4", CPUs: 64, MemoryMiB: 65536, Features: keys.AgentFeatures}
	if _, err := c.Put(ctx, space.Node("n4"), keys.MustEncode(&n4), clientv3.WithLease(l.ID)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-held:
	case <-time.After(30 * time.Second):
		t.Fatal("no full round after n4 registered")
	}
	hold.Store(false)
	full := rounds("full")
	conflicts := testutil.ToFloat64(r.c.m.conflicts)

	// Meanwhile f2 shrinks: a quick round places x where f2 is. New VMs go anywhere but n4,
	// which no full round has judged yet.
	put("f2", `{"vcpus":1,"memory_mib":256,"anti_affinity":"f"}`)
	eventually(t, "x placed by a quick round while the full round is held", func() error {
		if on := placedOn("x"); on != fillerOn["f2"] {
			return fmt.Errorf("placed on %q, want %s (where f2 shrank)", on, fillerOn["f2"])
		}
		return nil
	})
	for i := range 5 {
		name := fmt.Sprintf("w%02d", i)
		put(name, `{"vcpus":1,"memory_mib":256}`)
		eventually(t, name+" placed while the full round is held", func() error {
			if on := placedOn(name); on == "" || on == "n4" {
				return fmt.Errorf("placed on %q", on)
			}
			return nil
		})
	}
	if n := rounds("full"); n != full {
		t.Fatalf("%d full rounds landed while one was held", n-full)
	}

	close(release)
	eventually(t, "the held full round lands", func() error {
		if rounds("full") == full {
			return fmt.Errorf("not landed")
		}
		return nil
	})
	// Its decisions about the nodes land (n4's boot recorded); its placement of x does not.
	eventually(t, "n4's state records its boot", func() error {
		var ns keys.NodeState
		if err := decodeInto(get(t, c, space.NodeState("n4")), &ns); err != nil {
			return err
		}
		if ns.BootID != "b4" {
			return fmt.Errorf("state %+v", ns)
		}
		return nil
	})
	if on := placedOn("x"); on != fillerOn["f2"] {
		t.Fatalf("x moved from %s to %s", fillerOn["f2"], on)
	}
	if n := testutil.ToFloat64(r.c.m.conflicts); n != conflicts {
		t.Fatalf("%.0f writes refused by etcd after the held round landed: its overtaken placement of x should have been dropped", n-conflicts)
	}
	// And the next VM may go to n4.
	put("after", `{"vcpus":1,"memory_mib":58000}`)
	eventually(t, "a VM placed on n4 once judged", func() error {
		if on := placedOn("after"); on != "n4" {
			return fmt.Errorf("placed on %q", on)
		}
		return nil
	})
}

// roundsOf counts the rounds of a kind ("quick", "full") the replica ran.
func roundsOf(r *replica, kind string) int {
	return int(testutil.ToFloat64(r.c.m.rounds.WithLabelValues(kind)))
}

// placedOn is the node a VM's placement names, "" while it has none.
func placedOn(t *testing.T, c *clientv3.Client, name string) string {
	var pl keys.Placement
	if err := decodeInto(get(t, c, space.Placement(name)), &pl); err != nil {
		return ""
	}
	return pl.Node
}
