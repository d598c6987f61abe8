package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/e2e/rig"
	"github.com/herdhq/herd/lib/keys"
)

// lossRig starts etcd, two coordinators with an exec fencer (a script that records its calls and
// fails while fence.fail exists, blocks while fence.block exists) and n agents. binpack puts the
// first VMs on the first node.
type lossRig struct {
	*rig.Cluster
	fenceLog string
}

const (
	lossTTL   = 3 * time.Second
	lossGrace = 2 * time.Second
)

func newLossRig(t *testing.T, agents int, extraCoord ...string) *lossRig {
	return newLossRigTB(t, agents, extraCoord...)
}

func newLossRigTB(t testing.TB, agents int, extraCoord ...string) *lossRig {
	c := rig.NewCluster(t, bin)
	r := &lossRig{Cluster: c, fenceLog: filepath.Join(c.Dir, "fence.log")}
	script := fmt.Sprintf(`echo "$HERD_HWID $HERD_BOOT_ID" >> %[1]s/fence.log
i=0; while [ -e %[1]s/fence.block ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
if [ -e %[1]s/fence.fail ]; then echo "BMC unreachable"; exit 1; fi
echo "powered off $HERD_HWID"`, c.Dir)
	c.AgentArgs = []string{"--lease-ttl", lossTTL.String(), "--resync", "2s"}
	c.CoordArgs = append([]string{"--session-ttl", "2s", "--grace", lossGrace.String(), "--strategy", "binpack", "--fence-exec", script}, extraCoord...)
	c.StartCoordinator()
	c.StartCoordinator()
	for i := 1; i <= agents; i++ {
		c.StartAgent(fmt.Sprintf("52:54:00:00:01:%02x", i), 16, 32768)
	}
	rig.Eventually(t, 30*time.Second, "nodes ready", func() error {
		if n := strings.Count(c.Herdctl("node", "list"), " ready "); n != agents {
			return fmt.Errorf("%d ready", n)
		}
		return nil
	})
	c.Leader(30 * time.Second)
	return r
}

func (r *lossRig) node(i int) string { return fmt.Sprintf("52:54:00:00:01:%02x", i) }

func (r *lossRig) fenceCalls() string {
	b, _ := os.ReadFile(r.fenceLog)
	return string(b)
}

func (r *lossRig) createOn(t *testing.T, prefix string, n int) []string {
	return r.createOnTB(t, prefix, n)
}

func (r *lossRig) createOnTB(t testing.TB, prefix string, n int) []string {
	var names []string
	for i := range n {
		name := fmt.Sprintf("%s%02d", prefix, i)
		names = append(names, name)
		r.Herdctl("vm", "create", name, "--memory", "256MiB")
	}
	rig.Eventually(t, 30*time.Second, "VMs running", func() error { return allInState(r.Cluster, names, "running") })
	return names
}

func placementsOn(c *rig.Cluster, names []string) map[string]string {
	vms := c.VMs()
	out := map[string]string{}
	for _, n := range names {
		if vm := vms[n]; vm.Placement != nil {
			out[n] = vm.Placement.Node
		}
	}
	return out
}

func allRunningOff(c *rig.Cluster, names []string, gone string) error {
	vms := c.VMs()
	for _, n := range names {
		vm := vms[n]
		if vm.State != "running" || vm.Placement == nil || vm.Placement.Node == gone || vm.Placement.Epoch != 2 {
			return fmt.Errorf("vm %s: %+v", n, vm)
		}
	}
	return nil
}

type fenceRec struct {
	HWID     string `json:"hwid"`
	BootID   string `json:"boot_id"`
	Phase    string `json:"phase"`
	By       string `json:"by"`
	Attempts int    `json:"attempts"`
	Error    string `json:"error"`
}

func (r *lossRig) fences(t *testing.T) []fenceRec {
	out, _, code := r.Run(bin.Herdctl, "fence", "list", "-o", "json")
	if code != 0 {
		return nil
	}
	var list []fenceRec
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatalf("fence list: %v: %s", err, out)
	}
	return list
}

