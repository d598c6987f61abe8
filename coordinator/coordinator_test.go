package coordinator

import (
	"os"

	"context"
	"fmt"
	"github.com/hashicorp/go-hclog"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/leaktest"
)

func TestMain(m *testing.M) { leaktest.Main(m) }

var space = keys.MustSpace("/herd")

type replica struct {
	c      *Coordinator
	cancel context.CancelFunc
	done   chan struct{}
}

func startReplica(t testing.TB, endpoints []string, name string) *replica {
	t.Helper()
	return startReplicaWith(t, endpoints, name, func(*Config) {})
}

func (r *replica) stop() {
	r.cancel()
	<-r.done
}

// addNode registers a live node the way an agent does: key under a lease.
func addNode(t testing.TB, c *clientv3.Client, hwid string, cpus int, memMiB int64, labels map[string]string) {
	t.Helper()
	addNodeWith(t, c, hwid, cpus, memMiB, labels, nil)
}

// addNodeWith is addNode with a change to the node record.
func addNodeWith(t testing.TB, c *clientv3.Client, hwid string, cpus int, memMiB int64, labels map[string]string, change func(*keys.Node)) {
	t.Helper()
	ctx := context.Background()
	l, err := c.Grant(ctx, 60)
	if err != nil {
		t.Fatal(err)
	}
	n := keys.Node{HWID: hwid, Lease: int64(l.ID), BootID: "b", CPUs: cpus, MemoryMiB: memMiB, Features: keys.AgentFeatures}
	if change != nil {
		change(&n)
	}
	if _, err := c.Put(ctx, space.Hardware(hwid), keys.MustEncode(&keys.Hardware{MAC: hwid, Labels: labels})); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Put(ctx, space.Node(hwid), keys.MustEncode(&n), clientv3.WithLease(l.ID)); err != nil {
		t.Fatal(err)
	}
}

func eventually(t *testing.T, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v", what, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func get(t *testing.T, c *clientv3.Client, key string) []byte {
	t.Helper()
	resp, err := c.Get(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		return nil
	}
	return resp.Kvs[0].Value
}

// leads waits until r is the leader.
func leads(t *testing.T, r *replica, what string) {
	t.Helper()
	eventually(t, what, func() error {
		if !r.c.IsLeader() {
			return fmt.Errorf("not yet")
		}
		return nil
	})
}

func leader(rs ...*replica) *replica {
	for _, r := range rs {
		if r.c.IsLeader() {
			return r
		}
	}
	return nil
}

func TestPlaceUpdateAndUnplace(t *testing.T) {
	srv := etcdtest.Start(t)
	c := etcdtest.NewClient(t, srv.Endpoints)
	addNode(t, c, "n1", 4, 4096, map[string]string{"zone": "a"})
	addNode(t, c, "n2", 4, 4096, map[string]string{"zone": "b"})
	r1 := startReplica(t, srv.Endpoints, "c1")
	r2 := startReplica(t, srv.Endpoints, "c2")
	ctx := context.Background()
	if _, err := c.Put(ctx, space.VMSpec("web1"), `{"vcpus":1,"memory_mib":512,"node_selector":{"zone":"b"}}`); err != nil {
		t.Fatal(err)
	}
	var pl *keys.Placement
	eventually(t, "web1 placed with its assignment", func() error {
		v := get(t, c, space.Placement("web1"))
		if v == nil {
			return fmt.Errorf("no placement")
		}
		var err error
		if pl, err = keys.Decode[keys.Placement](v); err != nil {
			return err
		}
		if get(t, c, space.Assign(pl.Node, "web1")) == nil {
			return fmt.Errorf("no assignment")
		}
		return nil
	})
	if pl.Node != "n2" || pl.Epoch != 1 || pl.UUID == "" || pl.MemoryMiB != 512 {
		t.Fatalf("placement %+v", pl)
	}
	if leader(r1, r2) == nil {
		t.Fatal("no leader")
	}

	// A spec change reaches the node's assignment.
	if _, err := c.Put(ctx, space.VMSpec("web1"), `{"vcpus":2,"memory_mib":512,"node_selector":{"zone":"b"},"power":"stopped"}`); err != nil {
		t.Fatal(err)
	}
	eventually(t, "assignment updated", func() error {
		a, err := keys.Decode[keys.Assignment](get(t, c, space.Assign("n2", "web1")))
		if err != nil {
			return err
		}
		if a.Spec.VCPUs != 2 || a.Spec.Power != keys.PowerStopped || a.UUID != pl.UUID {
			return fmt.Errorf("assignment %+v", a.Spec)
		}
		return nil
	})

	// An invalid edit is recorded as a problem and never reaches the node.
	if _, err := c.Put(ctx, space.VMSpec("web1"), `{"vcpus":2,"memory_mib":-5}`); err != nil {
		t.Fatal(err)
	}
	eventually(t, "problem recorded", func() error {
		p, err := keys.Decode[keys.Problem](get(t, c, space.Problem("web1")))
		if err != nil {
			return err
		}
		if p.Kind != keys.ProblemInvalid || !strings.Contains(p.Message, "memory_mib") {
			return fmt.Errorf("problem %+v", p)
		}
		return nil
	})
	if a, _ := keys.Decode[keys.Assignment](get(t, c, space.Assign("n2", "web1"))); a.Spec.MemoryMiB != 512 {
		t.Fatalf("invalid spec reached the node: %+v", a.Spec)
	}

	// Deleting the spec removes placement, assignment and problem together.
	if _, err := c.Delete(ctx, space.VMSpec("web1")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "unplaced", func() error {
		resp, err := c.Get(ctx, space.VMDir("web1"), clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			return err
		}
		if resp.Count != 0 || get(t, c, space.Assign("n2", "web1")) != nil || get(t, c, space.Placement("web1")) != nil || get(t, c, space.Problem("web1")) != nil {
			return fmt.Errorf("%d keys left", resp.Count)
		}
		return nil
	})
}

