package ctl

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
	"github.com/herdhq/herd/lib/keys"
)

// BenchmarkApplyAndList: `vm apply -f` of a file of HERD_BENCH_VMS specs (default 100,000) against
// the raw rate of single-key puts in the same run and the same etcd; then, with every VM placed and
// running on a node of ten, `vm list`, `node list`, `vm list --node` and `node get`.
// Run with -benchtime 1x.
func BenchmarkApplyAndList(b *testing.B) {
	n := 100000
	if v, err := strconv.Atoi(os.Getenv("HERD_BENCH_VMS")); err == nil && v > 0 {
		n = v
	}
	srv := etcdtest.Start(b)
	ep := srv.Endpoints[0]
	c := etcdtest.NewClient(b, srv.Endpoints)
	sp := keys.MustSpace(keys.DefaultPrefix)

	var sb strings.Builder
	for i := range n {
		fmt.Fprintf(&sb, "name: vm-%06d\nvcpus: 1\nmemory_mib: 512\ndisk: {pool: default, size_gib: 10}\n---\n", i)
	}
	f := filepath.Join(b.TempDir(), "vms.yaml")
	if err := os.WriteFile(f, []byte(sb.String()), 0o644); err != nil {
		b.Fatal(err)
	}
	// The raw rate: one put at a time, the way apply used to write.
	raw := min(n, 5000)
	start := time.Now()
	for i := range raw {
		if _, err := c.Put(context.Background(), sp.VMSpec(fmt.Sprintf("raw-%06d", i)), `{"v":1,"vcpus":1,"memory_mib":512}`); err != nil {
			b.Fatal(err)
		}
	}
	rawRate := float64(raw) / time.Since(start).Seconds()
	if _, err := c.Delete(context.Background(), sp.VMPrefix()+"raw-", clientv3.WithPrefix()); err != nil {
		b.Fatal(err)
	}

	b.ResetTimer()
	for range b.N {
		start = time.Now()
		if out, errOut, err := herdctl(b, ep, "vm", "apply", "-f", f); err != nil {
			b.Fatalf("apply: %v %s %s", err, errOut, out[:min(len(out), 200)])
		}
		took := time.Since(start)
		b.ReportMetric(float64(n)/took.Seconds(), "specs/s")
		b.ReportMetric(rawRate, "raw-puts/s")
		b.ReportMetric(float64(n)/took.Seconds()/rawRate, "apply/raw")
		b.ReportMetric(took.Seconds(), "apply-s")
		// What the leader and the nodes would have written: a placement, an assignment and a
		// running status per VM, 10 VMs per node, so that the listings have a whole cluster to show.
		nodes := placeAll(b, c, sp, n)
		for _, l := range []struct {
			metric string
			args   []string
			lines  int
		}{
			{"vm-list-s", []string{"vm", "list"}, n + 1},
			{"node-list-s", []string{"node", "list"}, nodes + 1},
			{"vm-list-node-s", []string{"vm", "list", "--node", benchNode(nodes / 2)}, 11},
			{"node-get-s", []string{"node", "get", benchNode(nodes / 2)}, -1},
		} {
			start = time.Now()
			out, _, err := herdctl(b, ep, l.args...)
			if err != nil || (l.lines > 0 && strings.Count(out, "\n") != l.lines) {
				b.Fatalf("%v: %v, %d lines", l.args, err, strings.Count(out, "\n"))
			}
			b.ReportMetric(time.Since(start).Seconds(), l.metric)
		}
	}
}

func benchNode(i int) string {
	return fmt.Sprintf("02:00:00:%02x:%02x:%02x", (i>>16)&0xff, (i>>8)&0xff, i&0xff)
}

// placeAll writes node keys and, per VM, placement, assignment and status, in transactions of 32
// VMs; it returns the number of nodes.
func placeAll(b *testing.B, c *clientv3.Client, sp keys.Space, n int) int {
	ctx := context.Background()
	nodes := (n + 9) / 10
	for i := range nodes {
		hw := benchNode(i)
		if _, err := c.Put(ctx, sp.Node(hw), keys.MustEncode(&keys.Node{HWID: hw, BootID: "b", CPUs: 64, MemoryMiB: 1 << 18})); err != nil {
			b.Fatal(err)
		}
	}
	specs, err := c.Get(ctx, sp.VMPrefix(), clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		b.Fatal(err)
	}
	var ops []clientv3.Op
	flush := func() {
		if _, err := c.Txn(ctx).Then(ops...).Commit(); err != nil {
			b.Fatal(err)
		}
		ops = ops[:0]
	}
	for i, kv := range specs.Kvs {
		name, part, ok := sp.ParseVM(string(kv.Key))
		if !ok || part != keys.VMPartSpec {
			continue
		}
		hw, uid := benchNode(i/10), kv.CreateRevision
		pl := keys.Placement{UID: uid, Node: hw, Epoch: 1, UUID: "6f1b8d4e-3c2a-4b5d-9e8f-0a1b2c3d4e5f", VCPUs: 1, MemoryMiB: 512, Since: time.Now()}
		ops = append(ops, clientv3.OpPut(sp.Placement(name), keys.MustEncode(&pl)),
			clientv3.OpPut(sp.Assign(hw, name), keys.MustEncode(&keys.Assignment{UID: uid, Epoch: 1, UUID: pl.UUID})),
			clientv3.OpPut(sp.Status(hw, name), keys.MustEncode(&keys.VMStatus{UID: uid, Epoch: 1, State: keys.StateRunning, Since: time.Now()})))
		if len(ops) >= 96 {
			flush()
		}
	}
	if len(ops) > 0 {
		flush()
	}
	return nodes
}
