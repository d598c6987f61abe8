package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/herdhq/herd/e2e/rig"
	"github.com/herdhq/herd/lib/keys"
)

// rolloutView is the part of `herdctl rollout status -o json` the tests read.
type rolloutView struct {
	ID     string `json:"id"`
	State  string `json:"state"`
	Reason string `json:"reason"`
	Per    map[string]struct {
		Phase string `json:"phase"`
		Error string `json:"error"`
	} `json:"per_node"`
}

func rolloutStatus(c *rig.Cluster) rolloutView {
	var v rolloutView
	out, _, code := c.Run(bin.Herdctl, "rollout", "status", "-o", "json")
	if code == 0 {
		_ = json.Unmarshal([]byte(out), &v)
	}
	return v
}

// addImages puts versions into the catalogue (the files only need to exist: no machine boots them
// in this rig; the agents report the version the firmware restarts them with).
func addImages(t *testing.T, herdctl func(...string) string, versions ...string) {
	dir := t.TempDir()
	for _, v := range versions {
		k, i := filepath.Join(dir, v+"-vmlinuz"), filepath.Join(dir, v+"-initrd")
		_ = os.WriteFile(k, []byte("kernel "+v), 0o644)
		_ = os.WriteFile(i, []byte("initrd "+v), 0o644)
		herdctl("image", "add", v, "--kernel", k, "--initrd", i)
	}
}