// TestAgentKilledVMsMove: kill -9 an agent hosting 10 VMs; after lease + grace its boot is fenced
// (the exec fencer runs once) and the VMs run on the other nodes with epoch 2.
func TestAgentKilledVMsMove(t *testing.T) {
	r := newLossRig(t, 3)
	names := r.createOn(t, "lost", 10)
	victim := r.node(1)
	for n, node := range placementsOn(r.Cluster, names) {
		if node != victim {
			t.Fatalf("binpack put %s on %s, not %s", n, node, victim)
		}
	}
	killed := time.Now()
	r.Agents[victim].Kill()
	rig.Eventually(t, 60*time.Second, "VMs running elsewhere", func() error { return allRunningOff(r.Cluster, names, victim) })
	t.Logf("kill -9 to 10 VMs running elsewhere: %s (lease TTL %s + grace %s)", time.Since(killed).Round(100*time.Millisecond), lossTTL, lossGrace)
	if calls := strings.Count(r.fenceCalls(), victim); calls != 1 {
		t.Fatalf("fencer ran %d times for %s:\n%s", calls, victim, r.fenceCalls())
	}
	out := r.Herdctl("node", "list")
	if !strings.Contains(out, "lost,fenced") {
		t.Fatalf("node list does not show the fenced node:\n%s", out)
	}
	if ev := r.Herdctl("events", "--object", "node/"+victim); !strings.Contains(ev, "fenced") || !strings.Contains(ev, "lost") {
		t.Fatalf("events:\n%s", ev)
	}
	assertNeverPlacedTwice(t, r.Cluster)
}

