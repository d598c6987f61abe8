package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/herdhq/herd/e2e/rig"
)

var bin rig.Binaries

func TestMain(m *testing.M) { rig.Main(m, "herd-e2e-bin-", &bin) }

var nodeIDs = []string{"52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:00:00:00:03"}

// startSkeleton starts etcd, two coordinators (vCPU overcommit 2) and three agents of 8 CPUs and
// 16 GiB each.
func startSkeleton(t *testing.T) *rig.Cluster {
	return startSkeletonOn(t, rig.NewCluster(t, bin))
}

func startSkeletonOn(t *testing.T, c *rig.Cluster) *rig.Cluster {
	c.AgentArgs = []string{"--lease-ttl", "3s", "--resync", "2s"}
	c.CoordArgs = []string{"--session-ttl", "2s", "--cpu-overcommit", "2"}
	c.StartCoordinator()
	c.StartCoordinator()
	for _, id := range nodeIDs {
		c.StartAgent(id, 8, 16384)
	}
	rig.Eventually(t, 30*time.Second, "three nodes ready", func() error {
		out := c.Herdctl("node", "list")
		if n := strings.Count(out, " ready "); n != 3 {
			return fmt.Errorf("%d ready:\n%s", n, out)
		}
		return nil
	})
	return c
}

func allInState(c *rig.Cluster, names []string, state string) error {
	vms := c.VMs()
	for _, n := range names {
		if vm, ok := vms[n]; !ok || vm.State != state {
			return fmt.Errorf("vm %s is %+v", n, vms[n])
		}
	}
	return nil
}

// TestSkeleton is the walking skeleton end to end: 30 VMs through herdctl and 5 through etcdctl on
// raw JSON all run, spread over the nodes within capacity, as the agents' own libvirt reports show;
// deleting them removes every domain. It runs twice: plain, and with TLS and RBAC on as in
// production (agents join with one-time tokens; herdctl and etcdctl act as an operator).
func TestSkeleton(t *testing.T) {
	t.Run("plain", func(t *testing.T) { skeleton(t, startSkeleton(t)) })
	t.Run("tls-rbac", func(t *testing.T) {
		c := startSkeletonOn(t, rig.NewSecureCluster(t, bin))
		skeleton(t, c)
		// Every agent acted as its own node user, and the events say so.
		out := c.Herdctl("events", "-o", "json")
		for _, id := range nodeIDs {
			if !strings.Contains(out, "herd-node:"+id) {
				t.Fatalf("no event by etcd user herd-node:%s:\n%s", id, out)
			}
		}
	})
}