// TestRolloutWaitsPausesAbortsCompletes, on test-driver nodes (VMs leave by stop and start): a
// rollout that would overfill the others waits and says why; with room it starts; a node that never
// comes back pauses it; abort leaves every node schedulable (the lost node keeps its new pin, the
// others theirs); back, a second rollout skips the node already on the image, survives kill -9 of
// the leader, and ends with every node on the image, uncordoned. Replaying etcd's history shows
// never more than one node unavailable.
func TestRolloutWaitsPausesAbortsCompletes(t *testing.T) {
	c := rig.NewCluster(t, bin)
	c.AgentArgs = []string{"--lease-ttl", "3s", "--resync", "2s"}
	c.CoordArgs = []string{"--session-ttl", "2s", "--strategy", "spread"}
	c.StartCoordinator()
	c.StartCoordinator()
	addImages(t, c.Herdctl, "v1", "v2")
	c.Herdctl("image", "set-current", "v1")

	var mu sync.Mutex
	var fw *rig.Firmware
	start := func(hwid, image string) {
		c.StartAgent(hwid, 4, 2048, "--image", image, "--reboot-command", fw.Command(hwid))
	}
	herdctl := func(args ...string) string {
		out, errOut, code := c.Run(bin.Herdctl, args...)
		if code != 0 {
			t.Errorf("herdctl %v: %s%s", args, out, errOut)
		}
		return out
	}
	fw = rig.StartFirmware(t, func(hwid string) {
		mu.Lock()
		defer mu.Unlock()
		lost := strings.HasPrefix(hwid, "!")
		hwid = strings.TrimPrefix(hwid, "!")
		c.Agents[hwid].Stop(10 * time.Second)
		if !lost {
			start(hwid, rig.PinnedImage(t, herdctl, hwid))
		}
	})
	mu.Lock()
	for _, id := range nodeIDs {
		start(id, "v1")
	}
	mu.Unlock()
	rig.Eventually(t, 30*time.Second, "three nodes ready", func() error {
		if n := strings.Count(c.Herdctl("node", "list"), " ready "); n != 3 {
			return fmt.Errorf("%d ready", n)
		}
		return nil
	})
	var vms []string
	for i := range 5 {
		name := fmt.Sprintf("ro%d", i)
		vms = append(vms, name)
		c.Herdctl("vm", "create", name, "--vcpus", "1", "--memory", "1000MiB", "--migration-policy", "restart")
	}
	rig.Eventually(t, 30*time.Second, "5 VMs running", func() error { return allInState(c, vms, "running") })

	// 5000 MiB of VMs do not fit on two 2048 MiB nodes: the rollout waits, cordoning nothing.
	c.Herdctl("rollout", "start", "--image", "v2", "--max-unavailable", "1", "--node-timeout", "20s")
	rig.Eventually(t, 30*time.Second, "rollout waiting for capacity", func() error {
		if v := rolloutStatus(c); !strings.Contains(v.Reason, "waiting for capacity") {
			return fmt.Errorf("%+v", v)
		}
		return nil
	})
	if out := c.Herdctl("node", "list"); strings.Contains(out, "cordoned") {
		t.Fatalf("a node was cordoned without room for its VMs:\n%s", out)
	}
	t.Logf("waiting: %s", rolloutStatus(c).Reason)

	// Room appears; the first node's reboot is its last.
	fw.Lose(nodeIDs[0], true)
	c.Herdctl("vm", "delete", vms[4])
	vms = vms[:4]
	rig.Eventually(t, 90*time.Second, "rollout paused: the node did not come back", func() error {
		v := rolloutStatus(c)
		if v.State != keys.RolloutPaused || !strings.Contains(v.Per[nodeIDs[0]].Error, "did not come back") {
			return fmt.Errorf("%+v", v)
		}
		return nil
	})
	v := rolloutStatus(c)
	for _, id := range nodeIDs[1:] {
		if v.Per[id].Phase != keys.PhasePending {
			t.Fatalf("node %s started while node %s was out: %+v", id, nodeIDs[0], v)
		}
	}
	rig.Eventually(t, 30*time.Second, "VMs running elsewhere", func() error { return allInState(c, vms, "running") })
	ev := c.Herdctl("events", "--object", "rollout/"+v.ID)
	if !strings.Contains(ev, "paused") {
		t.Fatalf("no paused event:\n%s", ev)
	}

	// Abort: every node schedulable; the lost node keeps its pin to v2 (its reboot happened).
	c.Herdctl("rollout", "abort")
	rig.Eventually(t, 30*time.Second, "rollout aborted", func() error {
		if v := rolloutStatus(c); v.State != keys.RolloutAborted {
			return fmt.Errorf("%+v", v)
		}
		return nil
	})
	for i, id := range nodeIDs {
		want := ""
		if i == 0 {
			want = "v2"
		}
		if got := pin(t, c, id); got != want {
			t.Fatalf("after abort node %s is pinned to %q, want %q", id, got, want)
		}
		if out := c.Herdctl("node", "get", id, "-o", "json"); strings.Contains(out, `"cordoned": true`) {
			t.Fatalf("after abort node %s is cordoned:\n%s", id, out)
		}
	}

	// The lost node is repaired and boots what it is pinned to.
	fw.Lose(nodeIDs[0], false)
	mu.Lock()
	start(nodeIDs[0], rig.PinnedImage(t, herdctl, nodeIDs[0]))
	mu.Unlock()
	rig.Eventually(t, 30*time.Second, "three nodes ready", func() error {
		if n := strings.Count(c.Herdctl("node", "list"), " ready "); n != 3 {
			return fmt.Errorf("%d ready", n)
		}
		return nil
	})

	// Again: node 1 is skipped, the leader is killed mid-way, the rollout completes.
	c.Herdctl("rollout", "start", "--image", "v2", "--max-unavailable", "1", "--node-timeout", "2m")
	rig.Eventually(t, 60*time.Second, "second node under way", func() error {
		if p := rolloutStatus(c).Per[nodeIDs[1]].Phase; p != keys.PhaseDraining && p != keys.PhaseRebooting {
			return fmt.Errorf("node 2 %s", p)
		}
		return nil
	})
	leader := c.Leader(10 * time.Second)
	leader.Kill()
	c.StartCoordinator()
	rig.Eventually(t, 180*time.Second, "rollout done", func() error {
		if v := rolloutStatus(c); v.State != keys.RolloutDone {
			return fmt.Errorf("%+v", v)
		}
		return nil
	})
	v = rolloutStatus(c)
	if v.Per[nodeIDs[0]].Phase != keys.PhaseSkipped || v.Per[nodeIDs[1]].Phase != keys.PhaseDone || v.Per[nodeIDs[2]].Phase != keys.PhaseDone {
		t.Fatalf("phases: %+v", v.Per)
	}
	nl := c.Herdctl("node", "list")
	if strings.Count(nl, " v2 ") != 3 || strings.Contains(nl, "cordoned") {
		t.Fatalf("not every node on v2 and schedulable:\n%s", nl)
	}
	rig.Eventually(t, 30*time.Second, "VMs running", func() error { return allInState(c, vms, "running") })
	t.Logf("%s", c.Herdctl("rollout", "status"))

	evs := c.History(space.NodePrefix())
	evs = append(evs, c.History(space.NodeStatePrefix())...)
	worst, when := rig.MostUnavailable(evs, space, nodeIDs)
	if worst > 1 {
		t.Fatalf("%d nodes unavailable at once (max 1) at %s", worst, when)
	}
	t.Logf("history: at most %d node unavailable at once (%s)", worst, when)
}

func pin(t *testing.T, c *rig.Cluster, hwid string) string {
	var v struct {
		State *keys.NodeState `json:"state"`
	}
	if err := json.Unmarshal([]byte(c.Herdctl("node", "get", hwid, "-o", "json")), &v); err != nil {
		t.Fatal(err)
	}
	if v.State == nil {
		return ""
	}
	return v.State.Image
}

