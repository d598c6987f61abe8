package coordinator

import (
	"context"
	"fmt"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
)

// A standby learns every node lease's granted TTL as the node keys appear, so the round it runs
// on winning asks etcd nothing about them: at 10,000 nodes, asking then cost the failover
// seconds.
func TestStandbyKnowsLeasesBeforeItLeads(t *testing.T) {
	srv := etcdtest.Start(t)
	c := etcdtest.NewClient(t, srv.Endpoints)
	r1 := startReplica(t, srv.Endpoints, "c1")
	leads(t, r1, "c1 leads")
	r2 := startReplica(t, srv.Endpoints, "c2")
	const nodes = 40
	for i := range nodes {
		addNode(t, c, fmt.Sprintf("n%02d", i), 8, 8192, nil)
	}
	asked := func(r *replica, by string) int {
		return int(testutil.ToFloat64(r.c.m.leaseQuestions.WithLabelValues(by)))
	}
	eventually(t, "the standby knows every lease", func() error {
		if n := asked(r2, "warm"); n != nodes {
			return fmt.Errorf("asked %d of %d", n, nodes)
		}
		return nil
	})
	if n := asked(r2, "round"); n != 0 {
		t.Fatalf("a standby ran a round: %d lease questions", n)
	}

	r1.stop()
	leads(t, r2, "c2 leads")
	if _, err := c.Put(context.Background(), space.VMSpec("after"), `{"vcpus":1,"memory_mib":64}`); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the new leader places", func() error {
		if get(t, c, space.Placement("after")) == nil {
			return fmt.Errorf("not placed")
		}
		return nil
	})
	if n := asked(r2, "round"); n != 0 {
		t.Errorf("the new leader asked %d lease questions in its rounds; the standby knew them all", n)
	}
	if n := asked(r2, "warm"); n != nodes {
		t.Errorf("asked %d leases while warming, want each of %d once", n, nodes)
	}
}
