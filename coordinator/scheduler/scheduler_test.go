package scheduler

import (
	"fmt"
	"os/exec"
	"strings"
	"testing"
)

func nodes(n int, cpus int, memMiB int64) []Node {
	out := make([]Node, n)
	for i := range out {
		out[i] = Node{HWID: fmt.Sprintf("n%02d", i), CPUs: cpus, MemoryMiB: memMiB}
	}
	return out
}

func vms(n int, vcpus int, memMiB int64) []VM {
	out := make([]VM, n)
	for i := range out {
		out[i] = VM{Name: fmt.Sprintf("vm%03d", i), UID: int64(i + 1), VCPUs: vcpus, MemoryMiB: memMiB}
	}
	return out
}

func count(p Plan) map[string]int {
	m := map[string]int{}
	for _, d := range p.Placements {
		m[d.Node]++
	}
	return m
}

func TestSpreadBalancesAndBinpackFills(t *testing.T) {
	s := Snapshot{Nodes: nodes(3, 16, 8192), Pending: vms(9, 1, 512)}
	p := Schedule(s, Options{CPUOvercommit: 1})
	if c := count(p); c["n00"] != 3 || c["n01"] != 3 || c["n02"] != 3 {
		t.Fatalf("spread: %v", c)
	}
	p = Schedule(s, Options{Strategy: Binpack, CPUOvercommit: 1})
	if c := count(p); c["n00"] != 9 {
		t.Fatalf("binpack: %v", c)
	}
}

func TestCapacityIsNeverExceededWithinARound(t *testing.T) {
	s := Snapshot{Nodes: nodes(2, 64, 4096), Pending: vms(10, 1, 1024)}
	s.Nodes[0].ReservedMemoryMiB = 1024
	p := Schedule(s, Options{CPUOvercommit: 1})
	if c := count(p); c["n00"] != 3 || c["n01"] != 4 {
		t.Fatalf("placements %v, want 3 on n00 (1GiB reserved) and 4 on n01", c)
	}
	if len(p.Failures) != 3 {
		t.Fatalf("want 3 failures, got %d", len(p.Failures))
	}
	f := p.Failures[0]
	if f.Reasons[ReasonMemory] != 2 || !strings.Contains(f.Message, "2 nodes: insufficient memory (needs 1GiB, largest free 0B)") {
		t.Fatalf("failure %+v", f)
	}
}

func TestPlacedVMsUseCapacity(t *testing.T) {
	s := Snapshot{Nodes: nodes(2, 8, 2048)}
	s.Placed = []VM{{Name: "big", VCPUs: 1, MemoryMiB: 2048, Node: "n00"}, {Name: "gone", MemoryMiB: 99999, Node: "dead-node"}}
	s.Pending = vms(1, 1, 1024)
	p := Schedule(s, Options{CPUOvercommit: 1})
	if len(p.Placements) != 1 || p.Placements[0].Node != "n01" {
		t.Fatalf("%+v", p)
	}
}

func TestFilters(t *testing.T) {
	base := nodes(3, 4, 8192)
	base[0].Labels = map[string]string{"rack": "a", "ssd": "yes"}
	base[1].Labels = map[string]string{"rack": "b"}
	base[2].Unschedulable = "cordoned"
	base[1].Uplink = true
	base[0].Features = []string{"disks", "networks"}
	base[1].Features = []string{"networks"}
	cases := []struct {
		name    string
		vms     []VM
		opts    Options
		want    map[string]int
		reasons map[string]int
	}{
		{
			name: "selector",
			vms:  []VM{{Name: "a", VCPUs: 1, MemoryMiB: 1, Selector: map[string]string{"ssd": "yes"}}},
			want: map[string]int{"n00": 1},
		},
		{
			name:    "selector matches nothing",
			vms:     []VM{{Name: "a", VCPUs: 1, MemoryMiB: 1, Selector: map[string]string{"gpu": "yes"}}},
			want:    map[string]int{},
			reasons: map[string]int{ReasonSelector: 2, ReasonUnschedulable + ": cordoned": 1},
		},
		{
			name: "anti-affinity spreads a group, then runs out",
			vms: []VM{
				{Name: "a", UID: 1, VCPUs: 1, MemoryMiB: 1, AntiAffinity: "db"},
				{Name: "b", UID: 2, VCPUs: 1, MemoryMiB: 1, AntiAffinity: "db"},
				{Name: "c", UID: 3, VCPUs: 1, MemoryMiB: 1, AntiAffinity: "db"},
			},
			opts:    Options{Strategy: Binpack},
			want:    map[string]int{"n00": 1, "n01": 1},
			reasons: map[string]int{ReasonAntiAffinity: 2, ReasonUnschedulable + ": cordoned": 1},
		},
		{
			name:    "cpu overcommit 1: 4 vCPUs per node",
			vms:     []VM{{Name: "a", VCPUs: 5, MemoryMiB: 1}},
			opts:    Options{CPUOvercommit: 1},
			want:    map[string]int{},
			reasons: map[string]int{ReasonCPU: 2, ReasonUnschedulable + ": cordoned": 1},
		},
		{
			name:    "a VLAN network: only the node with an uplink",
			vms:     []VM{{Name: "a", UID: 1, VCPUs: 1, MemoryMiB: 1, VLANs: true}, {Name: "b", UID: 2, VCPUs: 4, MemoryMiB: 1, VLANs: true}},
			want:    map[string]int{"n01": 1},
			reasons: map[string]int{ReasonUplink: 1, ReasonCPU: 1, ReasonUnschedulable + ": cordoned": 1},
		},
		{
			name:    "a spec feature only one agent has",
			vms:     []VM{{Name: "a", UID: 1, VCPUs: 1, MemoryMiB: 1, Needs: []string{"disks"}}, {Name: "b", UID: 2, VCPUs: 8, MemoryMiB: 1, Needs: []string{"disks", "networks"}}},
			opts:    Options{CPUOvercommit: 2},
			want:    map[string]int{"n00": 1},
			reasons: map[string]int{ReasonFeature: 1, ReasonCPU: 1, ReasonUnschedulable + ": cordoned": 1},
		},
		{
			name: "cpu overcommit 2: 8 vCPUs per node",
			vms:  []VM{{Name: "a", VCPUs: 5, MemoryMiB: 1}},
			opts: Options{CPUOvercommit: 2},
			want: map[string]int{"n00": 1},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			// The fused checks (the default) and the same checks one by one (a list that does not
			// start with Placement's) must agree.
			unfused := append([]Checker{Excluding("none", nil)}, Placement()...)
			for _, checks := range [][]Checker{nil, unfused} {
				p := Schedule(Snapshot{Nodes: base, Pending: c.vms, Checkers: checks}, c.opts)
				got := count(p)
				if fmt.Sprint(got) != fmt.Sprint(c.want) {
					t.Fatalf("placements %v, want %v (fused %v)", got, c.want, checks == nil)
				}
				if c.reasons != nil {
					if len(p.Failures) != 1 || fmt.Sprint(p.Failures[0].Reasons) != fmt.Sprint(c.reasons) {
						t.Fatalf("failures %+v, want reasons %v (fused %v)", p.Failures, c.reasons, checks == nil)
					}
				}
			}
		})
	}
}

