package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/e2e/rig"
)

// BenchmarkLeaderFailover: kill -9 the leading coordinator, then write a VM spec; measured is the
// time from the kill to the VM's placement being committed by the next leader, next to the session
// TTL that bounds it. Separate processes, real etcd. Run with -benchtime 1x or more.
func BenchmarkLeaderFailover(b *testing.B) {
	const ttl = 5 * time.Second
	var total time.Duration
	for i := range b.N {
		c := rig.NewCluster(b, bin)
		c.CoordArgs = []string{"--session-ttl", ttl.String()}
		c.StartCoordinator()
		c.StartCoordinator()
		c.StartAgent(nodeIDs[0], 8, 16384)
		leader := c.Leader(30 * time.Second)
		cl := c.Client()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		name := fmt.Sprintf("fo%d", i)
		wch := cl.Watch(ctx, space.Placement(name))
		time.Sleep(time.Second) // standby caches warm, nothing pending
		killed := time.Now()
		leader.Kill()
		if _, err := cl.Put(ctx, space.VMSpec(name), `{"vcpus":1,"memory_mib":64}`); err != nil {
			b.Fatal(err)
		}
		var placed time.Time
		for resp := range wch {
			if len(resp.Events) > 0 && resp.Events[0].Type == clientv3.EventTypePut {
				placed = time.Now()
				break
			}
		}
		cancel()
		if placed.IsZero() {
			b.Fatal("never placed after the leader was killed")
		}
		total += placed.Sub(killed)
	}
	avg := total / time.Duration(b.N)
	b.ReportMetric(avg.Seconds(), "failover-s")
	b.ReportMetric(ttl.Seconds(), "ttl-s")
	b.ReportMetric((avg - ttl).Seconds(), "beyond-ttl-s")
}

// BenchmarkNodeLossRecovery: kill -9 an agent hosting 10 VMs; measured is the time until all 10
// run elsewhere, next to lease TTL + grace, which bound it from below (target: within + 2 s).
func BenchmarkNodeLossRecovery(b *testing.B) {
	var total time.Duration
	for range b.N {
		r := newLossRigTB(b, 3)
		names := r.createOnTB(b, "bench", 10)
		victim := r.node(1)
		killed := time.Now()
		r.Agents[victim].Kill()
		rig.Eventually(b, 60*time.Second, "VMs running elsewhere", func() error { return allRunningOff(r.Cluster, names, victim) })
		total += time.Since(killed)
	}
	avg := total / time.Duration(b.N)
	b.ReportMetric(avg.Seconds(), "recovery-s")
	b.ReportMetric((lossTTL + lossGrace).Seconds(), "ttl+grace-s")
	b.ReportMetric((avg - lossTTL - lossGrace).Seconds(), "beyond-s")
}
