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
// the raw rate of single-key puts in the same run and the same etcd, then `vm list` of all of them.
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
		start = time.Now()
		out, _, err := herdctl(b, ep, "vm", "list")
		if err != nil || strings.Count(out, "\n") != n+1 {
			b.Fatalf("list: %v, %d lines", err, strings.Count(out, "\n"))
		}
		b.ReportMetric(time.Since(start).Seconds(), "list-s")
	}
}
