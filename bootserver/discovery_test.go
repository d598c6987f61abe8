package bootserver

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/bootserver/httpboot"
	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
	"github.com/herdhq/herd/lib/events"
	"github.com/herdhq/herd/lib/keys"
)

func startDiscovery(t *testing.T, c *clientv3.Client, lim DiscoveryLimits) *discovery {
	t.Helper()
	ev := events.New(c, space, keys.EventsByBootserver, "bootserver/bs1", "", hclog.NewNullLogger())
	d := newDiscovery(c, space, "bs1", lim, ev, hclog.NewNullLogger(), prometheus.NewRegistry())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	go func() { d.inf.Run(ctx); done <- struct{}{} }()
	go func() { ev.Run(ctx); done <- struct{}{} }()
	t.Cleanup(func() { cancel(); <-done; <-done })
	if err := d.inf.WaitRev(ctx, 0); err != nil {
		t.Fatal(err)
	}
	return d
}

func discoveredKeys(t *testing.T, c *clientv3.Client) int64 {
	t.Helper()
	resp, err := c.Get(context.Background(), space.DiscoveredPrefix(), clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	return resp.Count
}

// TestDiscoveryBounded: what a hostile boot network can make the boot server write. One address
// inventing MACs gets a handful of records; many addresses together fill at most the cap, the least
// recently seen evicted, with a count and an event; one MAC asking over and over is written once a
// minute, its attempts carried.
func TestDiscoveryBounded(t *testing.T) {
	c := etcdtest.Client(t)
	ctx := context.Background()
	d := startDiscovery(t, c, DiscoveryLimits{Max: 20, Rate: 1000})
	start, _ := c.Get(ctx, "/")

	for i := 0; i < 500; i++ {
		m := httpboot.Machine{MAC: fmt.Sprintf("02:00:00:00:%02x:%02x", i/256, i%256), Remote: "10.99.0.66"}
		if err := d.record(ctx, m, ""); err != nil {
			t.Fatal(err)
		}
	}
	if n := discoveredKeys(t, c); n > 5 {
		t.Fatalf("one source with 500 invented MACs wrote %d records (burst 5)", n)
	}
	if testutil.ToFloat64(d.dropped) < 490 {
		t.Fatalf("dropped %v", testutil.ToFloat64(d.dropped))
	}

	for i := 0; i < 200; i++ {
		m := httpboot.Machine{MAC: fmt.Sprintf("02:00:00:01:%02x:%02x", i/256, i%256), Remote: fmt.Sprintf("10.98.%d.%d", i/250, i%250+1)}
		if err := d.record(ctx, m, ""); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
	eventually(t, "the cache sees the cap", func() bool { return d.inf.Len() <= 20 })
	if n := discoveredKeys(t, c); n > 20 {
		t.Fatalf("%d discovered records, cap 20", n)
	}
	if testutil.ToFloat64(d.evicted) < 100 {
		t.Fatalf("evicted %v", testutil.ToFloat64(d.evicted))
	}
	eventually(t, "an event says the cap bit", func() bool {
		resp, err := c.Get(ctx, space.EventWriterPrefix(keys.EventsByBootserver), clientv3.WithPrefix())
		return err == nil && len(resp.Kvs) > 0 && strings.Contains(string(resp.Kvs[0].Value), "discovered-evicted")
	})

	// One MAC, many attempts: one write, attempts counted for the next.
	before, _ := c.Get(ctx, "/")
	m := httpboot.Machine{MAC: "02:00:00:02:00:01", Remote: "10.97.0.1"}
	for i := 0; i < 50; i++ {
		if err := d.record(ctx, m, "reason"); err != nil {
			t.Fatal(err)
		}
	}
	after, _ := c.Get(ctx, "/")
	if writes := after.Header.Revision - before.Header.Revision; writes > 2 {
		t.Fatalf("50 attempts of one MAC made %d writes", writes)
	}
	d.mu.Lock()
	pending := d.seen[m.MAC].pending
	d.mu.Unlock()
	if pending != 49 {
		t.Fatalf("attempts carried to the next write: %d", pending)
	}
	t.Logf("revisions: %d for 700 unknown requests", after.Header.Revision-start.Header.Revision)
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 10s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestSerialsCannotLendIdentity: a serial number identifies a machine only when it can.
func TestSerialsCannotLendIdentity(t *testing.T) {
	r := newRig(t)
	r.addImage("v1", "KERNEL-ONE", "INITRD-ONE")
	r.put(space.ImageCurrent(), keys.MustEncode(&keys.ImageCurrent{Version: "v1"}))
	// A placeholder serial written by hand (herdctl refuses it), a serial enrolled twice, and one
	// bound to another MAC.
	r.put(space.Hardware("52:54:00:00:00:0a"), keys.MustEncode(&keys.Hardware{MAC: "52:54:00:00:00:0a", Serial: "To Be Filled By O.E.M."}))
	r.put(space.Hardware("DUP1"), keys.MustEncode(&keys.Hardware{Serial: "SAME9"}))
	r.put(space.Hardware("DUP2"), keys.MustEncode(&keys.Hardware{Serial: "SAME9"}))
	r.put(space.Hardware("TAG77"), keys.MustEncode(&keys.Hardware{MAC: "52:54:00:00:00:0b"}))
	r.put(space.Hardware("TAG88"), keys.MustEncode(&keys.Hardware{}))
	r.eventually("cached", func() bool { return r.b.hw.Len() == 5 && r.b.imgs.Get(space.ImageCurrent()) != nil })
	for _, c := range []struct{ query, want, reason string }{
		{"/ipxe?mac=52-54-00-00-00-0c&serial=To%20Be%20Filled%20By%20O.E.M.", "not recognised", "placeholder"},
		{"/ipxe?mac=52-54-00-00-00-0d&serial=SAME9", "not recognised", "enrolled 2 times"},
		{"/ipxe?mac=52-54-00-00-00-0e&serial=TAG77", "not recognised", "with MAC 52:54:00:00:00:0b"},
		{"/ipxe?mac=52-54-00-00-00-0f&serial=TAG88", "herd.hwid=TAG88", ""},
		{"/ipxe?mac=52-54-00-00-00-0a&serial=whatever", "herd.hwid=52:54:00:00:00:0a", ""},
	} {
		_, body := r.get(c.query)
		if !strings.Contains(body, c.want) {
			t.Fatalf("%s: %s", c.query, body)
		}
		if c.reason == "" {
			continue
		}
		mac := strings.ReplaceAll(strings.TrimPrefix(strings.Split(c.query, "&")[0], "/ipxe?mac="), "-", ":")
		r.eventually("discovered with the reason", func() bool {
			rec := r.b.disc.inf.Get(space.Discovered(mac))
			return rec.OK() && strings.Contains(rec.Value.Reason, c.reason)
		})
	}
}