func TestPendingWithReasonThenPlaced(t *testing.T) {
	srv := etcdtest.Start(t)
	c := etcdtest.NewClient(t, srv.Endpoints)
	addNode(t, c, "n1", 2, 2048, nil)
	startReplica(t, srv.Endpoints, "c1")
	ctx := context.Background()
	if _, err := c.Put(ctx, space.VMSpec("big"), `{"vcpus":1,"memory_mib":4096}`); err != nil {
		t.Fatal(err)
	}
	eventually(t, "pending problem", func() error {
		p, err := keys.Decode[keys.Problem](get(t, c, space.Problem("big")))
		if err != nil {
			return err
		}
		if p.Kind != keys.ProblemPending || p.Reasons["insufficient memory"] != 1 {
			return fmt.Errorf("problem %+v", p)
		}
		return nil
	})
	// Cordon the only node, add a bigger one: the VM goes to the new node, the problem is cleared.
	if _, err := c.Put(ctx, space.NodeSpec("n1"), `{"cordoned":true}`); err != nil {
		t.Fatal(err)
	}
	addNode(t, c, "n2", 2, 8192, nil)
	eventually(t, "placed on n2", func() error {
		pl, err := keys.Decode[keys.Placement](get(t, c, space.Placement("big")))
		if err != nil {
			return err
		}
		if pl.Node != "n2" || get(t, c, space.Problem("big")) != nil {
			return fmt.Errorf("placement %+v", pl)
		}
		return nil
	})
}

func TestFailoverAndDeletedElectionKey(t *testing.T) {
	srv := etcdtest.Start(t)
	c := etcdtest.NewClient(t, srv.Endpoints)
	addNode(t, c, "n1", 8, 8192, nil)
	r1 := startReplica(t, srv.Endpoints, "c1")
	leads(t, r1, "c1 leads")
	r2 := startReplica(t, srv.Endpoints, "c2")
	ctx := context.Background()

	// Deleting the leader's election key by hand deposes it at once.
	resp, err := c.Get(ctx, space.Election()+"/", clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByCreateRevision, clientv3.SortAscend))
	if err != nil || len(resp.Kvs) == 0 {
		t.Fatalf("election keys: %v %v", resp, err)
	}
	if _, err := c.Delete(ctx, string(resp.Kvs[0].Key)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "c2 takes over", func() error {
		if !r2.c.IsLeader() {
			return fmt.Errorf("c2 not leader")
		}
		if r1.c.IsLeader() {
			return fmt.Errorf("c1 still believes it leads")
		}
		return nil
	})

	// A clean stop resigns: the standby leads without waiting for the session TTL.
	r2.stop()
	leads(t, r1, "c1 leads again")
	if _, err := c.Put(ctx, space.VMSpec("after"), `{"vcpus":1,"memory_mib":64}`); err != nil {
		t.Fatal(err)
	}
	eventually(t, "new leader places", func() error {
		if get(t, c, space.Placement("after")) == nil {
			return fmt.Errorf("not placed")
		}
		return nil
	})
}

// testLog shows the coordinator's log in the test's output when HERD_TEST_LOG is set.
func testLog(t testing.TB) hclog.Logger {
	if os.Getenv("HERD_TEST_LOG") == "" {
		return hclog.NewNullLogger()
	}
	return hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: hclog.Debug, Output: os.Stderr})
}
