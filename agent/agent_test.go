package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/agent/hypervisor"
	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/volume"
)

const hwid = "52:54:00:00:00:01"

var space = keys.MustSpace("/herd")

type harness struct {
	t      *testing.T
	c      *clientv3.Client
	hv     *hypervisor.Libvirt
	agent  *Agent
	cancel context.CancelFunc
	done   chan struct{}
}

// start runs an agent against a real embedded etcd and a libvirt test-driver node.
func start(t *testing.T) *harness { return startWith(t, nil) }

// startWith starts an agent after setup has written what should be there before it starts.
func startWith(t *testing.T, setup func(c *clientv3.Client), opts ...func(*Config)) *harness {
	t.Helper()
	c := etcdtest.Client(t)
	ctx := context.Background()
	put(t, c, space.Cluster(), keys.MustEncode(&keys.Cluster{ID: "cluster-a", Pools: []string{"default"}}))
	put(t, c, space.Hardware(hwid), keys.MustEncode(&keys.Hardware{MAC: hwid}))
	if setup != nil {
		setup(c)
	}
	uri, err := hypervisor.WriteTestNode(t.TempDir(), "n1", 4, 8192)
	if err != nil {
		t.Fatal(err)
	}
	hv, err := hypervisor.Open(ctx, uri, "", hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(hv.Close)
	cfg := Config{Client: c, Space: space, HWID: hwid, BootID: "boot-1", Hypervisor: hv,
		Volumes: volume.Dir{Root: t.TempDir()}, LeaseTTL: 2 * time.Second, Resync: 500 * time.Millisecond}
	for _, o := range opts {
		o(&cfg)
	}
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	h := &harness{t: t, c: c, hv: hv, agent: a, cancel: cancel, done: make(chan struct{})}
	go func() { _ = a.Run(rctx); close(h.done) }()
	t.Cleanup(h.stop)
	return h
}

func (h *harness) stop() {
	h.cancel()
	<-h.done
}

func put(t *testing.T, c *clientv3.Client, k, v string) int64 {
	t.Helper()
	resp, err := c.Put(context.Background(), k, v)
	if err != nil {
		t.Fatal(err)
	}
	return resp.Header.Revision
}

func del(t *testing.T, c *clientv3.Client, k string) {
	t.Helper()
	if _, err := c.Delete(context.Background(), k); err != nil {
		t.Fatal(err)
	}
}

// place writes what a leader would: spec (whose CreateRevision is the uid), placement and assignment.
func (h *harness) place(name string, epoch int64, node string) int64 {
	spec := keys.VMSpec{VCPUs: 1, MemoryMiB: 64, Disk: &keys.Disk{Pool: "default", SizeGiB: 1}}
	resp, err := h.c.Get(context.Background(), space.VMSpec(name))
	if err != nil {
		h.t.Fatal(err)
	}
	uid := int64(0)
	if len(resp.Kvs) > 0 {
		uid = resp.Kvs[0].CreateRevision
	} else {
		uid = put(h.t, h.c, space.VMSpec(name), keys.MustEncode(&spec))
	}
	pl := keys.Placement{UID: uid, Node: node, Epoch: epoch, UUID: fmt.Sprintf("00000000-0000-4000-8000-%012d", uid), SpecRev: uid}
	put(h.t, h.c, space.Placement(name), keys.MustEncode(&pl))
	if node == hwid {
		asg := keys.Assignment{UID: uid, Epoch: epoch, UUID: pl.UUID, SpecRev: uid, Spec: &spec}
		put(h.t, h.c, space.Assign(hwid, name), keys.MustEncode(&asg))
	}
	return uid
}

func (h *harness) eventually(what string, cond func() error) {
	h.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("%s: %v", what, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (h *harness) domain(name string) *hypervisor.Domain {
	d, err := h.hv.Lookup(context.Background(), name)
	if err != nil {
		h.t.Fatal(err)
	}
	return d
}

func (h *harness) status(name string) *keys.VMStatus {
	resp, err := h.c.Get(context.Background(), space.Status(hwid, name))
	if err != nil {
		h.t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		return nil
	}
	st, err := keys.Decode[keys.VMStatus](resp.Kvs[0].Value)
	if err != nil {
		h.t.Fatal(err)
	}
	return st
}

func (h *harness) running(name string, uid, epoch int64) {
	h.t.Helper()
	h.eventually(name+" running and reported", func() error {
		d := h.domain(name)
		if d == nil || d.State != hypervisor.Running || d.UID != uid || d.Epoch != epoch || d.Cluster != "cluster-a" {
			return fmt.Errorf("domain %+v", d)
		}
		if st := h.status(name); st == nil || st.State != keys.StateRunning || st.UID != uid || st.Epoch != epoch {
			return fmt.Errorf("status %+v", st)
		}
		return nil
	})
}

func TestRegistersAndRunsAssignments(t *testing.T) {
	h := start(t)
	h.eventually("node registered", func() error {
		resp, err := h.c.Get(context.Background(), space.Node(hwid))
		if err != nil || len(resp.Kvs) == 0 || resp.Kvs[0].Lease == 0 {
			return fmt.Errorf("node key: %v %v", resp, err)
		}
		n, err := keys.Decode[keys.Node](resp.Kvs[0].Value)
		if err != nil || n.CPUs != 4 || n.MemoryMiB != 8192 || n.BootID != "boot-1" {
			return fmt.Errorf("node %+v %v", n, err)
		}
		return nil
	})
	uid := h.place("web1", 1, hwid)
	h.running("web1", uid, 1)

	// Power off through the spec (the leader copies it into the assignment).
	spec := keys.VMSpec{VCPUs: 1, MemoryMiB: 64, Power: keys.PowerStopped, Disk: &keys.Disk{Pool: "default", SizeGiB: 1}}
	asg := keys.Assignment{UID: uid, Epoch: 1, UUID: fmt.Sprintf("00000000-0000-4000-8000-%012d", uid), SpecRev: uid + 100, Spec: &spec}
	put(t, h.c, space.Assign(hwid, "web1"), keys.MustEncode(&asg))
	h.eventually("web1 stopped", func() error {
		if d := h.domain("web1"); d == nil || d.State != hypervisor.Stopped {
			return fmt.Errorf("domain %+v", d)
		}
		if st := h.status("web1"); st == nil || st.State != keys.StateStopped {
			return fmt.Errorf("status %+v", st)
		}
		return nil
	})

	// A clean stop revokes the lease: the node key goes at once, the domain stays.
	h.stop()
	resp, _ := h.c.Get(context.Background(), space.Node(hwid))
	if len(resp.Kvs) != 0 {
		t.Fatal("node key survived a clean stop")
	}
	if h.domain("web1") == nil {
		t.Fatal("stopping the agent removed a domain")
	}
}

func TestDestroysOnlyOnPositiveEvidence(t *testing.T) {
	h := start(t)
	uid := h.place("web1", 1, hwid)
	h.running("web1", uid, 1)

	// The assignment vanishes but spec and placement still say this node: no evidence. Keep it.
	del(t, h.c, space.Assign(hwid, "web1"))
	h.eventually("orphan reported", func() error {
		if st := h.status("web1"); st == nil || st.State != keys.StateOrphan {
			return fmt.Errorf("status %+v", st)
		}
		return nil
	})
	time.Sleep(time.Second) // several resyncs
	if d := h.domain("web1"); d == nil || d.State != hypervisor.Running {
		t.Fatalf("domain without evidence was touched: %+v", d)
	}

	// The placement moves on to another node with a newer epoch: positive evidence.
	h.place("web1", 2, "52:54:00:00:00:99")
	h.eventually("moved-away domain removed", func() error {
		if d := h.domain("web1"); d != nil {
			return fmt.Errorf("still there: %+v", d)
		}
		if st := h.status("web1"); st != nil {
			return fmt.Errorf("status left: %+v", st)
		}
		return nil
	})

	// Deleting the spec is positive evidence.
	uid2 := h.place("db1", 1, hwid)
	h.running("db1", uid2, 1)
	del(t, h.c, space.Assign(hwid, "db1"))
	del(t, h.c, space.VMSpec("db1"))
	h.eventually("deleted VM removed", func() error {
		if d := h.domain("db1"); d != nil {
			return fmt.Errorf("still there: %+v", d)
		}
		return nil
	})
}

func TestReusedNameReplacesOldIncarnation(t *testing.T) {
	h := start(t)
	uid := h.place("web1", 1, hwid)
	h.running("web1", uid, 1)
	del(t, h.c, space.VMSpec("web1"))
	uid2 := h.place("web1", 1, hwid) // a new spec: a new uid; same name, same node
	if uid2 <= uid {
		t.Fatal("uid must grow")
	}
	h.running("web1", uid2, 1)
	// The old incarnation's removal is no crash of the new one (found by e2e/ceph: the new
	// incarnation waited out a crash backoff, and `vm create --wait` reported it failed).
	resp, err := h.c.Get(context.Background(), space.EventPrefix(), clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range resp.Kvs {
		if strings.Contains(string(kv.Value), `"action":"crashed"`) {
			t.Fatalf("a re-created VM counted as a crash: %s", kv.Value)
		}
	}
}

func TestClusterChangeIsNoEvidence(t *testing.T) {
	h := start(t)
	uid := h.place("web1", 1, hwid)
	h.running("web1", uid, 1)
	// etcd "wiped": a new cluster record and nothing else.
	put(t, h.c, space.Cluster(), keys.MustEncode(&keys.Cluster{ID: "cluster-b", Pools: []string{"default"}}))
	del(t, h.c, space.Assign(hwid, "web1"))
	del(t, h.c, space.VMSpec("web1"))
	del(t, h.c, space.Placement("web1"))
	h.eventually("orphan reported", func() error {
		if st := h.status("web1"); st == nil || st.State != keys.StateOrphan {
			return fmt.Errorf("status %+v", st)
		}
		return nil
	})
	time.Sleep(time.Second)
	if d := h.domain("web1"); d == nil || d.State != hypervisor.Running {
		t.Fatalf("domain destroyed after a cluster change: %+v", d)
	}
}

func TestPreflightRefusesWithoutLease(t *testing.T) {
	h := start(t)
	h.eventually("registered", func() error {
		if !h.agent.leaseAlive() {
			return errors.New("no lease yet")
		}
		return nil
	})
	uid := h.place("web1", 1, hwid)
	h.running("web1", uid, 1)
	kv := h.agent.assigns.Get(space.Assign(hwid, "web1"))
	if err := h.agent.preflight(context.Background(), kv); err != nil {
		t.Fatalf("preflight with a live lease and current assignment: %v", err)
	}
	h.agent.aliveUntil.Store(0)
	if err := h.agent.preflight(context.Background(), kv); !errors.Is(err, errNotSafe) {
		t.Fatalf("preflight without a lease: %v", err)
	}
	stale := *kv
	stale.ModRevision--
	h.agent.markAlive(10)
	if err := h.agent.preflight(context.Background(), &stale); !errors.Is(err, errNotSafe) {
		t.Fatalf("preflight on a stale assignment: %v", err)
	}
	// A fence record of an earlier boot of this node (no leader has dropped it yet): a move made
	// on it would not fence this boot, so this boot starts nothing until it is gone.
	old := space.Fence(hwid, "an-earlier-boot")
	put(t, h.c, old, keys.MustEncode(&keys.Fence{HWID: hwid, BootID: "an-earlier-boot", Phase: keys.FenceFenced}))
	if err := h.agent.preflight(context.Background(), kv); !errors.Is(err, errNotSafe) || !strings.Contains(err.Error(), "an-earlier-boot") {
		t.Fatalf("preflight with an earlier boot's fence record standing: %v", err)
	}
	if _, err := h.c.Delete(context.Background(), old); err != nil {
		t.Fatal(err)
	}
	if err := h.agent.preflight(context.Background(), kv); err != nil {
		t.Fatalf("preflight once the earlier boot's record is gone: %v", err)
	}
}

func TestWaitsForEnrolment(t *testing.T) {
	c := etcdtest.Client(t)
	put(t, c, space.Cluster(), keys.MustEncode(&keys.Cluster{ID: "cluster-a", Pools: []string{"default"}}))
	uri, _ := hypervisor.WriteTestNode(t.TempDir(), "n1", 2, 1024)
	hv, err := hypervisor.Open(context.Background(), uri, "", hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer hv.Close()
	a, err := New(Config{Client: c, Space: space, HWID: hwid, BootID: "b", Hypervisor: hv, Volumes: volume.Dir{Root: t.TempDir()}, LeaseTTL: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = a.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	time.Sleep(1500 * time.Millisecond)
	if resp, _ := c.Get(context.Background(), space.Node(hwid)); len(resp.Kvs) != 0 {
		t.Fatal("an unenrolled machine registered")
	}
	put(t, c, space.Hardware(hwid), keys.MustEncode(&keys.Hardware{MAC: hwid}))
	deadline := time.Now().Add(15 * time.Second)
	for {
		if resp, _ := c.Get(context.Background(), space.Node(hwid)); len(resp.Kvs) == 1 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("did not register after enrolment")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestNewBootClearsStaleReports: a status an earlier boot wrote for a VM that is neither assigned
// here nor defined (deleted while the node was down and fenced) is removed by the next boot.
func TestNewBootClearsStaleReports(t *testing.T) {
	h := startWith(t, func(c *clientv3.Client) {
		put(t, c, space.Status(hwid, "gone"), keys.MustEncode(&keys.VMStatus{UID: 3, Epoch: 1, State: keys.StateRunning}))
	})
	h.eventually("the stale report removed", func() error {
		resp, err := h.c.Get(context.Background(), space.Status(hwid, "gone"))
		if err != nil || len(resp.Kvs) > 0 {
			return fmt.Errorf("still there: %v", err)
		}
		return nil
	})
}

func TestCrashedGuestRestartsWithBackoff(t *testing.T) {
	h := startWith(t, nil, func(c *Config) { c.CrashBackoff = 100 * time.Millisecond })
	uid := h.place("web1", 1, hwid)
	h.running("web1", uid, 1)
	// A crash is a domain that stops although the agent did not stop it (QEMU died).
	for i := 1; i < crashLoop; i++ {
		if err := h.hv.Destroy(context.Background(), "web1"); err != nil {
			t.Fatal(err)
		}
		h.running("web1", uid, 1)
	}
	if err := h.hv.Destroy(context.Background(), "web1"); err != nil {
		t.Fatal(err)
	}
	h.eventually("a crash loop reported", func() error {
		if st := h.status("web1"); st == nil || st.State != keys.StateCrashLoop || !strings.Contains(st.Message, fmt.Sprintf("crashed %d times", crashLoop)) {
			return fmt.Errorf("status %+v", st)
		}
		return nil
	})
	// Started again once the backoff (1.6 s after the fifth crash) has passed.
	h.running("web1", uid, 1)
	resp, err := h.c.Get(context.Background(), space.EventPrefix(), clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	crashes := 0
	for _, kv := range resp.Kvs {
		if strings.Contains(string(kv.Value), `"action":"crashed"`) {
			crashes++
		}
	}
	if crashes != crashLoop {
		t.Fatalf("%d crash events, want %d", crashes, crashLoop)
	}
}

func TestCrashBackoff(t *testing.T) {
	want := []time.Duration{0, time.Second, 2 * time.Second, 4 * time.Second}
	for n, w := range want {
		if got := crashBackoff(time.Second, n); got != w {
			t.Errorf("crash %d: %s, want %s", n, got, w)
		}
	}
	if got := crashBackoff(time.Second, 12); got != maxCrashBackoff {
		t.Errorf("crash 12: %s", got)
	}
	if got := crashBackoff(time.Second, 1000); got != maxCrashBackoff {
		t.Errorf("crash 1000: %s", got)
	}
}

// TestRestartMoveOfAbsentDomainIsEvicted: a restart move whose source has no domain (the node
// rebooted since the move began) is answered "evicted", so the leader can start the VM on the
// target; the soak found a move stuck "migrating" for minutes without it.
func TestRestartMoveOfAbsentDomainIsEvicted(t *testing.T) {
	h := start(t)
	spec := keys.VMSpec{VCPUs: 1, MemoryMiB: 64, Disk: &keys.Disk{Pool: "default", SizeGiB: 1}}
	uid := put(t, h.c, space.VMSpec("gone1"), keys.MustEncode(&spec))
	asg := keys.Assignment{UID: uid, Epoch: 1, UUID: fmt.Sprintf("00000000-0000-4000-8000-%012d", uid), SpecRev: uid, Spec: &spec,
		Outgoing: &keys.Outgoing{ID: "m-1", To: "52:54:00:00:00:99", Mode: keys.ModeRestart}}
	put(t, h.c, space.Assign(hwid, "gone1"), keys.MustEncode(&asg))
	h.eventually("gone1 reported evicted", func() error {
		if st := h.status("gone1"); st == nil || st.Migration != "m-1" || st.MigrationResult != keys.MigrationEvicted || st.State != keys.StateStopped {
			return fmt.Errorf("status %+v", st)
		}
		return nil
	})
	if h.domain("gone1") != nil {
		t.Fatal("a domain was made for a VM moving away")
	}
}