func skeleton(t *testing.T, c *rig.Cluster) {
	var names []string
	var wg sync.WaitGroup
	errs := make(chan error, 30)
	for i := range 30 {
		name := fmt.Sprintf("web%02d", i)
		names = append(names, name)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if out, errOut, code := c.Run(bin.Herdctl, "vm", "create", name, "--vcpus", "1", "--memory", "1GiB", "--disk", "10GiB"); code != 0 {
				errs <- fmt.Errorf("create %s: %s%s", name, out, errOut)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for i := range 5 {
		name := fmt.Sprintf("raw%d", i)
		names = append(names, name)
		c.Etcdctl("put", "/herd/vms/"+name+"/spec", `{"vcpus":1,"memory_mib":512,"disk":{"pool":"default","size_gib":5}}`)
	}
	rig.Eventually(t, 60*time.Second, "35 VMs running", func() error { return allInState(c, names, "running") })

	// Spread within capacity: every node used, none over 16 vCPUs (8 CPUs, overcommit 2) or 16 GiB.
	vms := c.VMs()
	perNode := map[string][]string{}
	for _, n := range names {
		perNode[vms[n].Placement.Node] = append(perNode[vms[n].Placement.Node], n)
	}
	if len(perNode) != 3 {
		t.Fatalf("VMs on %d nodes, want all 3: %v", len(perNode), perNode)
	}
	counts := map[string]int{}
	for node, list := range perNode {
		counts[node] = len(list)
		var mem int64
		for _, n := range list {
			mem += 1024
			if strings.HasPrefix(n, "raw") {
				mem -= 512
			}
		}
		if len(list) > 16 || mem > 16384 {
			t.Fatalf("node %s over capacity: %d vCPUs, %d MiB", node, len(list), mem)
		}
		// Spread: 35 VMs over 3 equal nodes leave no node far behind.
		if len(list) < 9 {
			t.Fatalf("node %s got only %d of 35 VMs: not spread: %v", node, len(list), counts)
		}
	}
	t.Logf("placement: %v", counts)

	// The agents' own reports of libvirt agree with the placements.
	for id, a := range c.Agents {
		doms, err := a.Domains()
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]bool{}
		for _, d := range doms {
			if d.State != "running" || !d.Managed {
				t.Fatalf("agent %s domain %+v", id, d)
			}
			got[d.Name] = true
		}
		for _, n := range perNode[id] {
			if !got[n] {
				t.Fatalf("agent %s does not run %s; it runs %v", id, n, got)
			}
		}
		if len(got) != len(perNode[id]) {
			t.Fatalf("agent %s runs %d domains, %d placed", id, len(got), len(perNode[id]))
		}
	}

	c.Herdctl(append([]string{"vm", "delete"}, names...)...)
	rig.Eventually(t, 60*time.Second, "every domain gone", func() error {
		for id, a := range c.Agents {
			doms, err := a.Domains()
			if err != nil {
				return err
			}
			if len(doms) != 0 {
				return fmt.Errorf("agent %s still runs %d domains", id, len(doms))
			}
		}
		if out := c.Etcdctl("get", "--prefix", "--keys-only", "/herd/assign/"); strings.TrimSpace(out) != "" {
			return fmt.Errorf("assignments left: %s", out)
		}
		return nil
	})
}

// TestCapacityAndPending: a VM that fits nowhere is pending with the reason, and runs once room
// appears.
func TestCapacityAndPending(t *testing.T) {
	c := startSkeleton(t)
	c.Herdctl("vm", "create", "big", "--memory", "64GiB")
	rig.Eventually(t, 30*time.Second, "big pending with a reason", func() error {
		vm := c.VMs()["big"]
		if vm.State != "pending" || vm.Problem == nil || !strings.Contains(vm.Problem.Message, "insufficient memory") {
			return fmt.Errorf("%+v", vm)
		}
		return nil
	})
	out := c.Herdctl("vm", "get", "big")
	if !strings.Contains(out, "3 nodes: insufficient memory (needs 64GiB, largest free 16GiB)") {
		t.Fatalf("vm get does not explain: %s", out)
	}
	c.Herdctl("vm", "apply", "-f", writeFile(t, "name: big\nvcpus: 1\nmemory_mib: 8192\n"))
	rig.Eventually(t, 30*time.Second, "big running after shrinking", func() error { return allInState(c, []string{"big"}, "running") })
	if vm := c.VMs()["big"]; vm.Problem != nil {
		t.Fatalf("problem not cleared: %+v", vm.Problem)
	}
}

func writeFile(t *testing.T, content string) string {
	f, err := os.CreateTemp(t.TempDir(), "spec-*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(content); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return f.Name()
}

// TestBadSpecs: values written raw with etcdctl that are malformed or invalid never hurt a daemon
// or another VM; each gets a problem record naming what is wrong.
func TestBadSpecs(t *testing.T) {
	c := startSkeleton(t)
	bad := map[string]string{
		"garbled": `{"vcpus":1,`,
		"nomem":   `{"vcpus":1,"memory_mib":0}`,
		"nopool":  `{"vcpus":1,"memory_mib":64,"disk":{"pool":"gold","size_gib":1}}`,
		"a/b":     `{"vcpus":1,"memory_mib":64}`,
		"typed":   `{"vcpus":"one","memory_mib":64}`,
		"future":  `{"v":7,"vcpus":1,"memory_mib":64}`,
	}
	for name, val := range bad {
		c.Etcdctl("put", "/herd/vms/"+name+"/spec", val)
	}
	c.Etcdctl("put", "/herd/vms/good/spec", `{"vcpus":1,"memory_mib":64}`)
	want := map[string]string{
		"garbled": "invalid JSON",
		"nomem":   "memory_mib: must be between 1",
		"nopool":  `disk.pool: unknown pool "gold"`,
		"a/b":     "vm name",
		"typed":   "vcpus: must be an integer",
		"future":  "newer herd",
	}
	rig.Eventually(t, 30*time.Second, "problems recorded and good VM running", func() error {
		vms := c.VMs()
		if vms["good"].State != "running" {
			return fmt.Errorf("good is %+v", vms["good"])
		}
		for name, w := range want {
			vm := vms[name]
			if vm.State != "invalid" || vm.Problem == nil || !strings.Contains(vm.Problem.Message, w) {
				return fmt.Errorf("vm %s: %+v (want problem %q)", name, vm, w)
			}
		}
		return nil
	})
	for _, p := range []*rig.Proc{c.Coords[0].Proc, c.Coords[1].Proc, c.Agents[nodeIDs[0]].Proc} {
		if !p.Running() {
			t.Fatalf("%s died on bad input", p.Name)
		}
	}
	// herdctl refuses the same mistakes before writing, naming the field.
	_, errOut, code := c.Run(bin.Herdctl, "vm", "create", "x", "--memory", "0")
	if code != 2 || !strings.Contains(errOut, "memory_mib") {
		t.Fatalf("herdctl accepted memory 0: exit %d %s", code, errOut)
	}
	_, errOut, code = c.Run(bin.Herdctl, "vm", "create", "y", "--disk", "1GiB", "--pool", "gold")
	if code != 2 || !strings.Contains(errOut, "disk.pool") {
		t.Fatalf("herdctl accepted an unknown pool: exit %d %s", code, errOut)
	}
	if out := c.Etcdctl("get", "--prefix", "--keys-only", "/herd/vms/x/"); strings.TrimSpace(out) != "" {
		t.Fatalf("a refused spec was written: %s", out)
	}
	// Fixing a bad spec by hand makes it run.
	c.Etcdctl("put", "/herd/vms/nomem/spec", `{"vcpus":1,"memory_mib":64}`)
	rig.Eventually(t, 30*time.Second, "fixed VM running", func() error { return allInState(c, []string{"nomem"}, "running") })
}

// TestUnknownFieldsSurvive: members this herd does not know, written by a newer herd or by hand,
// survive rewrites by herdctl and by the daemons.
func TestUnknownFieldsSurvive(t *testing.T) {
	c := startSkeleton(t)
	c.Etcdctl("put", "/herd/vms/keep/spec", `{"v":1,"vcpus":1,"memory_mib":64,"gpu":{"model":"a100","count":1},"disk":{"pool":"default","size_gib":1,"iops":500}}`)
	rig.Eventually(t, 30*time.Second, "keep running", func() error { return allInState(c, []string{"keep"}, "running") })
	c.Herdctl("vm", "apply", "-f", writeFile(t, "name: keep\nvcpus: 2\nmemory_mib: 128\ndisk: {pool: default, size_gib: 2, iops: 500}\n"))
	var spec map[string]any
	if err := json.Unmarshal([]byte(lastLine(c.Etcdctl("get", "--print-value-only", "/herd/vms/keep/spec"))), &spec); err != nil {
		t.Fatal(err)
	}
	if spec["vcpus"].(float64) != 2 || spec["gpu"] == nil || spec["disk"].(map[string]any)["iops"].(float64) != 500 {
		t.Fatalf("spec after apply: %v", spec)
	}
	// The leader copies the spec into the node's assignment: the unknown member goes along.
	rig.Eventually(t, 30*time.Second, "assignment carries the unknown member", func() error {
		out := c.Etcdctl("get", "--prefix", "--print-value-only", "/herd/assign/")
		if !strings.Contains(out, `"gpu":{"model":"a100","count":1}`) || !strings.Contains(out, `"vcpus":2`) {
			return fmt.Errorf("assignment: %s", out)
		}
		return nil
	})
	// A hardware record: herdctl hw add updates labels and keeps what it does not know.
	c.Etcdctl("put", "/herd/hardware/52:54:00:00:00:01", `{"v":1,"mac":"52:54:00:00:00:01","bmc":{"ip":"10.9.0.1"}}`)
	c.Herdctl("hw", "add", "52:54:00:00:00:01", "--label", "rack=r7")
	hw := lastLine(c.Etcdctl("get", "--print-value-only", "/herd/hardware/52:54:00:00:00:01"))
	if !strings.Contains(hw, `"bmc":{"ip":"10.9.0.1"}`) || !strings.Contains(hw, `"rack":"r7"`) {
		t.Fatalf("hardware after hw add: %s", hw)
	}
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// TestSteadyStateReads: in a steady system the daemons do not read etcd per VM. The etcd Range
// requests over a quiet window stay the same whether 5 or 30 VMs run.
func TestSteadyStateReads(t *testing.T) {
	c := startSkeleton(t)
	rangeCount := func() float64 {
		v, err := rig.Metric(c.MetricsURL, "grpc_server_handled_total", `grpc_method="Range"`)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	mvccRanges := func() float64 {
		v, err := rig.Metric(c.MetricsURL, "etcd_mvcc_range_total")
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	// window measures reads while nothing changes, over several agent resync periods (2 s).
	window := func() (float64, float64) {
		r0, m0 := rangeCount(), mvccRanges()
		time.Sleep(7 * time.Second)
		return rangeCount() - r0, mvccRanges() - m0
	}
	create := func(from, to int) []string {
		var names []string
		for i := from; i < to; i++ {
			name := fmt.Sprintf("s%02d", i)
			names = append(names, name)
			c.Etcdctl("put", "/herd/vms/"+name+"/spec", `{"vcpus":1,"memory_mib":64}`)
		}
		return names
	}
	names := create(0, 5)
	rig.Eventually(t, 30*time.Second, "5 running", func() error { return allInState(c, names, "running") })
	time.Sleep(2 * time.Second)
	r5, m5 := window()
	names = append(names, create(5, 30)...)
	rig.Eventually(t, 60*time.Second, "30 running", func() error { return allInState(c, names, "running") })
	time.Sleep(2 * time.Second)
	r30, m30 := window()
	t.Logf("steady-state reads over 7 s: 5 VMs: %v Range RPCs, %v mvcc ranges; 30 VMs: %v Range RPCs, %v mvcc ranges", r5, m5, r30, m30)
	// Six times the VMs must not mean more reads; allow a couple of stray requests.
	if r30 > r5+2 || m30 > m5+2 {
		t.Fatalf("reads grew with the number of VMs: Range %v -> %v, mvcc %v -> %v", r5, r30, m5, m30)
	}
}
