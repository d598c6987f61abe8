package e2e

import (
	"fmt"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/e2e/rig"
	"github.com/herdhq/herd/lib/keys"
)

var space = keys.MustSpace("/herd")

// createVMs creates VMs named prefix00.. with etcdctl-free herdctl calls, par at a time. after is
// called once `at` VMs exist (e.g. to kill a leader mid-way).
func createVMs(t *testing.T, c *rig.Cluster, prefix string, n, par, at int, after func()) []string {
	t.Helper()
	return createVMsWith(t, c, prefix, n, par, at, after)
}

// createVMsWith is createVMs with more flags for each vm create.
func createVMsWith(t *testing.T, c *rig.Cluster, prefix string, n, par, at int, after func(), flags ...string) []string {
	t.Helper()
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("%s%02d", prefix, i)
	}
	sem := make(chan struct{}, par)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failures []string
	for i, name := range names {
		if i == at && after != nil {
			wg.Wait()
			after()
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			// herdctl retries nothing by itself: a create that hits the moment etcd loses its
			// leader fails and is run again here, as an operator would.
			for attempt := 0; ; attempt++ {
				out, errOut, code := c.Run(bin.Herdctl, append([]string{"vm", "create", name, "--memory", "256MiB"}, flags...)...)
				if code == 0 || strings.Contains(errOut, "already exists") {
					return
				}
				if attempt == 5 {
					mu.Lock()
					failures = append(failures, fmt.Sprintf("%s: %s%s", name, out, errOut))
					mu.Unlock()
					return
				}
				time.Sleep(500 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	if len(failures) > 0 {
		t.Fatalf("creates failed: %v", failures)
	}
	return names
}

// assertNeverPlacedTwice replays etcd's whole history of assignments and placements: at no
// revision did any VM have two assignments, and no placement ever changed node without a new
// epoch.
func assertNeverPlacedTwice(t *testing.T, c *rig.Cluster) (placements int) {
	t.Helper()
	assertAssignedOnce(t, c, "was assigned to", func(*keys.Assignment) bool { return true })
	placements, err := rig.ReplayPlacements(c.History(space.PlacementPrefix()), space)
	if err != nil {
		t.Fatal(err)
	}
	return placements
}

// TestLeaderKilledWhileCreating: kill -9 the leading coordinator while 50 VMs, each with a NIC on
// one network, are being created. All 50 run, and etcd's history shows none was ever placed twice,
// and no address was ever held by two VMs or by a VM without its claim.
func TestLeaderKilledWhileCreating(t *testing.T) {
	c := rig.NewCluster(t, bin)
	c.AgentArgs = []string{"--lease-ttl", "3s"}
	c.CoordArgs = []string{"--session-ttl", "2s"}
	c.StartCoordinator()
	c.StartCoordinator()
	for _, id := range nodeIDs {
		c.StartAgent(id, 16, 32768)
	}
	old := c.Leader(30 * time.Second)
	if out, errOut, code := c.Run(bin.Herdctl, "net", "create", "ha", "--cidr", "10.30.0.0/24", "--gateway", "10.30.0.1"); code != 0 {
		t.Fatalf("net create: %s%s", out, errOut)
	}
	names := createVMsWith(t, c, "ha", 50, 8, 20, func() {
		old.Kill()
		t.Logf("killed leader %s after 20 creates", old.Name)
	}, "--net", "ha")
	rig.Eventually(t, 90*time.Second, "50 VMs running", func() error { return allInState(c, names, "running") })
	if l := c.Leader(30 * time.Second); l == old {
		t.Fatal("the killed coordinator leads")
	}
	if n := assertNeverPlacedTwice(t, c); n != 50 {
		t.Fatalf("history shows %d first placements, want 50", n)
	}
	evs := append(c.History(space.PlacementPrefix()), c.History(space.AddressRoot())...)
	if n, err := rig.ReplayAddresses(evs, space); err != nil {
		t.Fatal(err)
	} else if n != 50 {
		t.Fatalf("history shows %d addresses held, want 50", n)
	}
	out, errOut, code := c.Run(bin.Herdctl, "net", "delete", "ha")
	if code == 0 || !strings.Contains(errOut, "in use") {
		t.Fatalf("deleting a network in use: exit %d: %s%s", code, out, errOut)
	}
}

// TestStoppedLeaderCannotWrite: SIGSTOP the leader past its session TTL; the standby takes over and
// places VMs; SIGCONT the old leader: it steps down and nothing it computed is applied — every
// placement written after the takeover carries the new term.
func TestStoppedLeaderCannotWrite(t *testing.T) {
	c := rig.NewCluster(t, bin)
	c.AgentArgs = []string{"--lease-ttl", "3s"}
	c.CoordArgs = []string{"--session-ttl", "2s"}
	c.StartCoordinator()
	c.StartCoordinator()
	for _, id := range nodeIDs {
		c.StartAgent(id, 16, 32768)
	}
	first := createVMs(t, c, "pre", 5, 5, -1, nil)
	rig.Eventually(t, 30*time.Second, "first VMs running", func() error { return allInState(c, first, "running") })
	old := c.Leader(30 * time.Second)
	if err := old.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := true
	defer func() {
		if stopped {
			_ = old.Signal(syscall.SIGCONT)
		}
	}()
	// The stopped leader's stream still receives these; it computes nothing until it runs again.
	second := createVMs(t, c, "post", 10, 5, -1, nil)
	var standby *rig.Coordinator
	for _, co := range c.Coords {
		if co != old {
			standby = co
		}
	}
	rig.Eventually(t, 30*time.Second, "standby leads", func() error {
		if !standby.IsLeader() {
			return fmt.Errorf("not yet")
		}
		return nil
	})
	rig.Eventually(t, 30*time.Second, "new VMs running", func() error { return allInState(c, second, "running") })
	// More work arrives while the old leader is still stopped, then it wakes up.
	third := createVMs(t, c, "late", 5, 5, -1, nil)
	if err := old.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	stopped = false
	rig.Eventually(t, 30*time.Second, "all VMs running", func() error {
		return allInState(c, append(append(append([]string{}, first...), second...), third...), "running")
	})
	rig.Eventually(t, 30*time.Second, "old leader stepped down", func() error {
		if old.IsLeader() {
			return fmt.Errorf("still claims leadership")
		}
		log := rig.Tail(old.Log, 200)
		if !strings.Contains(log, "stepping down") {
			return fmt.Errorf("no step-down in its log")
		}
		return nil
	})
	time.Sleep(2 * time.Second) // give a confused old leader every chance to write
	for _, line := range strings.Split(rig.Tail(old.Log, 200), "\n") {
		if strings.Contains(line, "stepping down") || strings.Contains(line, "deposed") {
			t.Logf("old leader: %s", line)
		}
	}

	// Find the takeover: the first placement written by the standby. After it, no write of the
	// old term may exist.
	var takeover int64
	oldName := old.Name
	var oldTerm int64
	for _, ev := range c.History(space.PlacementPrefix()) {
		if ev.Type != clientv3.EventTypePut {
			continue
		}
		pl, err := keys.Decode[keys.Placement](ev.Kv.Value)
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case pl.By == oldName:
			oldTerm = pl.Term
			if takeover != 0 {
				t.Fatalf("the deposed leader wrote a placement at revision %d, after the takeover at %d", ev.Kv.ModRevision, takeover)
			}
		case takeover == 0:
			takeover = ev.Kv.ModRevision
			if pl.Term <= oldTerm {
				t.Fatalf("new term %d not after old term %d", pl.Term, oldTerm)
			}
		}
	}
	if takeover == 0 || oldTerm == 0 {
		t.Fatalf("history lacks one of the terms: takeover %d, old term %d", takeover, oldTerm)
	}
	assertNeverPlacedTwice(t, c)
}

// TestEtcdLeaderKilled: a three-member etcd cluster; kill -9 the etcd leader during scheduling. All
// VMs still converge, and the member restarts and rejoins.
func TestEtcdLeaderKilled(t *testing.T) {
	c, members := rig.NewCluster3(t, bin)
	c.AgentArgs = []string{"--lease-ttl", "5s"}
	c.CoordArgs = []string{"--session-ttl", "3s"}
	c.StartCoordinator()
	c.StartCoordinator()
	for _, id := range nodeIDs {
		c.StartAgent(id, 16, 32768)
	}
	c.Leader(30 * time.Second)
	var killed *rig.Member
	names := createVMs(t, c, "et", 30, 6, 10, func() {
		m, err := rig.EtcdLeader(members)
		if err != nil {
			t.Fatal(err)
		}
		m.Kill()
		killed = m
		t.Logf("killed etcd leader %s after 10 creates", m.Name)
	})
	rig.Eventually(t, 120*time.Second, "30 VMs running", func() error { return allInState(c, names, "running") })
	killed.Restart(t, c)
	rig.Eventually(t, 60*time.Second, "restarted member rejoined", func() error {
		if !killed.Healthy() {
			return fmt.Errorf("%s not healthy", killed.Name)
		}
		// A serializable read answered from the member's own copy proves it caught up.
		out, errOut, code := c.Run("etcdctl", "--endpoints", killed.ClientURL, "--consistency", "s", "get", "--keys-only", "/herd/placements/et29")
		if code != 0 || !strings.Contains(out, "/herd/placements/et29") {
			return fmt.Errorf("member data: %s%s", out, errOut)
		}
		return nil
	})
	assertNeverPlacedTwice(t, c)
}

// TestSchedulingRules drives the scheduler's filters through herdctl on real processes:
// anti-affinity, node selector on hardware labels, cordon, vCPU overcommit, capacity.
func TestSchedulingRules(t *testing.T) {
	c := rig.NewCluster(t, bin)
	c.AgentArgs = []string{"--lease-ttl", "3s"}
	c.CoordArgs = []string{"--session-ttl", "2s", "--cpu-overcommit", "1.5"}
	c.StartCoordinator()
	for _, id := range nodeIDs {
		c.StartAgent(id, 4, 8192)
	}
	c.Herdctl("hw", "add", nodeIDs[0], "--label", "zone=a")
	c.Herdctl("hw", "add", nodeIDs[1], "--label", "zone=a")
	c.Herdctl("hw", "add", nodeIDs[2], "--label", "zone=b", "--label", "ssd=yes")
	c.Leader(30 * time.Second)

	for i := range 4 {
		c.Herdctl("vm", "create", fmt.Sprintf("db%d", i), "--anti-affinity", "db", "--memory", "256MiB")
	}
	var pendingDB string
	rig.Eventually(t, 30*time.Second, "three db VMs on three nodes, one pending", func() error {
		vms := c.VMs()
		nodes := map[string]bool{}
		pendingDB = ""
		for i := range 4 {
			vm := vms[fmt.Sprintf("db%d", i)]
			switch vm.State {
			case "running":
				nodes[vm.Placement.Node] = true
			case "pending":
				if vm.Problem == nil || !strings.Contains(vm.Problem.Message, "anti-affinity") {
					return fmt.Errorf("pending without the reason: %+v", vm.Problem)
				}
				pendingDB = vm.Name
			}
		}
		if len(nodes) != 3 || pendingDB == "" {
			return fmt.Errorf("running on %v, pending %q", nodes, pendingDB)
		}
		return nil
	})
	c.Herdctl("vm", "delete", pendingDB)

	c.Herdctl("vm", "create", "fast", "--selector", "ssd=yes", "--memory", "256MiB")
	rig.Eventually(t, 30*time.Second, "selector honoured", func() error {
		vm := c.VMs()["fast"]
		if vm.State != "running" || vm.Placement.Node != nodeIDs[2] {
			return fmt.Errorf("%+v", vm)
		}
		return nil
	})

	c.Herdctl("node", "cordon", nodeIDs[2], "--reason", "test")
	c.Herdctl("vm", "create", "fast2", "--selector", "zone=b", "--memory", "256MiB")
	rig.Eventually(t, 30*time.Second, "cordoned node refused", func() error {
		vm := c.VMs()["fast2"]
		if vm.State != "pending" || vm.Problem == nil || !strings.Contains(vm.Problem.Message, "1 node: unschedulable: cordoned") {
			return fmt.Errorf("%+v %+v", vm, vm.Problem)
		}
		return nil
	})
	if vm := c.VMs()["fast"]; vm.State != "running" {
		t.Fatalf("cordon touched a running VM: %+v", vm)
	}
	c.Herdctl("node", "uncordon", nodeIDs[2])
	rig.Eventually(t, 30*time.Second, "uncordoned node takes it", func() error {
		if vm := c.VMs()["fast2"]; vm.State != "running" || vm.Placement.Node != nodeIDs[2] {
			return fmt.Errorf("%+v", vm)
		}
		return nil
	})

	// 4 CPUs × 1.5 = 6 vCPUs per node; node 3 already carries 3 one-vCPU VMs.
	c.Herdctl("vm", "create", "wide", "--vcpus", "7", "--memory", "256MiB")
	rig.Eventually(t, 30*time.Second, "overcommit limit", func() error {
		vm := c.VMs()["wide"]
		if vm.State != "pending" || vm.Problem == nil || !strings.Contains(vm.Problem.Message, "3 nodes: insufficient vCPUs (needs 7)") {
			return fmt.Errorf("%+v", vm.Problem)
		}
		return nil
	})
	c.Herdctl("vm", "create", "six", "--vcpus", "5", "--memory", "256MiB")
	rig.Eventually(t, 30*time.Second, "5 vCPUs fit beside one", func() error {
		if vm := c.VMs()["six"]; vm.State != "running" {
			return fmt.Errorf("%+v", vm)
		}
		return nil
	})
	// Memory: 8 GiB nodes; nothing of 9 GiB fits.
	c.Herdctl("vm", "create", "fat", "--memory", "9GiB")
	rig.Eventually(t, 30*time.Second, "memory exhausted", func() error {
		vm := c.VMs()["fat"]
		if vm.State != "pending" || vm.Problem == nil || !strings.Contains(vm.Problem.Message, "insufficient memory (needs 9GiB") {
			return fmt.Errorf("%+v", vm.Problem)
		}
		return nil
	})
	out := c.Herdctl("events", "--object", "vm/fat")
	if !strings.Contains(out, "problem") {
		t.Fatalf("no problem event for vm/fat:\n%s", out)
	}
}
