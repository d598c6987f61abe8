package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/e2e/rig"
	"github.com/herdhq/herd/lib/keys"
)

// TestAuthority tries the seams issue 14 found with the tools an attacker has: Debian's etcdctl and
// the certificates herd hands out, on a cluster run as in production (TLS, RBAC, nodes joined with
// one-time tokens).
//
//   - An operator cannot write any of the leader's decisions: etcd refuses.
//   - Root, who can write anything, deletes a placement, rewrites one, deletes an assignment, and
//     deletes a placement with its assignment: the leader restores each VM where it runs, with its
//     identity, and the history shows no revision at which a VM could run on two nodes, nor two
//     nodes reporting one running in one epoch.
//   - A node rewrites its key without its lease and freezes: it is treated as absent, fenced, and
//     its VMs move. A node that doubles its capacity is capped. A node cannot delete others'
//     events; its lease-less or oversized records are removed; escape sequences it writes reach
//     the operator's terminal escaped.
//   - A spec's kernel boot path outside the nodes' boot directory is refused with a problem, and a
//     symlink out of it is refused by the agent.
func TestAuthority(t *testing.T) {
	c := rig.NewSecureCluster(t, bin)
	bootDir := filepath.Join(c.Dir, "boot")
	if err := os.MkdirAll(bootDir, 0o755); err != nil {
		t.Fatal(err)
	}
	c.AgentArgs = []string{"--lease-ttl", "3s", "--resync", "2s", "--boot-dir", bootDir}
	c.CoordArgs = []string{"--session-ttl", "2s", "--grace", "2s", "--fence-exec", "echo powered off $HERD_HWID"}
	c.StartCoordinator()
	c.StartCoordinator()
	for _, id := range nodeIDs {
		c.StartAgent(id, 8, 16384)
	}
	rig.Eventually(t, 30*time.Second, "three nodes ready", func() error {
		if n := strings.Count(c.Herdctl("node", "list"), " ready "); n != 3 {
			return fmt.Errorf("%d ready", n)
		}
		return nil
	})
	names := []string{"a1", "a2", "a3", "a4"}
	for _, n := range names {
		c.Herdctl("vm", "create", n, "--memory", "512MiB")
	}
	rig.Eventually(t, 30*time.Second, "VMs running", func() error { return allInState(c, names, "running") })
	placement := func(name string) *keys.Placement {
		t.Helper()
		out := strings.TrimSpace(c.Etcdctl("get", "--print-value-only", "/herd/placements/"+name))
		if out == "" {
			return nil
		}
		p, err := keys.Decode[keys.Placement]([]byte(out))
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	before := map[string]*keys.Placement{}
	for _, n := range names {
		before[n] = placement(n)
	}
	rootCrt, rootKey := c.RootCert()
	root := func(args ...string) {
		t.Helper()
		if out, errOut, code := c.EtcdctlAs(rootCrt, rootKey, args...); code != 0 {
			t.Fatalf("etcdctl as root %v: %s%s", args, out, errOut)
		}
	}

	t.Run("operators cannot write decisions", func(t *testing.T) {
		p := before["a1"]
		for _, key := range []string{"/herd/placements/a1", "/herd/problems/a1", "/herd/assign/" + p.Node + "/a1",
			"/herd/fence/" + p.Node + "/x", "/herd/lossguard", "/herd/nodestate/" + p.Node, "/herd/rolloutstatus",
			"/herd/volumes/rbd/a1.1", "/herd/events/coordinator/x", "/herd/nodes/" + p.Node} {
			for _, args := range [][]string{{"put", key, `{"v":1}`}, {"del", key}} {
				out, errOut, code := c.Run("etcdctl", append([]string{"--endpoints", c.Endpoint}, args...)...)
				if code == 0 || !strings.Contains(errOut, "permission denied") {
					t.Errorf("operator: etcdctl %v: exit %d: %s%s", args, code, out, errOut)
				}
			}
		}
	})

	t.Run("root cannot make a VM run twice", func(t *testing.T) {
		other := func(n string) string {
			for _, id := range nodeIDs {
				if id != n {
					return id
				}
			}
			return ""
		}
		root("del", "/herd/placements/a1")
		moved := *before["a2"]
		moved.Node = other(moved.Node)
		root("put", "/herd/placements/a2", keys.MustEncode(&moved))
		root("del", "/herd/assign/"+before["a3"].Node+"/a3")
		root("del", "/herd/placements/a4")
		root("del", "/herd/assign/"+before["a4"].Node+"/a4")
		rig.Eventually(t, 60*time.Second, "every VM restored where it runs", func() error {
			for _, n := range names {
				p, b := placement(n), before[n]
				if p == nil || p.Node != b.Node || p.Epoch != b.Epoch || p.UUID != b.UUID {
					return fmt.Errorf("%s: placement %+v, was %+v", n, p, b)
				}
			}
			return allInState(c, names, "running")
		})
		ev := c.Herdctl("events", "--object", "vm/a1")
		if !strings.Contains(ev, "restored") {
			t.Fatalf("no event says the placement was restored:\n%s", ev)
		}
		assertOneRunnableAssignment(t, c)
		assertNeverRunningTwice(t, c)
	})

	t.Run("a node cannot lie its way in", func(t *testing.T) {
		// The node hosting a1 rewrites its key without its lease, then freezes.
		liar := before["a1"].Node
		crt, key := c.NodeCert(liar)
		asNode := func(args ...string) (string, string, int) { return c.EtcdctlAs(crt, key, args...) }
		cur := strings.TrimSpace(c.Etcdctl("get", "--print-value-only", "/herd/nodes/"+liar))
		if out, errOut, code := asNode("put", "/herd/nodes/"+liar, cur); code != 0 {
			t.Fatalf("node rewriting its key: %s%s", out, errOut)
		}
		rig.Eventually(t, 30*time.Second, "the lease-less key is not trusted", func() error {
			if out := c.Herdctl("node", "get", liar); !strings.Contains(out, "without a lease") {
				return fmt.Errorf("%s", out)
			}
			return nil
		})
		a := c.Agents[liar]
		if err := a.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		stopped := time.Now()
		defer func() { _ = a.Signal(syscall.SIGCONT) }()
		var on []string
		for _, n := range names {
			if before[n].Node == liar {
				on = append(on, n)
			}
		}
		rig.Eventually(t, 60*time.Second, "its VMs moved after a fence", func() error {
			vms := c.VMs()
			for _, n := range on {
				if vm := vms[n]; vm.State != "running" || vm.Placement == nil || vm.Placement.Node == liar || vm.Placement.Epoch != 2 {
					return fmt.Errorf("%s: %+v", n, vm)
				}
			}
			return nil
		})
		t.Logf("frozen node with a lease-less key: its %d VMs moved %s after SIGSTOP", len(on), time.Since(stopped).Round(100*time.Millisecond))
		if f := c.Herdctl("fence", "list"); !strings.Contains(f, liar) {
			t.Fatalf("moved without a fence:\n%s", f)
		}
		_ = a.Signal(syscall.SIGCONT)

		// Another node doubles its capacity, on its own lease: capped, and a VM that only fits the
		// claim stays pending.
		inflater := ""
		for _, id := range nodeIDs {
			if id != liar {
				inflater = id
			}
		}
		crt, key = c.NodeCert(inflater)
		out, errOut, code := c.EtcdctlAs(crt, key, "get", "-w", "json", "/herd/nodes/"+inflater)
		if code != 0 {
			t.Fatalf("%s%s", out, errOut)
		}
		var got struct {
			Kvs []struct {
				Value []byte `json:"value"`
				Lease int64  `json:"lease"`
			} `json:"kvs"`
		}
		if err := json.Unmarshal([]byte(out), &got); err != nil || len(got.Kvs) != 1 {
			t.Fatalf("node key: %v: %s", err, out)
		}
		n, err := keys.Decode[keys.Node](got.Kvs[0].Value)
		if err != nil {
			t.Fatal(err)
		}
		n.CPUs, n.MemoryMiB = n.CPUs*4, n.MemoryMiB*4
		if out, errOut, code := c.EtcdctlAs(crt, key, "put", "--lease="+strconv.FormatInt(got.Kvs[0].Lease, 16), "/herd/nodes/"+inflater, keys.MustEncode(n)); code != 0 {
			t.Fatalf("%s%s", out, errOut)
		}
		c.Herdctl("hw", "add", inflater, "--label", "inflated=yes")
		c.Herdctl("vm", "create", "greedy", "--memory", "40GiB", "--selector", "inflated=yes")
		rig.Eventually(t, 30*time.Second, "capped", func() error {
			nl := c.Herdctl("node", "list")
			vm := c.VMs()["greedy"]
			if !strings.Contains(nl, "capped") || vm.State != "pending" || vm.Problem == nil || !strings.Contains(vm.Problem.Message, "insufficient memory") {
				return fmt.Errorf("%s\n%+v", nl, vm)
			}
			return nil
		})
		c.Herdctl("vm", "delete", "greedy")

		// Events: no deleting others'; junk goes; escape sequences arrive escaped.
		if out, errOut, code := asNode("del", "--prefix", "/herd/events/"); code == 0 || !strings.Contains(errOut, "permission denied") {
			t.Fatalf("node deleting every event: exit %d: %s%s", code, out, errOut)
		}
		crt, key = c.NodeCert(inflater)
		stamp := time.Now().UTC().Format("20060102T150405.000000000Z")
		evil := keys.MustEncode(&keys.Event{Time: time.Now(), Actor: "agent/" + inflater, Object: "node/" + inflater, Action: "x",
			Message: "\x1b[2J\x1b]0;owned\x07 screen cleared"})
		junk := "/herd/events/node/" + inflater + "/" + stamp + "-nolease"
		if _, errOut, code := c.EtcdctlAs(crt, key, "put", junk, evil); code != 0 {
			t.Fatal(errOut)
		}
		node := c.ClientAs(crt, key)
		ctx := context.Background()
		if _, err := node.Put(ctx, "/herd/events/node/"+inflater+"/"+stamp+"-big", strings.Repeat("x", 5<<18)); err == nil || !strings.Contains(err.Error(), "too large") {
			t.Fatalf("a 1.25 MiB event: %v", err)
		}
		lease, errOut, code := c.EtcdctlAs(crt, key, "lease", "grant", "3600")
		if code != 0 {
			t.Fatal(errOut)
		}
		id := strings.Fields(lease)[1]
		if _, errOut, code := c.EtcdctlAs(crt, key, "put", "--lease="+id, "/herd/events/node/"+inflater+"/"+stamp+"-evil", evil); code != 0 {
			t.Fatal(errOut)
		}
		lid, err := strconv.ParseInt(id, 16, 64)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := node.Put(ctx, "/herd/events/node/"+inflater+"/"+stamp+"-fat", strings.Repeat("x", 100<<10), clientv3.WithLease(clientv3.LeaseID(lid))); err != nil {
			t.Fatal(err)
		}
		rig.Eventually(t, 30*time.Second, "junk events removed", func() error {
			if out := c.Etcdctl("get", "--keys-only", "--prefix", "/herd/events/node/"+inflater+"/"+stamp); strings.Contains(out, "nolease") || strings.Contains(out, "fat") {
				return fmt.Errorf("%s", out)
			}
			return nil
		})
		shown := c.Herdctl("events", "--object", "node/"+inflater)
		if strings.ContainsAny(shown, "\x1b\x07") || !strings.Contains(shown, `\u001b[2J`) {
			t.Fatalf("herdctl events printed the node's escape sequences raw:\n%q", shown)
		}
	})

	t.Run("kernel boot paths stay in the boot directory", func(t *testing.T) {
		c.Herdctl("vm", "create", "evil", "--memory", "128MiB", "--kernel", "/run/herd/credentials/node.key")
		if err := os.Symlink("/etc/hostname", filepath.Join(bootDir, "link")); err != nil {
			t.Fatal(err)
		}
		c.Herdctl("vm", "create", "sneaky", "--memory", "128MiB", "--kernel", filepath.Join(bootDir, "link"))
		rig.Eventually(t, 30*time.Second, "both refused", func() error {
			vms := c.VMs()
			e, s := vms["evil"], vms["sneaky"]
			if e.State != "pending" || e.Problem == nil || !strings.Contains(e.Problem.Message, "kernel boot path outside") {
				return fmt.Errorf("evil: %+v", e)
			}
			if s.State != "error" {
				return fmt.Errorf("sneaky: %+v", s)
			}
			return nil
		})
		if out := c.Herdctl("vm", "get", "sneaky"); !strings.Contains(out, "outside this node's boot directory") {
			t.Fatalf("the agent's refusal is not shown:\n%s", out)
		}
	})
}

// assertOneRunnableAssignment replays every write to the assignments and fails if a VM could, at
// any revision, run on two nodes (two assignments neither incoming nor withdrawn).
func assertOneRunnableAssignment(t *testing.T, c *rig.Cluster) {
	t.Helper()
	assertAssignedOnce(t, c, "could run on", func(a *keys.Assignment) bool { return a.Incoming == "" && !a.Withdraw })
}

// assertAssignedOnce replays etcd's whole history of assignments and fails if a VM ever had two
// that counts at one revision. One transaction is one revision: the state is checked after each
// revision, not between the operations of a move (which puts the new assignment and deletes the
// old one together).
func assertAssignedOnce(t *testing.T, c *rig.Cluster, what string, counts func(*keys.Assignment) bool) {
	t.Helper()
	held := map[string]map[string]bool{} // vm -> node -> counted
	rev := int64(0)
	check := func() {
		for vm, nodes := range held {
			var on []string
			for node, ok := range nodes {
				if ok {
					on = append(on, node)
				}
			}
			if len(on) > 1 {
				t.Fatalf("at revision %d vm %s %s %v at once", rev, vm, what, on)
			}
		}
	}
	for _, ev := range c.History(space.AssignRoot()) {
		if ev.Kv.ModRevision != rev {
			check()
			rev = ev.Kv.ModRevision
		}
		hwid, name, ok := keys.ParseNodeScoped(space.AssignRoot(), string(ev.Kv.Key))
		if !ok {
			continue
		}
		if held[name] == nil {
			held[name] = map[string]bool{}
		}
		if ev.Type == clientv3.EventTypeDelete {
			delete(held[name], hwid)
			continue
		}
		a, err := keys.Decode[keys.Assignment](ev.Kv.Value)
		if err != nil {
			t.Fatal(err)
		}
		held[name][hwid] = counts(a)
	}
	check()
}

// assertNeverRunningTwice replays every status write: for one VM and epoch, never two nodes
// reporting it running.
func assertNeverRunningTwice(t *testing.T, c *rig.Cluster) {
	t.Helper()
	running := map[string]map[string]bool{} // vm/epoch -> nodes
	for _, ev := range c.History(space.StatusRoot()) {
		hwid, name, ok := keys.ParseNodeScoped(space.StatusRoot(), string(ev.Kv.Key))
		if !ok {
			continue
		}
		for k := range running {
			if strings.HasPrefix(k, name+"/") {
				delete(running[k], hwid)
			}
		}
		if ev.Type == clientv3.EventTypeDelete {
			continue
		}
		st, err := keys.Decode[keys.VMStatus](ev.Kv.Value)
		if err != nil {
			t.Fatal(err)
		}
		if st.State == keys.StateRunning {
			k := fmt.Sprintf("%s/%d", name, st.Epoch)
			if running[k] == nil {
				running[k] = map[string]bool{}
			}
			running[k][hwid] = true
			if len(running[k]) > 1 {
				t.Fatalf("revision %d: vm %s epoch %d reported running by %v", ev.Kv.ModRevision, name, st.Epoch, running[k])
			}
		}
	}
}