func TestNoNodes(t *testing.T) {
	p := Schedule(Snapshot{Pending: vms(1, 1, 1)}, Options{})
	if len(p.Failures) != 1 || p.Failures[0].Message != "no live nodes" {
		t.Fatalf("%+v", p)
	}
}

// The scheduler must stay pure: no etcd, no libvirt, no network.
func TestSchedulerImportsNoIO(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, banned := range []string{"go.etcd.io/", "libvirt.org/", "net/http", "github.com/herdhq/herd/lib/etcdutil"} {
			if strings.HasPrefix(dep, banned) {
				t.Errorf("scheduler depends on %s", dep)
			}
		}
	}
}

// TestLargeClustersScoreASample: past 100 nodes a placement scores a bounded share of the feasible
// nodes, starting where the previous one stopped, so a round is no longer VMs x nodes; the spread
// stays even, a VM feasible on one node of 10,000 still finds it, and one that fits nowhere still
// hears about every node.
func TestLargeClustersScoreASample(t *testing.T) {
	if l := scoreLimit(10000); l != 500 {
		t.Fatalf("10,000 nodes: %d scored", l)
	}
	if l := scoreLimit(3); l != 3 {
		t.Fatalf("3 nodes: %d scored", l)
	}
	ns := make([]Node, 10000)
	for i := range ns {
		ns[i] = Node{HWID: fmt.Sprintf("n%05d", i), CPUs: 64, MemoryMiB: 64 << 10}
	}
	ns[9999].Labels = map[string]string{"gpu": "yes"}
	pending := vms(20000, 1, 1024)
	p := Schedule(Snapshot{Nodes: ns, Pending: pending}, Options{CPUOvercommit: 1})
	c := count(p)
	if len(p.Placements) != 20000 || len(c) != 10000 {
		t.Fatalf("%d placed on %d nodes", len(p.Placements), len(c))
	}
	for n, k := range c {
		if k != 2 {
			t.Fatalf("%s has %d VMs: the spread is uneven", n, k)
		}
	}
	gpu := VM{Name: "gpu", UID: 1, VCPUs: 1, MemoryMiB: 1024, Selector: map[string]string{"gpu": "yes"}}
	huge := VM{Name: "huge", UID: 2, VCPUs: 1, MemoryMiB: 1 << 20}
	p = Schedule(Snapshot{Nodes: ns, Pending: []VM{gpu, huge}}, Options{CPUOvercommit: 1})
	if len(p.Placements) != 1 || p.Placements[0].Node != "n09999" {
		t.Fatalf("the one node with the label: %+v", p.Placements)
	}
	if len(p.Failures) != 1 || p.Failures[0].Reasons[ReasonMemory] != 10000 {
		t.Fatalf("a VM that fits nowhere: %+v", p.Failures)
	}
}

// BenchmarkSchedule10kOver1k is the scheduler alone: 10,000 pending VMs over 1,000 nodes in one
// round. Reported as decisions/s.
func BenchmarkSchedule10kOver1k(b *testing.B) { benchSchedule(b, 1000, 10000) }

// BenchmarkSchedule100kOver10k: 100,000 pending VMs over 10,000 nodes, the scale rig's size.
func BenchmarkSchedule100kOver10k(b *testing.B) { benchSchedule(b, 10000, 100000) }

func benchSchedule(b *testing.B, nodeCount, vmCount int) {
	s := Snapshot{Nodes: nodes(nodeCount, 64, 256<<10), Pending: vms(vmCount, 2, 4096)}
	for i := range s.Nodes {
		s.Nodes[i].Labels = map[string]string{"rack": fmt.Sprint(i % 20)}
	}
	for i := range s.Pending {
		if i%10 == 0 {
			s.Pending[i].AntiAffinity = fmt.Sprintf("g%d", i%50)
		}
	}
	b.ResetTimer()
	var placed int
	for range b.N {
		p := Schedule(s, Options{CPUOvercommit: 4})
		placed = len(p.Placements)
	}
	b.StopTimer()
	if placed != len(s.Pending) {
		b.Fatalf("placed %d of %d", placed, len(s.Pending))
	}
	b.ReportMetric(float64(len(s.Pending))*float64(b.N)/b.Elapsed().Seconds(), "decisions/s")
}
