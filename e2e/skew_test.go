package e2e

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/herdhq/herd/e2e/rig"
)

// previousRelease is the last release that landed before this one (c10da51, issue 16's rolling
// upgrades): the version-skew test runs its binaries against the current ones. Move it forward
// when a release lands.
const previousRelease = "c10da51044f0cd38afd8e92ebdcfa84c807d2e30"

// TestVersionSkew is the skew policy of docs/architecture.md ("Version skew") on real processes:
// coordinators of the previous release drive an agent of each release; then the coordinators are
// upgraded one at a time while VMs are created throughout; then the new coordinators drive the
// previous release's agent (moves onto and off it, a delete). Every VM created runs exactly once,
// and the history never assigns or reports one VM twice.
func TestVersionSkew(t *testing.T) {
	old := rig.BuildRelease(t, previousRelease)
	c := rig.NewCluster(t, bin)
	c.CoordArgs = []string{"--session-ttl", "2s", "--strategy", "spread"}
	c.AgentArgs = []string{"--lease-ttl", "3s", "--resync", "2s"}
	c.CoordBin = old
	c.StartCoordinator()
	c.StartCoordinator()
	oldNode, newNode := "52:54:00:00:0a:01", "52:54:00:00:0a:02"
	c.AgentBin = old
	c.StartAgent(oldNode, 16, 32768)
	c.AgentBin = ""
	c.StartAgent(newNode, 16, 32768)
	rig.Eventually(t, 30*time.Second, "nodes ready", func() error {
		if n := strings.Count(c.Herdctl("node", "list"), " ready "); n != 2 {
			return fmt.Errorf("%d ready", n)
		}
		return nil
	})

	if rec := c.Etcdctl("get", space.Node(oldNode), "--print-value-only"); !strings.Contains(rec, `"agent_version":"`+previousRelease[:12]+`"`) {
		t.Fatalf("the old node does not run the previous release: %s", rec)
	}

	// Previous coordinators, an agent of each release.
	var names []string
	for i := range 6 {
		names = append(names, fmt.Sprintf("s%02d", i))
		c.Herdctl("vm", "create", names[i], "--memory", "256MiB", "--migration-policy", "restart")
	}
	rig.Eventually(t, 30*time.Second, "VMs running under the previous coordinators", func() error { return allInState(c, names, "running") })
	if on := runningOn(t, c); !spreadOver(on, names, oldNode, newNode) {
		t.Fatalf("not on both releases' nodes: %v", on)
	}

	// Rolling upgrade of the coordinators, one at a time, while VMs are created.
	stop := make(chan struct{})
	var created []string
	var mu sync.Mutex
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(300 * time.Millisecond):
			}
			name := fmt.Sprintf("u%02d", i)
			if _, _, code := c.Run(bin.Herdctl, "vm", "create", name, "--memory", "128MiB", "--migration-policy", "restart"); code == 0 {
				mu.Lock()
				created = append(created, name)
				mu.Unlock()
			}
		}
	}()
	c.CoordBin = ""
	for i := range 2 {
		c.Coords[i].Stop(10 * time.Second)
		co := c.StartCoordinator()
		rig.Eventually(t, 30*time.Second, "new coordinator serving", func() error {
			if !co.Running() {
				return fmt.Errorf("exited")
			}
			_, err := rig.Metric(co.Status+"/metrics", "herd_coordinator_leader")
			return err
		})
		time.Sleep(2 * time.Second) // VMs created under this mix
	}
	close(stop)
	wg.Wait()
	mu.Lock()
	all := append(append([]string(nil), names...), created...)
	mu.Unlock()
	if len(created) < 5 {
		t.Fatalf("only %d VMs created during the upgrade", len(created))
	}
	rig.Eventually(t, 60*time.Second, "every VM running after the upgrade", func() error { return allInState(c, all, "running") })
	t.Logf("%d VMs created during the rolling upgrade of the coordinators, all running", len(created))

	// New coordinators, the previous release's agent: moves onto and off it, a delete on it.
	on := runningOn(t, c)
	var fromOld, fromNew, delOld string
	for _, n := range names {
		switch w := fmt.Sprint(on[n]); {
		case w == fmt.Sprint([]string{oldNode}) && fromOld == "":
			fromOld = n
		case w == fmt.Sprint([]string{oldNode}) && delOld == "":
			delOld = n
		case w == fmt.Sprint([]string{newNode}) && fromNew == "":
			fromNew = n
		}
	}
	if fromOld == "" || fromNew == "" || delOld == "" {
		t.Fatalf("want two VMs on the old node and one on the new: %v", on)
	}
	c.Herdctl("vm", "migrate", fromOld, "--to", newNode)
	c.Herdctl("vm", "migrate", fromNew, "--to", oldNode)
	c.Herdctl("vm", "delete", delOld)
	rig.Eventually(t, 60*time.Second, "moves and the delete done", func() error {
		now := runningOn(t, c)
		if w := fmt.Sprint(now[fromOld]); w != fmt.Sprint([]string{newNode}) {
			return fmt.Errorf("%s on %s", fromOld, w)
		}
		if w := fmt.Sprint(now[fromNew]); w != fmt.Sprint([]string{oldNode}) {
			return fmt.Errorf("%s on %s", fromNew, w)
		}
		if w := now[delOld]; len(w) != 0 {
			return fmt.Errorf("%s (deleted) on %v", delOld, w)
		}
		return nil
	})
	assertOneRunnableAssignment(t, c)
	assertNeverRunningTwice(t, c)
}

// spreadOver says whether names run on both nodes.
func spreadOver(on map[string][]string, names []string, a, b string) bool {
	seen := map[string]bool{}
	for _, n := range names {
		for _, node := range on[n] {
			seen[node] = true
		}
	}
	return seen[a] && seen[b]
}
