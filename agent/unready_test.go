package agent

import (
	"context"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
	"github.com/herdhq/herd/lib/keys"
)

// TestReportUnready: a node whose libvirtd cannot start registers its problem and no capacity, on
// a lease; once the problem is fixed (the report ends) the registration goes.
func TestReportUnready(t *testing.T) {
	c := etcdtest.Client(t)
	space := keys.MustSpace("/herd")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = ReportUnready(ctx, Unready{Client: c, Space: space, HWID: "52:54:00:00:00:01", BootID: "b1", LeaseTTL: 5 * time.Second, Log: hclog.NewNullLogger()},
			func() string { return "cannot connect to libvirt at qemu:///system: no socket" })
	}()
	var n *keys.Node
	deadline := time.Now().Add(10 * time.Second)
	for n == nil {
		resp, err := c.Get(context.Background(), space.Node("52:54:00:00:00:01"))
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Kvs) == 1 {
			if resp.Kvs[0].Lease == 0 {
				t.Fatal("registered without a lease")
			}
			if n, err = keys.Decode[keys.Node](resp.Kvs[0].Value); err != nil {
				t.Fatal(err)
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("no registration")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if n.Problem == "" || n.CPUs != 0 || n.MemoryMiB != 0 || n.BootID != "b1" {
		t.Fatalf("node %+v", n)
	}
	cancel()
	<-done
	resp, err := c.Get(context.Background(), space.Node("52:54:00:00:00:01"))
	if err != nil || len(resp.Kvs) != 0 {
		t.Fatalf("the registration outlived the report: %v %v", resp.Kvs, err)
	}
}
