package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/herdhq/herd/e2e/rig"
)

// TestEtcdQuorumLost: two of three etcd members stop under load. Guests keep running and no domain
// is started or stopped anywhere; herdctl says etcd has no quorum; with the members back the
// cluster converges with nothing lost and no node fenced (leases cannot expire without a quorum).
func TestEtcdQuorumLost(t *testing.T) {
	c, members := rig.NewCluster3(t, bin)
	c.AgentArgs = []string{"--lease-ttl", "3s", "--resync", "2s"}
	c.CoordArgs = []string{"--session-ttl", "2s", "--grace", "2s", "--unsafe-no-fencing"}
	c.StartCoordinator()
	c.StartCoordinator()
	for _, id := range nodeIDs {
		c.StartAgent(id, 16, 32768)
	}
	c.Leader(30 * time.Second)
	var names []string
	for i := range 6 {
		names = append(names, fmt.Sprintf("q%02d", i))
		c.Herdctl("vm", "create", names[i], "--memory", "256MiB")
	}
	rig.Eventually(t, 60*time.Second, "VMs running", func() error { return allInState(c, names, "running") })
	before := runningOn(t, c)

	leader, err := rig.EtcdLeader(members)
	if err != nil {
		t.Fatal(err)
	}
	var stopped []*rig.Member
	for _, m := range members {
		if m != leader && len(stopped) < 2 {
			stopped = append(stopped, m)
		}
	}
	stopped = append(stopped[:1], leader) // the leader goes too: the survivor has no leader at all
	for _, m := range stopped {
		m.Stop(5 * time.Second)
	}
	outage := time.Now()
	t.Logf("stopped %s and %s", stopped[0].Name, stopped[1].Name)

	// Load while there is no quorum: creates fail with the reason; every sample of every node's
	// libvirt shows exactly what ran before.
	sawReason := false
	samples := 0
	for time.Since(outage) < 30*time.Second {
		if !sawReason {
			_, errOut, code := c.Run(bin.Herdctl, "--timeout", "3s", "vm", "create", "during-outage", "--memory", "256MiB")
			if code == 0 {
				t.Fatal("a VM create succeeded without a quorum")
			}
			sawReason = strings.Contains(errOut, "etcd has no quorum")
			if !sawReason {
				t.Logf("herdctl without a quorum said: %s", errOut)
			}
		}
		now, ok := sampleRunning(c)
		if ok {
			samples++
			if fmt.Sprint(now) != fmt.Sprint(before) {
				t.Fatalf("domains changed without a quorum: %v, before %v", now, before)
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !sawReason {
		t.Error("herdctl never said etcd has no quorum")
	}
	t.Logf("%d samples in %s without a quorum: nothing started or stopped", samples, time.Since(outage).Round(time.Second))

	for _, m := range stopped {
		m.Restart(t, c)
	}
	back := time.Now()
	c.Herdctl("vm", "create", "after-outage", "--memory", "256MiB")
	rig.Eventually(t, 60*time.Second, "a VM created after the outage runs", func() error {
		return allInState(c, append(names, "after-outage"), "running")
	})
	t.Logf("converged %s after the members came back", time.Since(back).Round(100*time.Millisecond))
	after := runningOn(t, c)
	for _, n := range names {
		if fmt.Sprint(after[n]) != fmt.Sprint(before[n]) {
			t.Errorf("%s ran on %v before the outage, on %v after", n, before[n], after[n])
		}
	}
	if out := strings.TrimSpace(c.Herdctl("fence", "list")); out != "" {
		t.Errorf("a node was fenced after the outage:\n%s", out)
	}
	assertOneRunnableAssignment(t, c)
	assertNeverRunningTwice(t, c)
}
