// Package scheduler decides where VMs run. It is pure: Schedule takes a Snapshot and returns a Plan,
// doing no I/O, so it is tested and benchmarked without etcd. The coordinator's leader builds the
// snapshot from its watch-fed caches and commits the plan with guarded transactions.
//
// The shape follows Nomad's scheduler: one small checker per constraint, cheapest first, each
// rejection recorded under a named reason; then a ranker scores the feasible nodes.
package scheduler

import (
	"fmt"
	"math"
	"sort"
	"strings"

	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/units"
)

// Node is a live node as the scheduler sees it.
type Node struct {
	HWID              string
	CPUs              int
	MemoryMiB         int64
	ReservedMemoryMiB int64
	Labels            map[string]string
	// BootDir is where the node allows direct kernel boot files ("" allows none).
	BootDir string
	// Unschedulable, when set, says why no new VM may go here (cordoned, not enrolled, ...).
	Unschedulable string
}

// VM is a VM to place, or one already placed (Node set), which uses capacity.
type VM struct {
	Name         string
	UID          int64
	VCPUs        int
	MemoryMiB    int64
	Selector     map[string]string
	AntiAffinity string
	// BootPaths are the direct kernel boot files the VM needs on its node (clean, absolute).
	BootPaths []string
	Node      string
}

// Snapshot is everything a decision depends on.
type Snapshot struct {
	Nodes   []Node
	Placed  []VM // VMs that use capacity now (Node set)
	Pending []VM // VMs to place, in the order they should be considered
}

// Strategy picks among feasible nodes.
type Strategy string

const (
	// Spread puts each VM on the node with the most free memory (fraction), keeping headroom
	// everywhere: the default, because a node loss then displaces the fewest VMs.
	Spread Strategy = "spread"
	// Binpack fills nodes before using new ones, leaving whole nodes free for big VMs or drains.
	Binpack Strategy = "binpack"
)

// Options tune the scheduler.
type Options struct {
	Strategy Strategy
	// CPUOvercommit is how many vCPUs each host CPU may carry (e.g. 4.0).
	CPUOvercommit float64
}

// Decision places one VM.
type Decision struct {
	VM   string
	UID  int64
	Node string
}

// Failure explains why a VM fits nowhere.
type Failure struct {
	VM      string
	UID     int64
	Reasons map[string]int // reason -> number of nodes rejected for it
	Message string
}

// Plan is the scheduler's output.
type Plan struct {
	Placements []Decision
	Failures   []Failure
}

// Rejection reasons, shown to operators.
const (
	ReasonNoNodes       = "no live nodes"
	ReasonSelector      = "node selector does not match"
	ReasonAntiAffinity  = "anti-affinity group already on node"
	ReasonMemory        = "insufficient memory"
	ReasonCPU           = "insufficient vCPUs"
	ReasonUnschedulable = "unschedulable"
	ReasonBootDir       = "kernel boot path outside the node's boot directory"
)

// nodeUse tracks one node's capacity as the round proceeds.
type nodeUse struct {
	Node
	allocMiB  int64 // memory the scheduler may hand out (after the host reservation)
	usedMiB   int64
	maxVCPUs  int
	usedVCPUs int
	groups    map[string]int
}

func (n *nodeUse) freeMiB() int64 { return n.allocMiB - n.usedMiB }

// Schedule places as many pending VMs as fit, in order, accounting each placement before the next
// decision so that one round never overfills a node.
func Schedule(s Snapshot, o Options) Plan {
	if o.CPUOvercommit <= 0 {
		o.CPUOvercommit = 1
	}
	nodes := make([]*nodeUse, 0, len(s.Nodes))
	byID := make(map[string]*nodeUse, len(s.Nodes))
	for _, n := range s.Nodes {
		u := &nodeUse{
			Node:     n,
			allocMiB: n.MemoryMiB - n.ReservedMemoryMiB,
			maxVCPUs: int(math.Floor(float64(n.CPUs) * o.CPUOvercommit)),
		}
		nodes = append(nodes, u)
		byID[n.HWID] = u
	}
	// Deterministic iteration: equal scores break ties by hwid.
	sort.Slice(nodes, func(i, j int) bool { return nodes[i].HWID < nodes[j].HWID })
	for _, vm := range s.Placed {
		if u := byID[vm.Node]; u != nil {
			u.add(vm)
		}
	}
	var plan Plan
	for _, vm := range s.Pending {
		best, reasons := pick(nodes, vm, o.Strategy)
		if best == nil {
			plan.Failures = append(plan.Failures, Failure{VM: vm.Name, UID: vm.UID, Reasons: reasons, Message: explain(vm, nodes, reasons)})
			continue
		}
		best.add(vm)
		plan.Placements = append(plan.Placements, Decision{VM: vm.Name, UID: vm.UID, Node: best.HWID})
	}
	return plan
}

