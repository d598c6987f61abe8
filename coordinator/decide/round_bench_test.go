package decide

import (
	"fmt"
	"os"
	"strconv"
	"testing"
)

// settledWorld is the cluster the round benchmarks decide about: HERD_BENCH_NODES nodes (default
// 10,000), ten VMs each, every VM placed and reported running. It returns the world and the VMs.
func settledWorld(b *testing.B) (*world, int) {
	nodes := 10000
	if v, err := strconv.Atoi(os.Getenv("HERD_BENCH_NODES")); err == nil && v > 0 {
		nodes = v
	}
	w := newWorld(b)
	w.budget = 1 << 30
	for i := range nodes {
		w.node(fmt.Sprintf("n%05d", i), 64, 256)
	}
	for i := range nodes * 10 {
		w.vm(fmt.Sprintf("v%06d", i), 1, 512)
	}
	w.settle()
	for i := range nodes * 10 {
		name := fmt.Sprintf("v%06d", i)
		w.report(w.placedOn(name), name, "running")
	}
	w.settle()
	return w, nodes * 10
}

// BenchmarkSteadyRound is one round of the settled cluster (settledWorld) with nothing to do. The
// leader runs a full one every --interval (10 s) and after every change to a node, so its cost is
// the leader's steady CPU.
func BenchmarkSteadyRound(b *testing.B) {
	w, vms := settledWorld(b)
	snap := w.snapshot()
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if p := Decide(snap, w.st, w.cfg); len(p.Actions) > 0 {
			b.Fatalf("a settled cluster's round decided %d actions: %v", len(p.Actions), actions(p)[:1])
		}
	}
	b.ReportMetric(float64(vms)*float64(b.N)/b.Elapsed().Seconds(), "vms/s")
}

// BenchmarkQuickRound is the round that follows ten new specs in the settled cluster: a quick
// round (quick.go) places them, counting the others' capacity.
func BenchmarkQuickRound(b *testing.B) {
	w, _ := settledWorld(b)
	var focus []string
	for i := range 10 {
		name := fmt.Sprintf("new%02d", i)
		w.vm(name, 1, 512)
		focus = append(focus, name)
	}
	full := w.snapshot()
	snap := quickSnapshot(full, ledgerOf(full), focus)
	snap.Trusted = Decide(full, w.st, w.cfg).Trusted // as the last full round hands it on
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if p := Decide(snap, w.st, w.cfg); len(p.Actions) != 10 || p.Full != "" {
			b.Fatalf("a quick round over 10 new VMs decided %d actions (full: %q)", len(p.Actions), p.Full)
		}
	}
}