// TestRolloutFollowsTheFleet: a rollout of every enrolled node says it waits for a node that is
// enrolled but down (it uses up the budget) instead of stalling silently; that node's hardware
// record is deleted and it leaves the rollout; a node enrolled mid-way joins it and is upgraded too.
func TestRolloutFollowsTheFleet(t *testing.T) {
	c := rig.NewCluster(t, bin)
	c.AgentArgs = []string{"--lease-ttl", "3s", "--resync", "2s"}
	c.CoordArgs = []string{"--session-ttl", "2s"}
	c.StartCoordinator()
	addImages(t, c.Herdctl, "v1", "v2")
	c.Herdctl("image", "set-current", "v1")
	herdctl := func(args ...string) string {
		out, errOut, code := c.Run(bin.Herdctl, args...)
		if code != 0 {
			t.Errorf("herdctl %v: %s%s", args, out, errOut)
		}
		return out
	}
	var mu sync.Mutex
	var fw *rig.Firmware
	start := func(hwid, image string) {
		mu.Lock()
		defer mu.Unlock()
		c.StartAgent(hwid, 4, 2048, "--image", image, "--reboot-command", fw.Command(hwid))
	}
	fw = rig.StartFirmware(t, func(hwid string) {
		c.Agents[hwid].Stop(10 * time.Second)
		start(hwid, rig.PinnedImage(t, herdctl, hwid))
	})
	a, b, down, late := nodeIDs[0], nodeIDs[1], nodeIDs[2], "52:54:00:00:00:04"
	start(a, "v1")
	start(b, "v1")
	c.Herdctl("hw", "add", down)
	rig.Eventually(t, 30*time.Second, "two nodes ready", func() error {
		if n := strings.Count(c.Herdctl("node", "list"), " ready "); n != 2 {
			return fmt.Errorf("%d ready", n)
		}
		return nil
	})

	// A VM that can move only live, on nodes that take no live migrations (no --migration-uri):
	// its node's drain waits, and the rollout, the node list and --watch say why.
	c.Herdctl("vm", "create", "live1", "--memory", "256MiB")
	rig.Eventually(t, 30*time.Second, "live1 running", func() error { return allInState(c, []string{"live1"}, "running") })

	c.Herdctl("rollout", "start", "--image", "v2", "--node-timeout", "2m")
	rig.Eventually(t, 30*time.Second, "rollout says why it waits", func() error {
		if v := rolloutStatus(c); !strings.Contains(v.Reason, down+" not ready") {
			return fmt.Errorf("%+v", v)
		}
		return nil
	})
	if v := rolloutStatus(c); v.Per[a].Phase != keys.PhasePending || v.Per[b].Phase != keys.PhasePending {
		t.Fatalf("a node started while %s used up the budget: %+v", down, v)
	}
	t.Logf("reason: %s", rolloutStatus(c).Reason)

	c.Herdctl("hw", "rm", down)
	rig.Eventually(t, 60*time.Second, "first node under way", func() error {
		v := rolloutStatus(c)
		if v.Per[down].Phase != keys.PhaseRemoved || v.Per[a].Phase == keys.PhasePending {
			return fmt.Errorf("%+v", v)
		}
		return nil
	})
	start(late, "v1")
	rig.Eventually(t, 120*time.Second, "the waiting drain explained", func() error {
		st, nl := c.Herdctl("rollout", "status"), c.Herdctl("node", "list")
		if !strings.Contains(st, "waits: vm/live1: cannot migrate to") || !strings.Contains(nl, "drain waits: vm/live1: cannot migrate") {
			return fmt.Errorf("rollout status:\n%s\nnode list:\n%s", st, nl)
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	watched, _ := exec.CommandContext(ctx, bin.Herdctl, "rollout", "status", "--watch", "--endpoints", c.Endpoint).CombinedOutput()
	cancel()
	if !strings.Contains(string(watched), "draining: waits: vm/live1: cannot migrate") {
		t.Errorf("rollout status --watch does not say why the drain waits:\n%s", watched)
	}
	t.Logf("%s", c.Herdctl("rollout", "status"))
	c.Herdctl("vm", "delete", "live1")
	rig.Eventually(t, 180*time.Second, "rollout done", func() error {
		if v := rolloutStatus(c); v.State != keys.RolloutDone {
			return fmt.Errorf("%+v", v)
		}
		return nil
	})
	v := rolloutStatus(c)
	for _, id := range []string{a, b, late} {
		if v.Per[id].Phase != keys.PhaseDone {
			t.Fatalf("node %s: %+v", id, v.Per)
		}
	}
	nl := c.Herdctl("node", "list")
	if strings.Count(nl, " v2 ") != 3 || strings.Contains(nl, "cordoned") {
		t.Fatalf("not every node on v2 and schedulable:\n%s", nl)
	}
	ev := c.Herdctl("events", "--object", "node/"+late)
	if !strings.Contains(ev, "rollout-added") {
		t.Fatalf("no rollout-added event for %s:\n%s", late, ev)
	}
	t.Logf("%s", c.Herdctl("rollout", "status"))
}
