package coordinator

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

const (
	benchVMs     = 5000
	benchNodes   = 100
	benchWriters = 64
)

// BenchmarkPlacementThroughput measures, in one run against one embedded etcd: the placement rate
// of a coordinator (5,000 VMs on 100 nodes, from the first spec written to the last placement
// committed) and the raw rate of the same transaction shape (leader guard + placement and spec
// compares, placement + assignment puts, problem delete) with the same client and parallelism. The
// ratio is what herd keeps of etcd's write rate. Run with -benchtime 1x.
func BenchmarkPlacementThroughput(b *testing.B) {
	for range b.N {
		srv := etcdtest.Start(b)
		c := etcdtest.NewClient(b, srv.Endpoints)
		rawRate := rawPlacementRate(b, c)
		addBenchNodes(b, c)
		for i := range 2 {
			startReplica(b, srv.Endpoints, fmt.Sprintf("c%d", i))
		}
		placed := watchPlacements(b, c)
		time.Sleep(500 * time.Millisecond) // leader elected, caches synced
		start := time.Now()
		writeBenchSpecs(b, c)
		end := placed.wait(b)
		rate := benchVMs / end.Sub(start).Seconds()
		b.ReportMetric(rate, "placements/s")
		b.ReportMetric(rawRate, "raw-txn/s")
		b.ReportMetric(rate/rawRate, "ratio")
	}
}

// BenchmarkPlacementThroughputPrewritten: the specs are all written before the coordinators start,
// so the spec writes do not share the denominator: the rate runs from the first placement committed
// to the last, against the raw rate of the same transaction shape in the same run (goal >= 0.8).
// The leader's start (election, caches listed, first round) is reported apart as start-s.
func BenchmarkPlacementThroughputPrewritten(b *testing.B) { prewritten(b, false) }

// BenchmarkPlacementWithAddresses is BenchmarkPlacementThroughputPrewritten with a NIC on a herd
// network per VM: each placement also allocates an address and writes its claim under the guard,
// against the raw rate of that transaction's shape (the claim's absence compared, the claim put).
func BenchmarkPlacementWithAddresses(b *testing.B) { prewritten(b, true) }

func prewritten(b *testing.B, addrs bool) {
	for range b.N {
		srv := etcdtest.Start(b)
		c := etcdtest.NewClient(b, srv.Endpoints)
		rawRate := rawPlacementRateOf(b, c, addrs)
		addBenchNodes(b, c)
		if addrs {
			if _, err := c.Put(context.Background(), space.Network("bench"), keys.MustEncode(&keys.NetworkSpec{CIDR: "10.64.0.0/16"})); err != nil {
				b.Fatal(err)
			}
		}
		writeBenchSpecsOf(b, c, addrs)
		placed := watchPlacements(b, c)
		start := time.Now()
		for i := range 2 {
			startReplica(b, srv.Endpoints, fmt.Sprintf("c%d", i))
		}
		end := placed.wait(b)
		first := time.Unix(0, placed.first.Load())
		rate := (benchVMs - 1) / end.Sub(first).Seconds()
		b.ReportMetric(rate, "placements/s")
		b.ReportMetric(rawRate, "raw-txn/s")
		b.ReportMetric(rate/rawRate, "ratio")
		b.ReportMetric(first.Sub(start).Seconds(), "start-s")
	}
}

// rawPlacementRate is the rate of the placement transaction's shape, guarded by a real election
// key, on keys of their own, benchWriters in flight.
func rawPlacementRate(b *testing.B, c *clientv3.Client) float64 {
	return rawPlacementRateOf(b, c, false)
}