func (n *nodeUse) add(vm VM) {
	n.usedMiB += vm.MemoryMiB
	n.usedVCPUs += vm.VCPUs
	if vm.AntiAffinity != "" {
		if n.groups == nil {
			n.groups = map[string]int{}
		}
		n.groups[vm.AntiAffinity]++
	}
}

// feasible runs the checkers, cheapest first, and returns the first reason to reject, or "".
func feasible(n *nodeUse, vm VM) string {
	if n.Unschedulable != "" {
		return ReasonUnschedulable + ": " + n.Unschedulable
	}
	for k, v := range vm.Selector {
		if n.Labels[k] != v {
			return ReasonSelector
		}
	}
	for _, p := range vm.BootPaths {
		if n.BootDir == "" || !keys.InDir(p, n.BootDir) {
			return ReasonBootDir
		}
	}
	if vm.AntiAffinity != "" && n.groups[vm.AntiAffinity] > 0 {
		return ReasonAntiAffinity
	}
	if n.freeMiB() < vm.MemoryMiB {
		return ReasonMemory
	}
	if n.usedVCPUs+vm.VCPUs > n.maxVCPUs {
		return ReasonCPU
	}
	return ""
}

// score ranks a feasible node for vm: higher is better.
func score(n *nodeUse, vm VM, st Strategy) float64 {
	if n.allocMiB <= 0 {
		return 0
	}
	freeAfter := float64(n.freeMiB()-vm.MemoryMiB) / float64(n.allocMiB)
	cpuFreeAfter := 1.0
	if n.maxVCPUs > 0 {
		cpuFreeAfter = float64(n.maxVCPUs-n.usedVCPUs-vm.VCPUs) / float64(n.maxVCPUs)
	}
	// Memory dominates: it is the resource that cannot be overcommitted.
	free := 0.8*freeAfter + 0.2*cpuFreeAfter
	if st == Binpack {
		return 1 - free
	}
	return free
}

func pick(nodes []*nodeUse, vm VM, st Strategy) (*nodeUse, map[string]int) {
	var best *nodeUse
	bestScore := math.Inf(-1)
	var reasons map[string]int
	for _, n := range nodes {
		if r := feasible(n, vm); r != "" {
			if reasons == nil {
				reasons = map[string]int{}
			}
			reasons[r]++
			continue
		}
		if sc := score(n, vm, st); sc > bestScore {
			best, bestScore = n, sc
		}
	}
	if best == nil && len(nodes) == 0 {
		reasons = map[string]int{ReasonNoNodes: 0}
	}
	return best, reasons
}

// explain turns rejection counts into one line: "3 nodes: insufficient memory (largest free 15GiB,
// needs 64GiB); 1 node: unschedulable: cordoned".
func explain(vm VM, nodes []*nodeUse, reasons map[string]int) string {
	if len(nodes) == 0 {
		return "no live nodes"
	}
	names := make([]string, 0, len(reasons))
	for r := range reasons {
		names = append(names, r)
	}
	sort.Slice(names, func(i, j int) bool {
		if reasons[names[i]] != reasons[names[j]] {
			return reasons[names[i]] > reasons[names[j]]
		}
		return names[i] < names[j]
	})
	parts := make([]string, 0, len(names))
	for _, r := range names {
		n := reasons[r]
		noun := "nodes"
		if n == 1 {
			noun = "node"
		}
		detail := ""
		switch r {
		case ReasonMemory:
			var largest int64
			for _, u := range nodes {
				if feasible(u, VM{}) == "" && u.freeMiB() > largest {
					largest = u.freeMiB()
				}
			}
			detail = fmt.Sprintf(" (needs %s, largest free %s)", units.FormatMiB(vm.MemoryMiB), units.FormatMiB(max(largest, 0)))
		case ReasonCPU:
			detail = fmt.Sprintf(" (needs %d)", vm.VCPUs)
		}
		parts = append(parts, fmt.Sprintf("%d %s: %s%s", n, noun, r, detail))
	}
	return fmt.Sprintf("fits on none of %d nodes: %s", len(nodes), strings.Join(parts, "; "))
}
