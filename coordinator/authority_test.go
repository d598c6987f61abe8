package coordinator

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/events"
	"github.com/herdhq/herd/lib/keys"
)

func decode[T any, P interface {
	*T
	keys.Decodable
}](t *testing.T, b []byte) *T {
	t.Helper()
	if b == nil {
		return nil
	}
	v, err := keys.Decode[T, P](b)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func put(t *testing.T, c *clientv3.Client, key, val string, opts ...clientv3.OpOption) {
	t.Helper()
	if _, err := c.Put(context.Background(), key, val, opts...); err != nil {
		t.Fatal(err)
	}
}

// report writes what an agent would report of a VM on a node.
func report(t *testing.T, c *clientv3.Client, hwid, vm string, st keys.VMStatus) {
	t.Helper()
	put(t, c, space.Status(hwid, vm), keys.MustEncode(&st))
}

// runnableAssignments replays every write to the assignments from revision 1 and fails if one VM
// ever had two assignments its nodes could run it under (neither incoming nor withdrawn) at one
// revision.
func runnableAssignments(t *testing.T, c *clientv3.Client, only map[string]bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	head, err := c.Get(ctx, "/", clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Get(ctx, space.AssignRoot(), clientv3.WithPrefix(), clientv3.WithRev(1))
	if err != nil || len(resp.Kvs) != 0 {
		t.Fatalf("history must start empty: %v", err)
	}
	run := map[string]map[string]bool{} // vm -> node -> runnable
	wch := c.Watch(ctx, space.AssignRoot(), clientv3.WithPrefix(), clientv3.WithRev(1))
	rev := int64(0)
	check := func() {
		for vm, nodes := range run {
			n := 0
			for _, ok := range nodes {
				if ok {
					n++
				}
			}
			if n > 1 && only[vm] {
				t.Fatalf("at revision %d, %s could run on %v", rev, vm, nodes)
			}
		}
	}
	for wr := range wch {
		for _, ev := range wr.Events {
			if ev.Kv.ModRevision != rev {
				check()
				rev = ev.Kv.ModRevision
			}
			hwid, vm, _ := keys.ParseNodeScoped(space.AssignRoot(), string(ev.Kv.Key))
			if run[vm] == nil {
				run[vm] = map[string]bool{}
			}
			if ev.Type == clientv3.EventTypeDelete {
				delete(run[vm], hwid)
				continue
			}
			a := decode[keys.Assignment](t, ev.Kv.Value)
			run[vm][hwid] = a.Incoming == "" && !a.Withdraw
		}
		if wr.Header.Revision >= head.Header.Revision || rev >= head.Header.Revision {
			break
		}
	}
	check()
}

// TestNothingDeletedMakesAVMRunTwice plays root with etcdctl against the leader's records: a
// deleted placement, a rewritten one, a deleted assignment, placement and assignment deleted
// together, and everything (status included) deleted together. Each time the leader restores the
// records to where the VM runs, with the same identity, and at no revision of the history could
// the VM run on two nodes. A second assignment written by hand, and a domain of the VM reported
// from a node without one, are withdrawn: stopped there first, then removed.
func TestNothingDeletedMakesAVMRunTwice(t *testing.T) {
	srv := etcdtest.Start(t)
	c := etcdtest.NewClient(t, srv.Endpoints)
	addNode(t, c, "n1", 8, 8192, nil)
	addNode(t, c, "n2", 8, 8192, nil)
	startReplica(t, srv.Endpoints, "c1")
	ctx := context.Background()
	put(t, c, space.VMSpec("a"), `{"vcpus":1,"memory_mib":512}`)
	var first *keys.Placement
	eventually(t, "a placed", func() error {
		first = decode[keys.Placement](t, get(t, c, space.Placement("a")))
		if first == nil {
			return fmt.Errorf("not placed")
		}
		return nil
	})
	node, other := first.Node, map[string]string{"n1": "n2", "n2": "n1"}[first.Node]
	running := keys.VMStatus{UID: first.UID, Epoch: 1, UUID: first.UUID, State: keys.StateRunning, Since: time.Now()}
	report(t, c, node, "a", running)

	// restored waits until placement and assignment say the VM runs where it ran, as it was.
	restored := func(what string) {
		t.Helper()
		eventually(t, what, func() error {
			pl := decode[keys.Placement](t, get(t, c, space.Placement("a")))
			asg := decode[keys.Assignment](t, get(t, c, space.Assign(node, "a")))
			switch {
			case pl == nil || asg == nil:
				return fmt.Errorf("placement %v, assignment %v", pl, asg)
			case pl.Node != node || pl.Epoch != 1 || pl.UUID != first.UUID || pl.UID != first.UID:
				return fmt.Errorf("placement %+v", pl)
			case asg.UUID != first.UUID || asg.Epoch != 1 || asg.Withdraw:
				return fmt.Errorf("assignment %+v", asg)
			case get(t, c, space.Assign(other, "a")) != nil:
				return fmt.Errorf("assigned on %s too", other)
			}
			return nil
		})
	}
	for _, step := range []struct {
		what string
		ops  []clientv3.Op
	}{
		{"placement deleted", []clientv3.Op{clientv3.OpDelete(space.Placement("a"))}},
		{"placement rewritten to the other node", []clientv3.Op{clientv3.OpPut(space.Placement("a"),
			keys.MustEncode(&keys.Placement{UID: first.UID, Node: other, Epoch: 1, UUID: first.UUID, VCPUs: 1, MemoryMiB: 512}))}},
		{"assignment deleted", []clientv3.Op{clientv3.OpDelete(space.Assign(node, "a"))}},
		{"placement and assignment deleted", []clientv3.Op{clientv3.OpDelete(space.Placement("a")), clientv3.OpDelete(space.Assign(node, "a"))}},
		{"placement, assignment and status deleted", []clientv3.Op{clientv3.OpDelete(space.Placement("a")), clientv3.OpDelete(space.Assign(node, "a")), clientv3.OpDelete(space.Status(node, "a"))}},
	} {
		if _, err := c.Txn(ctx).Then(step.ops...).Commit(); err != nil {
			t.Fatal(err)
		}
		restored("restored after: " + step.what)
		report(t, c, node, "a", running)
	}
	if _, err := c.Get(ctx, space.Problem("a")); err != nil {
		t.Fatal(err)
	}

	// A second VM: a runnable assignment written by hand on the other node is withdrawn, and only
	// once its node says the domain is gone does the assignment go.
	put(t, c, space.VMSpec("b"), `{"vcpus":1,"memory_mib":512}`)
	var pb *keys.Placement
	eventually(t, "b placed", func() error {
		if pb = decode[keys.Placement](t, get(t, c, space.Placement("b"))); pb == nil {
			return fmt.Errorf("not placed")
		}
		return nil
	})
	bOther := map[string]string{"n1": "n2", "n2": "n1"}[pb.Node]
	forged := keys.Assignment{UID: pb.UID, Epoch: 1, UUID: pb.UUID, Spec: &keys.VMSpec{VCPUs: 1, MemoryMiB: 512}}
	put(t, c, space.Assign(bOther, "b"), keys.MustEncode(&forged))
	eventually(t, "the forged assignment becomes a withdrawal", func() error {
		a := decode[keys.Assignment](t, get(t, c, space.Assign(bOther, "b")))
		if a == nil || !a.Withdraw {
			return fmt.Errorf("assignment %+v", a)
		}
		return nil
	})
	time.Sleep(300 * time.Millisecond)
	if get(t, c, space.Assign(bOther, "b")) == nil {
		t.Fatal("the withdrawal was dropped before its node answered")
	}
	report(t, c, bOther, "b", keys.VMStatus{UID: pb.UID, Epoch: 1, UUID: pb.UUID, State: keys.StateWithdrawn})
	eventually(t, "withdrawal done", func() error {
		if get(t, c, space.Assign(bOther, "b")) != nil || get(t, c, space.Status(bOther, "b")) != nil {
			return fmt.Errorf("assignment or status of the withdrawal left")
		}
		return nil
	})
	// A domain of b reported from a node that has no assignment (an orphan the agent kept).
	report(t, c, bOther, "b", keys.VMStatus{UID: pb.UID, Epoch: 1, UUID: pb.UUID, State: keys.StateOrphan, Domain: keys.StateRunning})
	eventually(t, "the orphan is taken back", func() error {
		a := decode[keys.Assignment](t, get(t, c, space.Assign(bOther, "b")))
		if a == nil || !a.Withdraw {
			return fmt.Errorf("assignment %+v", a)
		}
		return nil
	})
	if pl := decode[keys.Placement](t, get(t, c, space.Placement("b"))); pl.Node != pb.Node || pl.Epoch != 1 {
		t.Fatalf("b's placement moved: %+v", pl)
	}
	runnableAssignments(t, c, map[string]bool{"a": true})
}

// TestNodeKeysTheLeaderDoesNotTrust: a node key without a lease, or on a lease of a day, counts as
// absent (the node gets no VM, and its state says why); a node reporting more capacity than it
// was first seen with is capped until an operator approves.
func TestNodeKeysTheLeaderDoesNotTrust(t *testing.T) {
	srv := etcdtest.Start(t)
	c := etcdtest.NewClient(t, srv.Endpoints)
	startReplica(t, srv.Endpoints, "c1")
	ctx := context.Background()
	put(t, c, space.Hardware("n1"), `{}`)
	n := keys.Node{HWID: "n1", BootID: "b1", CPUs: 4, MemoryMiB: 4096}
	put(t, c, space.Node("n1"), keys.MustEncode(&n))
	put(t, c, space.VMSpec("v"), `{"vcpus":1,"memory_mib":512}`)
	doubt := func(want string) {
		t.Helper()
		eventually(t, "node state says "+want, func() error {
			ns := decode[keys.NodeState](t, get(t, c, space.NodeState("n1")))
			if ns == nil || !strings.Contains(ns.Doubt, want) {
				return fmt.Errorf("node state %+v", ns)
			}
			return nil
		})
	}
	doubt("without a lease")
	long, err := c.Grant(ctx, int64((24 * time.Hour).Seconds()))
	if err != nil {
		t.Fatal(err)
	}
	put(t, c, space.Node("n1"), keys.MustEncode(&n), clientv3.WithLease(long.ID))
	doubt("granted for 24h0m0s")
	if get(t, c, space.Placement("v")) != nil {
		t.Fatal("a VM was placed on an untrusted node")
	}
	ok, err := c.Grant(ctx, 10)
	if err != nil {
		t.Fatal(err)
	}
	put(t, c, space.Node("n1"), keys.MustEncode(&n), clientv3.WithLease(ok.ID))
	eventually(t, "v placed once the key hangs on a sane lease", func() error {
		if get(t, c, space.Placement("v")) == nil {
			return fmt.Errorf("not placed")
		}
		ns := decode[keys.NodeState](t, get(t, c, space.NodeState("n1")))
		if ns.Doubt != "" || ns.Capacity == nil || ns.Capacity.MemoryMiB != 4096 || ns.Lease != int64(ok.ID) {
			return fmt.Errorf("node state %+v", ns)
		}
		return nil
	})

	// Twice the memory on the next registration: capped to what it was first seen with.
	n.CPUs, n.MemoryMiB = 8, 8192
	put(t, c, space.Node("n1"), keys.MustEncode(&n), clientv3.WithLease(ok.ID))
	put(t, c, space.VMSpec("big"), `{"vcpus":1,"memory_mib":6000}`)
	eventually(t, "capped", func() error {
		ns := decode[keys.NodeState](t, get(t, c, space.NodeState("n1")))
		p := decode[keys.Problem](t, get(t, c, space.Problem("big")))
		if !strings.Contains(ns.Capped, "8GiB memory (allowed 4GiB)") || p == nil || p.Kind != keys.ProblemPending {
			return fmt.Errorf("node state %+v, problem %+v", ns, p)
		}
		return nil
	})
	put(t, c, space.Hardware("n1"), `{"cpus":8,"memory_mib":8192}`) // herdctl hw set-capacity n1 --from-node
	eventually(t, "big placed once approved", func() error {
		if get(t, c, space.Placement("big")) == nil {
			return fmt.Errorf("not placed")
		}
		return nil
	})
}

// TestOperatorRequests: an operator asks (a request naming the record's incarnation); the leader
// acts on its own record and consumes the request; a request about another incarnation is dropped
// with an event.
func TestOperatorRequests(t *testing.T) {
	srv := etcdtest.Start(t)
	c := etcdtest.NewClient(t, srv.Endpoints)
	startReplica(t, srv.Endpoints, "c1")
	ctx := context.Background()
	f := keys.Fence{HWID: "n9", BootID: "b1", Phase: keys.FenceFenced, Method: "exec"}
	resp, err := c.Put(ctx, space.Fence("n9", "b1"), keys.MustEncode(&f))
	if err != nil {
		t.Fatal(err)
	}
	rev := resp.Header.Revision
	put(t, c, space.FenceClearRequest("n9", "b1"), keys.MustEncode(&keys.Request{Of: rev - 1, By: "test"}))
	eventually(t, "a stale request is dropped", func() error {
		if get(t, c, space.FenceClearRequest("n9", "b1")) != nil {
			return fmt.Errorf("still there")
		}
		return nil
	})
	if get(t, c, space.Fence("n9", "b1")) == nil {
		t.Fatal("a stale request cleared the fence")
	}
	put(t, c, space.FenceClearRequest("n9", "b1"), keys.MustEncode(&keys.Request{Of: rev, By: "test"}))
	eventually(t, "fence cleared and request consumed", func() error {
		if get(t, c, space.Fence("n9", "b1")) != nil || get(t, c, space.FenceClearRequest("n9", "b1")) != nil {
			return fmt.Errorf("fence or request left")
		}
		return nil
	})
	eventually(t, "events say so", func() error {
		resp, err := c.Get(ctx, space.EventWriterPrefix(keys.EventsByCoordinator), clientv3.WithPrefix())
		if err != nil {
			return err
		}
		var all string
		for _, kv := range resp.Kvs {
			all += string(kv.Value)
		}
		if !strings.Contains(all, `"action":"ignored"`) || !strings.Contains(all, `"action":"fence-clearing"`) {
			return fmt.Errorf("events: %s", all)
		}
		return nil
	})
}

// TestEventJanitor: records that break the audit trail's rules (no lease, a lease longer than
// the retention, too large, not an event key) are removed, with an event; good ones stay.
func TestEventJanitor(t *testing.T) {
	srv := etcdtest.Start(t)
	c := etcdtest.NewClient(t, srv.Endpoints)
	startReplica(t, srv.Endpoints, "c1")
	ctx := context.Background()
	good, err := c.Grant(ctx, int64(events.Retention.Seconds()))
	if err != nil {
		t.Fatal(err)
	}
	long, err := c.Grant(ctx, int64((30 * 24 * time.Hour).Seconds()))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	w := keys.EventsByNode("n1")
	ev := keys.MustEncode(&keys.Event{Time: now, Actor: "agent/n1", Object: "node/n1", Action: "x"})
	keep := space.Event(w, now, "good")
	put(t, c, keep, ev, clientv3.WithLease(good.ID))
	junk := map[string]string{
		space.Event(w, now, "nolease"):             "",
		space.Event(w, now, "longlease"):           "long",
		space.Event(w, now, "big"):                 "big",
		space.EventPrefix() + "someone/else/x":     "",
		space.EventPrefix() + "node/n1/not-a-time": "",
	}
	for k, how := range junk {
		switch how {
		case "long":
			put(t, c, k, ev, clientv3.WithLease(long.ID))
		case "big":
			put(t, c, k, strings.Repeat("x", events.MaxBytes+1), clientv3.WithLease(good.ID))
		default:
			put(t, c, k, ev)
		}
	}
	eventually(t, "junk removed", func() error {
		for k := range junk {
			if get(t, c, k) != nil {
				return fmt.Errorf("%s still there", k)
			}
		}
		if get(t, c, keep) == nil {
			return fmt.Errorf("a good record was removed")
		}
		return nil
	})
}

// TestMigrationAddressVouching: the leader vouches for a node's migration address (the only name
// its migration certificate may carry) only if no other node holds it, and the hardware record's
// migration_ip takes it from anyone else.
func TestMigrationAddressVouching(t *testing.T) {
	srv := etcdtest.Start(t)
	c := etcdtest.NewClient(t, srv.Endpoints)
	startReplica(t, srv.Endpoints, "c1")
	ctx := context.Background()
	register := func(hwid, mig string) {
		t.Helper()
		l, err := c.Grant(ctx, 30)
		if err != nil {
			t.Fatal(err)
		}
		n := keys.Node{HWID: hwid, BootID: "b", CPUs: 4, MemoryMiB: 4096, Addresses: keys.Addresses{Migration: mig}}
		put(t, c, space.Node(hwid), keys.MustEncode(&n), clientv3.WithLease(l.ID))
	}
	vouched := func(hwid, want string) {
		t.Helper()
		eventually(t, hwid+" vouched for "+want, func() error {
			ns := decode[keys.NodeState](t, get(t, c, space.NodeState(hwid)))
			if ns == nil || ns.MigrationIP != want {
				return fmt.Errorf("node state %+v", ns)
			}
			return nil
		})
	}
	put(t, c, space.Hardware("a"), `{}`)
	put(t, c, space.Hardware("b"), `{}`)
	register("a", "10.2.0.1")
	vouched("a", "10.2.0.1")
	register("b", "10.2.0.1") // b claims a's address
	vouched("b", "")
	vouched("a", "10.2.0.1")
	// The operator says the address is b's.
	put(t, c, space.Hardware("b"), `{"migration_ip":"10.2.0.1"}`)
	vouched("b", "10.2.0.1")
	vouched("a", "")
}

// TestTrimWriter: a writer past its cap loses its oldest records, and only those.
func TestTrimWriter(t *testing.T) {
	w := keys.EventsByNode("n1")
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var list []*etcdutil.KV
	for i := range events.MaxPerWriter + 3 {
		list = append(list, &etcdutil.KV{Key: space.Event(w, start.Add(time.Duration(i)*time.Second), "x"), Lease: 1})
	}
	// Out of order, as a cache lists them.
	list[0], list[len(list)-1] = list[len(list)-1], list[0]
	junk := trimWriter(w, list)
	if len(junk) != 3 {
		t.Fatalf("trimmed %d records, want 3", len(junk))
	}
	for i := range 3 {
		if _, ok := junk[space.Event(w, start.Add(time.Duration(i)*time.Second), "x")]; !ok {
			t.Fatalf("record %d is not among the trimmed: %v", i, junk)
		}
	}
}
