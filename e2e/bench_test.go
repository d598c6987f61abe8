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
		wch := cl.Watch(ctx, space.VMPlacement(name))
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
