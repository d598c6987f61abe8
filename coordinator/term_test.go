package coordinator

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/coordinator/fence"
	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
	"github.com/herdhq/herd/lib/keys"
)

// stuckOnce is a fencer whose first run hangs until its context ends (a BMC that never answers,
// then the term ends); later runs succeed.
type stuckOnce struct {
	calls   atomic.Int32
	started chan struct{}
}

func (*stuckOnce) Name() string { return "stuck-once" }

func (f *stuckOnce) Fence(ctx context.Context, _ fence.Target) (map[string]string, error) {
	if f.calls.Add(1) == 1 {
		close(f.started)
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return map[string]string{}, nil
}

// TestFencerRunsAgainWhenTheSameReplicaLeadsAgain is the regression test for per-term state kept
// on the replica: a term ends while a fencer runs, and the same replica wins the next term. The
// new term must run the fencer again (the cancelled run wrote nothing), and the VMs must move.
func TestFencerRunsAgainWhenTheSameReplicaLeadsAgain(t *testing.T) {
	srv := etcdtest.Start(t)
	c := etcdtest.NewClient(t, srv.Endpoints)
	ctx := context.Background()
	leases := map[string]clientv3.LeaseID{}
	for _, hwid := range []string{"n1", "n2"} {
		leases[hwid] = addNodeLease(t, c, hwid)
	}
	fencer := &stuckOnce{started: make(chan struct{})}
	r := startReplicaWith(t, srv.Endpoints, "c1", func(cfg *Config) { cfg.Fencer, cfg.Grace = fencer, 300*time.Millisecond })
	if _, err := c.Put(ctx, space.VMSpec("web"), `{"vcpus":1,"memory_mib":64}`); err != nil {
		t.Fatal(err)
	}
	var pl keys.Placement
	eventually(t, "placed", func() error {
		return decodeInto(get(t, c, space.Placement("web")), &pl)
	})
	lost, other := pl.Node, "n1"
	if lost == "n1" {
		other = "n2"
	}
	if _, err := c.Revoke(ctx, leases[lost]); err != nil {
		t.Fatal(err)
	}
	select {
	case <-fencer.started:
	case <-time.After(20 * time.Second):
		t.Fatal("the fencer never started")
	}

	// The term ends (its election key deleted by hand) while the fencer hangs; the replica, the
	// only one, wins again.
	resp, err := c.Get(ctx, space.Election()+"/", clientv3.WithPrefix())
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("election keys: %v %v", resp, err)
	}
	first := resp.Kvs[0].CreateRevision
	if _, err := c.Delete(ctx, string(resp.Kvs[0].Key)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a new term", func() error {
		resp, err := c.Get(ctx, space.Election()+"/", clientv3.WithPrefix())
		if err != nil || len(resp.Kvs) != 1 || resp.Kvs[0].CreateRevision == first || !r.c.IsLeader() {
			return fmt.Errorf("election keys %v %v, leading %v", resp, err, r.c.IsLeader())
		}
		return nil
	})
	eventually(t, "fenced again by the new term, and the VM moved", func() error {
		var f keys.Fence
		if err := decodeInto(get(t, c, space.Fence(lost, "b")), &f); err != nil {
			return err
		}
		if f.Phase != keys.FenceFenced {
			return fmt.Errorf("fence phase %s after %d fencer runs", f.Phase, fencer.calls.Load())
		}
		var now keys.Placement
		if err := decodeInto(get(t, c, space.Placement("web")), &now); err != nil {
			return err
		}
		if now.Node != other || now.Epoch != pl.Epoch+1 {
			return fmt.Errorf("placement %+v", now)
		}
		return nil
	})
	if n := fencer.calls.Load(); n != 2 {
		t.Fatalf("fencer ran %d times, want 2", n)
	}
}

// startReplicaWith starts a replica whose configuration change adjusts.
func startReplicaWith(t testing.TB, endpoints []string, name string, change func(*Config)) *replica {
	t.Helper()
	cl := etcdtest.NewClient(t, endpoints)
	cfg := Config{Client: cl, Space: space, Name: name, SessionTTL: 2 * time.Second, Interval: time.Second, Log: testLog(t)}
	change(&cfg)
	co, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(context.Background())
	r := &replica{c: co, cancel: cancel, done: make(chan struct{})}
	go func() { _ = co.Run(rctx); close(r.done) }()
	t.Cleanup(r.stop)
	return r
}

// addNodeLease registers a node as addNode does and returns its lease, to end it.
func addNodeLease(t testing.TB, c *clientv3.Client, hwid string) clientv3.LeaseID {
	t.Helper()
	ctx := context.Background()
	l, err := c.Grant(ctx, 60)
	if err != nil {
		t.Fatal(err)
	}
	n := keys.Node{HWID: hwid, Lease: int64(l.ID), BootID: "b", CPUs: 4, MemoryMiB: 4096, Features: keys.AgentFeatures}
	if _, err := c.Put(ctx, space.Hardware(hwid), keys.MustEncode(&keys.Hardware{MAC: hwid})); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Put(ctx, space.Node(hwid), keys.MustEncode(&n), clientv3.WithLease(l.ID)); err != nil {
		t.Fatal(err)
	}
	return l.ID
}

// decodeInto decodes a value read from etcd, failing when it is absent.
func decodeInto[T any, P interface {
	*T
	keys.Decodable
}](v []byte, into *T) error {
	if v == nil {
		return fmt.Errorf("absent")
	}
	d, err := keys.Decode[T, P](v)
	if err != nil {
		return err
	}
	*into = *d
	return nil
}