// TestStoppedAgentReturnsFenced: SIGSTOP an agent past TTL + grace; its VMs move; SIGCONT: it stops
// its stale domains without starting anything and its node takes no VM until `fence clear`.
// History shows no VM reported running by two nodes for the same epoch.
func TestStoppedAgentReturnsFenced(t *testing.T) {
	r := newLossRig(t, 3)
	names := r.createOn(t, "stop", 4)
	victim := r.node(1)
	a := r.Agents[victim]
	if err := a.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := true
	defer func() {
		if stopped {
			_ = a.Signal(syscall.SIGCONT)
		}
	}()
	rig.Eventually(t, 60*time.Second, "VMs moved", func() error { return allRunningOff(r.Cluster, names, victim) })
	if err := a.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	stopped = false
	rig.Eventually(t, 30*time.Second, "old agent stopped its stale domains", func() error {
		doms, err := a.Domains()
		if err != nil {
			return err
		}
		for _, d := range doms {
			if d.State == "running" {
				return fmt.Errorf("still running: %+v", d)
			}
		}
		return nil
	})
	rig.Eventually(t, 30*time.Second, "node back but fenced", func() error {
		out := r.Herdctl("node", "list")
		for _, line := range strings.Split(out, "\n") {
			if strings.HasPrefix(line, victim) && strings.Contains(line, "ready,fenced") {
				return nil
			}
		}
		return fmt.Errorf("%s", out)
	})
	r.Herdctl("hw", "add", victim, "--label", "only=here")
	r.Herdctl("vm", "create", "pinned", "--selector", "only=here", "--memory", "128MiB")
	rig.Eventually(t, 30*time.Second, "fenced node refuses new VMs", func() error {
		vm := r.VMs()["pinned"]
		if vm.State != "pending" || vm.Problem == nil || !strings.Contains(vm.Problem.Message, "fenced") {
			return fmt.Errorf("%+v", vm)
		}
		return nil
	})
	r.Herdctl("fence", "clear", victim)
	rig.Eventually(t, 30*time.Second, "schedulable after fence clear", func() error {
		if vm := r.VMs()["pinned"]; vm.State != "running" {
			return fmt.Errorf("%+v", vm)
		}
		return nil
	})

	// Replay every status write: for a given VM and epoch, never two nodes reporting running.
	running := map[string]map[string]bool{} // vm/epoch -> nodes whose status says running
	for _, ev := range r.History(space.StatusRoot()) {
		hwid, name, ok := keys.ParseNodeScoped(space.StatusRoot(), string(ev.Kv.Key))
		if !ok {
			continue
		}
		if ev.Type == clientv3.EventTypeDelete {
			for k := range running {
				if strings.HasPrefix(k, name+"/") {
					delete(running[k], hwid)
				}
			}
			continue
		}
		st, err := keys.Decode[keys.VMStatus](ev.Kv.Value)
		if err != nil {
			t.Fatal(err)
		}
		k := fmt.Sprintf("%s/%d", name, st.Epoch)
		for kk := range running {
			if strings.HasPrefix(kk, name+"/") {
				delete(running[kk], hwid)
			}
		}
		if st.State == keys.StateRunning {
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

// TestDeletedNodeKeyIsNoDeath: deleting a live node's key by hand fences nothing; the agent puts it
// back.
func TestDeletedNodeKeyIsNoDeath(t *testing.T) {
	r := newLossRig(t, 2)
	r.createOn(t, "keep", 2)
	victim := r.node(1)
	r.Etcdctl("del", "/herd/nodes/"+victim)
	rig.Eventually(t, 20*time.Second, "agent re-registers", func() error {
		if out := r.Etcdctl("get", "--keys-only", "/herd/nodes/"+victim); !strings.Contains(out, victim) {
			return fmt.Errorf("node key absent")
		}
		return nil
	})
	time.Sleep(lossTTL + lossGrace + 2*time.Second)
	if f := r.fences(t); len(f) != 0 || r.fenceCalls() != "" {
		t.Fatalf("a deleted key was taken for a death: %+v %s", f, r.fenceCalls())
	}
	if out := r.Herdctl("vm", "list"); strings.Count(out, "running") != 2 {
		t.Fatalf("VMs disturbed:\n%s", out)
	}
}

// TestFailingFencer: while the fencer fails, the VMs stay placed with a problem and an event;
// once it works, recovery completes.
func TestFailingFencer(t *testing.T) {
	r := newLossRig(t, 2)
	names := r.createOn(t, "ff", 3)
	victim := r.node(1)
	if err := os.WriteFile(filepath.Join(r.Dir, "fence.fail"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	r.Agents[victim].Kill()
	rig.Eventually(t, 60*time.Second, "fence failed, VMs stay with a problem", func() error {
		f := r.fences(t)
		if len(f) != 1 || f[0].Phase != "failed" || !strings.Contains(f[0].Error, "BMC unreachable") {
			return fmt.Errorf("fences %+v", f)
		}
		vms := r.VMs()
		for _, n := range names {
			vm := vms[n]
			if vm.Placement == nil || vm.Placement.Node != victim || vm.Problem == nil || !strings.Contains(vm.Problem.Message, "fencing failed") {
				return fmt.Errorf("vm %s: %+v %+v", n, vm, vm.Problem)
			}
		}
		return nil
	})
	if ev := r.Herdctl("events", "--object", "node/"+victim); !strings.Contains(ev, "fence-failed") {
		t.Fatalf("no fence-failed event:\n%s", ev)
	}
	if err := os.Remove(filepath.Join(r.Dir, "fence.fail")); err != nil {
		t.Fatal(err)
	}
	rig.Eventually(t, 90*time.Second, "recovery after the fencer works", func() error { return allRunningOff(r.Cluster, names, victim) })
	if vm := r.VMs()[names[0]]; vm.Problem != nil {
		t.Fatalf("problem left after recovery: %+v", vm.Problem)
	}
}

// TestMassFailureGuard: 3 of 4 nodes die at once; failover holds until confirmed, then recovers.
func TestMassFailureGuard(t *testing.T) {
	r := newLossRig(t, 4, "--strategy", "spread")
	names := r.createOn(t, "mass", 8)
	survivor := r.node(4)
	for i := 1; i <= 3; i++ {
		r.Agents[r.node(i)].Kill()
	}
	rig.Eventually(t, 60*time.Second, "failover held", func() error {
		if out := r.Herdctl("cluster", "show"); !strings.Contains(out, "HELD") {
			return fmt.Errorf("%s", out)
		}
		return nil
	})
	time.Sleep(lossGrace + time.Second)
	if f := r.fences(t); len(f) != 0 {
		t.Fatalf("fenced while held: %+v", f)
	}
	moved := 0
	for _, node := range placementsOn(r.Cluster, names) {
		if node == survivor {
			moved++
		}
	}
	if ev := r.Herdctl("events", "--object", "cluster"); !strings.Contains(ev, "failover-held") {
		t.Fatalf("no event:\n%s", ev)
	}
	r.Herdctl("cluster", "confirm-loss")
	rig.Eventually(t, 90*time.Second, "all VMs on the survivor", func() error {
		vms := r.VMs()
		for _, n := range names {
			if vm := vms[n]; vm.State != "running" || vm.Placement.Node != survivor {
				return fmt.Errorf("vm %s: %+v", n, vm)
			}
		}
		return nil
	})
	rig.Eventually(t, 30*time.Second, "guard released", func() error {
		if out := r.Herdctl("cluster", "show"); !strings.Contains(out, "automatic") {
			return fmt.Errorf("%s", out)
		}
		return nil
	})
	t.Logf("%d of %d VMs were on the survivor before confirmation", moved, len(names))
}

// TestEtcdWipedKeepsDomains: etcd is replaced by an empty one under running agents: no domain is
// destroyed; the agents report them as orphans.
func TestEtcdWipedKeepsDomains(t *testing.T) {
	r := newLossRig(t, 2)
	names := r.createOn(t, "wipe", 4)
	r.WipeEtcd()
	rig.Eventually(t, 60*time.Second, "orphans reported", func() error {
		out, _, _ := r.Run(bin.Herdctl, "vm", "orphans")
		for _, n := range names {
			if !strings.Contains(out, n) {
				return fmt.Errorf("%s not listed:\n%s", n, out)
			}
		}
		return nil
	})
	time.Sleep(3 * time.Second) // several resyncs
	running := 0
	for _, a := range r.Agents {
		doms, err := a.Domains()
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range doms {
			if d.State == "running" {
				running++
			}
		}
	}
	if running != len(names) {
		t.Fatalf("%d domains running after the wipe, want %d", running, len(names))
	}
}

// TestLeaderKilledMidFence: the leader commits the fence record and dies while its fencer runs; the
// next leader runs the fencer again and finishes the move.
func TestLeaderKilledMidFence(t *testing.T) {
	r := newLossRig(t, 2)
	names := r.createOn(t, "mid", 3)
	victim := r.node(1)
	block := filepath.Join(r.Dir, "fence.block")
	if err := os.WriteFile(block, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(block)
	leader := r.Leader(10 * time.Second)
	r.Agents[victim].Kill()
	rig.Eventually(t, 60*time.Second, "fence committed, fencer running", func() error {
		if f := r.fences(t); len(f) != 1 || f[0].Phase != "fencing" || !strings.Contains(r.fenceCalls(), victim) {
			return fmt.Errorf("fences %+v calls %q", f, r.fenceCalls())
		}
		return nil
	})
	leader.Kill()
	if err := os.Remove(block); err != nil {
		t.Fatal(err)
	}
	rig.Eventually(t, 60*time.Second, "the next leader finishes", func() error { return allRunningOff(r.Cluster, names, victim) })
	f := r.fences(t)
	if len(f) != 1 || f[0].Phase != "fenced" || f[0].By == leader.Name {
		t.Fatalf("fence record %+v (dead leader %s)", f, leader.Name)
	}
	if calls := strings.Count(r.fenceCalls(), victim); calls < 2 {
		t.Fatalf("the new leader did not fence again: %d calls", calls)
	}
}
