package coordinator

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
	"github.com/herdhq/herd/lib/keys"
)

// TestAddressesAreClaimedWithThePlacement runs a leader against a real etcd with a VLAN network of
// five allocatable addresses, which only one of two nodes carries. Every VM on it gets its own address, claimed in the transaction that
// places it and carried to the node in its assignment; the sixth waits with a problem that says the
// range is full until a VM is deleted and its address released; a fixed address held by another VM
// and a missing network are problems in words; a claim deleted by hand is claimed again, and one
// written by hand for no VM is released.
func TestAddressesAreClaimedWithThePlacement(t *testing.T) {
	srv := etcdtest.Start(t)
	c := etcdtest.NewClient(t, srv.Endpoints)
	ctx := context.Background()
	// Only n1 carries VLAN networks: every VM on prod (VLAN 120) must go there.
	addNodeWith(t, c, "n1", 64, 65536, nil, func(n *keys.Node) { n.Uplink = "eth1" })
	addNode(t, c, "n2", 64, 65536, nil)
	put := func(key, val string) {
		t.Helper()
		if _, err := c.Put(ctx, key, val); err != nil {
			t.Fatal(err)
		}
	}
	// 10.20.0.0/29: hosts .1-.6, the gateway .1: .2-.6 are allocatable.
	put(space.Network("prod"), keys.MustEncode(&keys.NetworkSpec{VLAN: 120, CIDR: "10.20.0.0/29", Gateway: "10.20.0.1", DNS: []string{"10.20.0.1"}}))
	r := startReplicaWith(t, srv.Endpoints, "c1", func(cfg *Config) { cfg.Interval = time.Second })
	leads(t, r, "the only replica")

	spec := func(nics ...string) string {
		return fmt.Sprintf(`{"vcpus":1,"memory_mib":256,"networks":[%s]}`, strings.Join(nics, ","))
	}
	placement := func(name string) *keys.Placement {
		var pl keys.Placement
		if err := decodeInto(get(t, c, space.Placement(name)), &pl); err != nil {
			return nil
		}
		return &pl
	}
	problem := func(name string) string {
		var p keys.Problem
		if err := decodeInto(get(t, c, space.Problem(name)), &p); err != nil {
			return ""
		}
		return p.Message
	}
	claims := func() map[string]string {
		resp, err := c.Get(ctx, space.AddressPrefix("prod"), clientv3.WithPrefix())
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]string{}
		for _, kv := range resp.Kvs {
			cl, err := keys.Decode[keys.AddressClaim](kv.Value)
			if err != nil {
				t.Fatal(err)
			}
			out[strings.TrimPrefix(string(kv.Key), space.AddressPrefix("prod"))] = fmt.Sprintf("%s/%d", cl.VM, cl.UID)
		}
		return out
	}
	// addressOf waits for the VM's placement and checks its claim and assignment agree with it.
	addressOf := func(name string) string {
		t.Helper()
		var ip string
		eventually(t, name+" placed with an address", func() error {
			pl := placement(name)
			if pl == nil || len(pl.NICs) == 0 || pl.NICs[0] == nil {
				return fmt.Errorf("placement %+v (problem %q)", pl, problem(name))
			}
			if pl.Node != "n1" {
				return fmt.Errorf("placed on %s, which has no uplink for VLAN 120", pl.Node)
			}
			ip = pl.NICs[0].IP()
			if got := claims()[ip]; got != fmt.Sprintf("%s/%d", name, pl.UID) {
				return fmt.Errorf("claim of %s is %q", ip, got)
			}
			var asg keys.Assignment
			if err := decodeInto(get(t, c, space.Assign(pl.Node, name)), &asg); err != nil {
				return err
			}
			if len(asg.NICs) == 0 || asg.NICs[0] == nil || asg.NICs[0].Address != ip+"/29" || asg.NICs[0].Bridge != "herd-v120" || asg.NICs[0].Gateway != "10.20.0.1" {
				return fmt.Errorf("assignment NICs %+v", asg.NICs)
			}
			return nil
		})
		return ip
	}

	put(space.VMSpec("fixed"), spec(`{"network":"prod","address":"10.20.0.6"}`))
	if ip := addressOf("fixed"); ip != "10.20.0.6" {
		t.Fatalf("the fixed address: got %s", ip)
	}
	// Four at once, for one round to allocate them all from its own book.
	var ops []clientv3.Op
	for _, name := range []string{"a", "b", "c", "d"} {
		ops = append(ops, clientv3.OpPut(space.VMSpec(name), spec(`{"network":"prod"}`, `{"bridge":"br9"}`)))
	}
	if _, err := c.Txn(ctx).Then(ops...).Commit(); err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, name := range []string{"a", "b", "c", "d"} {
		got[name] = addressOf(name)
	}
	if n := testutil.ToFloat64(r.c.m.conflicts); n != 0 {
		t.Fatalf("%v placements refused by etcd: the round handed out an address twice", n)
	}
	var ips []string
	for _, ip := range got {
		ips = append(ips, ip)
	}
	sort.Strings(ips)
	if want := "10.20.0.2 10.20.0.3 10.20.0.4 10.20.0.5"; strings.Join(ips, " ") != want {
		t.Fatalf("addresses %v, want each of %s once", got, want)
	}

	// The range is full: the next VM waits, saying so, and takes no room.
	put(space.VMSpec("e"), spec(`{"network":"prod"}`))
	eventually(t, "e's problem", func() error {
		if p := problem("e"); !strings.Contains(p, "no free address") {
			return fmt.Errorf("problem %q", p)
		}
		return nil
	})
	// A fixed address another VM holds, and a network that does not exist.
	put(space.VMSpec("squat"), spec(`{"network":"prod","address":"`+got["a"]+`"}`))
	put(space.VMSpec("lost"), spec(`{"network":"nowhere"}`))
	eventually(t, "the problems in words", func() error {
		if p := problem("squat"); !strings.Contains(p, "held by vm a") {
			return fmt.Errorf("squat: %q", p)
		}
		if p := problem("lost"); !strings.Contains(p, "network nowhere does not exist") {
			return fmt.Errorf("lost: %q", p)
		}
		return nil
	})

	// Deleting a VM releases its address, which the waiting VM then gets.
	if _, err := c.Delete(ctx, space.VMSpec("b")); err != nil {
		t.Fatal(err)
	}
	if ip := addressOf("e"); ip != got["b"] {
		t.Fatalf("e got %s, want b's released %s", ip, got["b"])
	}

	// Hands in etcd: a claim deleted under a placed VM comes back; one made up for no VM goes.
	if _, err := c.Delete(ctx, space.Address("prod", got["c"])); err != nil {
		t.Fatal(err)
	}
	put(space.VMSpec("squat"), spec(`{"network":"prod"}`)) // no address left: waits
	if _, err := c.Delete(ctx, space.VMSpec("squat")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Delete(ctx, space.VMSpec("d")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "d's address released", func() error {
		if h, ok := claims()[got["d"]]; ok {
			return fmt.Errorf("still held by %s", h)
		}
		return nil
	})
	put(space.Address("prod", got["d"]), keys.MustEncode(&keys.AddressClaim{VM: "ghost", UID: 1}))
	eventually(t, "the claims made right again", func() error {
		cl := claims()
		if h := cl[got["c"]]; !strings.HasPrefix(h, "c/") {
			return fmt.Errorf("c's address held by %q", h)
		}
		if h, ok := cl[got["d"]]; ok {
			return fmt.Errorf("the made-up claim is still there (%s)", h)
		}
		return nil
	})
}