func rawPlacementRateOf(b *testing.B, c *clientv3.Client, addrs bool) float64 {
	ctx := context.Background()
	lresp, err := c.Put(ctx, "/bench/leader", "x")
	if err != nil {
		b.Fatal(err)
	}
	g := etcdutil.Guard{Key: "/bench/leader", Rev: lresp.Header.Revision}
	start := time.Now()
	parallel(benchVMs, benchWriters, func(i int) {
		name := fmt.Sprintf("raw%05d", i)
		pl := keys.Placement{UID: int64(i), Node: "n", Epoch: 1, UUID: "6f1b8d4e-3c2a-4b5d-9e8f-0a1b2c3d4e5f", VCPUs: 1, MemoryMiB: 512, Since: time.Now(), By: "bench", Term: g.Rev}
		vs := keys.VMSpec{VCPUs: 1, MemoryMiB: 512, Disk: &keys.Disk{Pool: "default", SizeGiB: 10}}
		asg := keys.Assignment{UID: int64(i), Epoch: 1, UUID: pl.UUID, Spec: &vs}
		cmps := []etcdutil.Cmp{etcdutil.ModRev("/bench/vms/"+name+"/placement", 0), etcdutil.ModRev("/bench/vms/"+name+"/spec", 0)}
		ops := []etcdutil.Op{
			etcdutil.OpPut("/bench/vms/"+name+"/placement", keys.MustEncode(&pl)),
			etcdutil.OpPut("/bench/assign/n/"+name, keys.MustEncode(&asg)),
			etcdutil.OpDelete("/bench/vms/" + name + "/problem"),
		}
		if addrs {
			claim := fmt.Sprintf("/bench/addresses/bench/10.64.%d.%d", i/250, i%250+1)
			cmps = append(cmps, etcdutil.CreateRev(claim, 0))
			ops = append(ops, etcdutil.OpPut(claim, keys.MustEncode(&keys.AddressClaim{VM: name, UID: int64(i)})))
		}
		_, err := etcdutil.GuardedTxn(ctx, c, g, cmps, ops)
		if err != nil {
			b.Error(err)
		}
	})
	return benchVMs / time.Since(start).Seconds()
}

func addBenchNodes(b *testing.B, c *clientv3.Client) {
	for n := range benchNodes {
		addNode(b, c, fmt.Sprintf("n%03d", n), 64, 256<<10, nil)
	}
}

func writeBenchSpecs(b *testing.B, c *clientv3.Client) { writeBenchSpecsOf(b, c, false) }

func writeBenchSpecsOf(b *testing.B, c *clientv3.Client, addrs bool) {
	vs := keys.VMSpec{VCPUs: 1, MemoryMiB: 512, Disk: &keys.Disk{Pool: "default", SizeGiB: 10}}
	if addrs {
		vs.Networks = []keys.Network{{Network: "bench"}}
	}
	spec := keys.MustEncode(&vs)
	parallel(benchVMs, benchWriters, func(i int) {
		if _, err := c.Put(context.Background(), space.VMSpec(fmt.Sprintf("vm%05d", i)), spec); err != nil {
			b.Error(err)
		}
	})
}

// placements counts placements as they commit: the first one's time, and the last's.
type placements struct {
	n     atomic.Int64
	first atomic.Int64 // unix nanoseconds
	last  chan time.Time
}

// wait returns when the last placement committed, failing the benchmark after 5 minutes.
func (p *placements) wait(b *testing.B) time.Time {
	select {
	case end := <-p.last:
		return end
	case <-time.After(5 * time.Minute):
		b.Fatalf("only %d of %d placed", p.n.Load(), benchVMs)
		return time.Time{}
	}
}

func watchPlacements(b *testing.B, c *clientv3.Client) *placements {
	p := &placements{last: make(chan time.Time, 1)}
	wctx, cancel := context.WithCancel(context.Background())
	b.Cleanup(cancel)
	wch := c.Watch(wctx, space.PlacementPrefix(), clientv3.WithPrefix())
	go func() {
		for resp := range wch {
			for _, ev := range resp.Events {
				if !ev.IsCreate() {
					continue
				}
				switch p.n.Add(1) {
				case 1:
					p.first.Store(time.Now().UnixNano())
				case benchVMs:
					p.last <- time.Now()
				}
			}
		}
	}()
	return p
}

func parallel(n, par int, f func(i int)) {
	var wg sync.WaitGroup
	next := atomic.Int64{}
	for range par {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				f(i)
			}
		}()
	}
	wg.Wait()
}
