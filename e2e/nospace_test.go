package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/e2e/rig"
)

// TestEtcdOutOfSpace: etcd's database fills (a small --quota-backend-bytes, filled by root) and
// raises NOSPACE. Guests keep running and nothing is started or stopped; herdctl names the alarm;
// after the runbook's compaction, defragmentation and disarm everything converges, nothing fenced.
func TestEtcdOutOfSpace(t *testing.T) {
	c := rig.NewCluster(t, bin)
	c.RestartEtcd("--quota-backend-bytes", fmt.Sprint(48<<20))
	c.AgentArgs = []string{"--lease-ttl", "3s", "--resync", "2s"}
	c.CoordArgs = []string{"--session-ttl", "2s", "--grace", "2s"}
	c.StartCoordinator()
	c.StartCoordinator()
	for _, id := range nodeIDs[:2] {
		c.StartAgent(id, 16, 32768)
	}
	c.Leader(30 * time.Second)
	var names []string
	for i := range 4 {
		names = append(names, fmt.Sprintf("s%02d", i))
		c.Herdctl("vm", "create", names[i], "--memory", "256MiB")
	}
	rig.Eventually(t, 60*time.Second, "VMs running", func() error { return allInState(c, names, "running") })
	before := runningOn(t, c)

	cl := c.Client()
	junk := strings.Repeat("x", 512<<10)
	filled := 0
	for ; filled < 400; filled++ {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := cl.Put(ctx, fmt.Sprintf("/junk/%04d", filled), junk)
		cancel()
		if err != nil {
			if !strings.Contains(err.Error(), "database space exceeded") {
				t.Fatalf("filling etcd: %v", err)
			}
			break
		}
	}
	full := time.Now()
	t.Logf("etcd out of space after %d junk values", filled)

	_, errOut, code := c.Run(bin.Herdctl, "vm", "create", "while-full", "--memory", "256MiB")
	if code == 0 || !strings.Contains(errOut, "out of space") {
		t.Errorf("herdctl vm create on a full etcd: exit %d, %s", code, errOut)
	}
	if out := c.Herdctl("cluster", "show"); !strings.Contains(out, "NOSPACE") {
		t.Errorf("cluster show does not name the alarm:\n%s", out)
	}
	for time.Since(full) < 15*time.Second {
		if now, ok := sampleRunning(c); ok && fmt.Sprint(now) != fmt.Sprint(before) {
			t.Fatalf("domains changed while etcd was full: %v, before %v", now, before)
		}
		time.Sleep(200 * time.Millisecond)
	}

	// The runbook: make room, compact, defragment, disarm.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	del, err := cl.Delete(ctx, "/junk/", clientv3.WithPrefix())
	if err != nil {
		t.Fatalf("delete the junk: %v", err)
	}
	if _, err := cl.Compact(ctx, del.Header.Revision); err != nil {
		t.Fatalf("compact: %v", err)
	}
	if _, err := cl.Defragment(ctx, strings.Split(c.Endpoint, ",")[0]); err != nil {
		t.Fatalf("defrag: %v", err)
	}
	if _, err := cl.AlarmDisarm(ctx, &clientv3.AlarmMember{}); err != nil {
		t.Fatalf("disarm: %v", err)
	}
	back := time.Now()
	c.Herdctl("vm", "create", "after-full", "--memory", "256MiB")
	rig.Eventually(t, 60*time.Second, "a VM created after the disarm runs", func() error {
		return allInState(c, append(names, "after-full"), "running")
	})
	t.Logf("converged %s after the disarm", time.Since(back).Round(100*time.Millisecond))
	after := runningOn(t, c)
	for _, n := range names {
		if fmt.Sprint(after[n]) != fmt.Sprint(before[n]) {
			t.Errorf("%s ran on %v before, on %v after", n, before[n], after[n])
		}
	}
	if out := strings.TrimSpace(c.Herdctl("fence", "list")); out != "" {
		t.Errorf("a node was fenced:\n%s", out)
	}
}
