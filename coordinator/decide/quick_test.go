package decide

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/herdhq/herd/coordinator/scheduler"
	"github.com/herdhq/herd/lib/keys"
)

// touchedVMs is what the coordinator's watch handlers tell the leader loop about the keys written
// since the last round: the VMs whose records changed, and whether anything else did (a full round).
func (w *world) touchedVMs() (names []string, other bool) {
	seen := map[string]bool{}
	for k := range w.touched {
		name := ""
		if n, _, ok := w.sp.ParseVM(k); ok {
			name = n
		} else if n, ok := keys.ParseVMName(w.sp.PlacementPrefix(), k); ok {
			name = n
		} else if n, ok := keys.ParseVMName(w.sp.ProblemPrefix(), k); ok {
			name = n
		} else if _, n, ok := keys.ParseNodeScoped(w.sp.AssignRoot(), k); ok {
			name = n
		} else if _, n, ok := keys.ParseNodeScoped(w.sp.StatusRoot(), k); ok {
			name = n
		} else {
			other = true
			continue
		}
		seen[name] = true
	}
	clear(w.touched)
	return append([]string{}, slices.Sorted(maps.Keys(seen))...), other
}

// byObject files a plan's actions' kinds by the object they are about.
func byObject(p Plan) map[string][]string {
	out := map[string][]string{}
	for _, a := range p.Actions {
		out[a.Object] = append(out[a.Object], a.What)
	}
	for _, v := range out {
		slices.Sort(v)
	}
	return out
}

func copyState(st *State) *State {
	return &State{Absent: maps.Clone(st.Absent), LostAt: maps.Clone(st.LostAt), MigFailed: maps.Clone(st.MigFailed), LastAdopt: st.LastAdopt}
}

// TestQuickRoundsDecideAsFullRounds drives random clusters (VMs created, changed, broken and
// deleted; agents reporting, crash-looping and reporting from the wrong node; migrate requests;
// nodes cordoned, lost, fenced and back) and runs a quick round whenever only VMs' records changed,
// as the coordinator does. For every VM a quick round decides about, a full round on the same
// snapshot must decide the same actions; a VM it cannot decide as the full round would must make it
// ask for a full round. At the end every VM runs at most once.
func TestQuickRoundsDecideAsFullRounds(t *testing.T) {
	var quick, full, asked, compared int
	for seed := uint64(1); seed <= 25; seed++ {
		rng := rand.New(rand.NewPCG(seed, 7))
		w := newWorld(t)
		nodes := []string{"n1", "n2", "n3", "n4", "n5"}
		for _, n := range nodes {
			w.node(n, 8, 32)
		}
		w.settle()
		ledger := ledgerOf(w.snapshot())
		clear(w.touched)
		var vms []string
		crashed := map[string]bool{}
		pick := func() string {
			if len(vms) == 0 {
				return ""
			}
			return vms[rng.IntN(len(vms))]
		}
		for step := range 120 {
			for range 1 + rng.IntN(3) {
				name := pick()
				specced := name != "" && w.has(w.sp.VMSpec(name))
				switch r := rng.IntN(100); {
				case r < 30 || name == "":
					name = fmt.Sprintf("vm%03d", len(vms))
					vms = append(vms, name)
					mem := int64(256 << rng.IntN(5))
					if rng.IntN(20) == 0 {
						mem = 200 << 10 // fits nowhere
					}
					w.vm(name, 1+rng.IntN(3), mem)
				case r < 50:
					if on := w.placedOn(name); specced && on != "" && !crashed[on] {
						w.report(on, name, keys.StateRunning)
					}
				case r < 60:
					if w.has(w.sp.VMSpec(name)) {
						w.vm(name, 1+rng.IntN(3), int64(256<<rng.IntN(4)))
					}
				case r < 64:
					if w.has(w.sp.VMSpec(name)) {
						w.put(w.sp.VMSpec(name), &keys.VMSpec{VCPUs: 0, MemoryMiB: 512}, 0)
					}
				case r < 70:
					w.del(w.sp.VMSpec(name))
				case r < 74:
					if w.placedOn(name) != "" {
						w.put(w.sp.VMMigrate(name), &keys.MigrateRequest{Requested: w.now}, 0)
					}
				case r < 78:
					if on := w.placedOn(name); specced && on != "" && !crashed[on] {
						w.report(on, name, keys.StateCrashLoop, func(st *keys.VMStatus) { st.Message = "guest panicked" })
					}
				case r < 82:
					// A domain of the VM reported where it is not placed.
					if on := w.placedOn(name); specced && on != "" {
						other := nodes[rng.IntN(len(nodes))]
						if other != on && !crashed[other] {
							w.report(other, name, keys.StateRunning)
						}
					}
				case r < 88:
					n := nodes[rng.IntN(len(nodes))]
					w.put(w.sp.NodeSpec(n), &keys.NodeSpec{Cordoned: rng.IntN(2) == 0, Drain: rng.IntN(4) == 0}, 0)
				case r < 92:
					n := nodes[rng.IntN(len(nodes))]
					if crashed[n] {
						w.register(n, fmt.Sprintf("boot-%d", step), 8, 32)
						delete(crashed, n)
					} else if len(crashed) < 2 {
						w.crash(n)
						crashed[n] = true
					}
				case r < 96:
					for n := range crashed {
						if w.has(w.sp.Fence(n, "boot-1")) && get[keys.Fence](w, w.sp.Fence(n, "boot-1")).Phase == keys.FenceFencing {
							w.fenceOutcome(n, "boot-1", keys.FenceFenced)
						}
					}
				default:
					w.advance(w.cfg.Grace)
				}
			}
			w.advance(time.Second)
			names, other := w.touchedVMs()
			snap := w.snapshot()
			for _, n := range names {
				ledger.Set(n, snap.VMs[n])
			}
			fresh := ledgerOf(snap)
			if f1, h1 := ledger.Quick(names); !sameQuick(f1, h1, fresh, names) {
				t.Fatalf("seed %d step %d: the ledger kept change by change differs from one made afresh", seed, step)
			}
			if other {
				w.round()
				full++
				continue
			}
			fp := Decide(snap, copyState(w.st), w.cfg)
			qs := quickSnapshot(snap, ledger, names)
			if step%2 == 0 {
				qs.Trusted = fp.Trusted // the full round's judgement of the same nodes, as the coordinator hands it on
			}
			qp := Decide(qs, w.st, w.cfg)
			want, got := byObject(fp), byObject(qp)
			for _, name := range qp.decided {
				compared++
				if obj := "vm/" + name; !slices.Equal(want[obj], got[obj]) {
					var notes []string
					for _, a := range fp.Actions {
						if a.Object == obj {
							for _, n := range a.Notes {
								notes = append(notes, n.Message)
							}
						}
					}
					t.Fatalf("seed %d step %d: %s: the quick round decided %v, a full round %v %q (focus %v; its problem now: %q)", seed, step, name, got[obj], want[obj], notes, names, w.problem(name))
				}
			}
			for obj := range got {
				if !slices.Contains(qp.decided, strings.TrimPrefix(obj, "vm/")) {
					t.Fatalf("seed %d step %d: the quick round acted on %s, which it did not decide about: %v", seed, step, obj, got[obj])
				}
			}
			w.apply(qp)
			quick++
			if qp.Full != "" {
				asked++
				w.round()
				full++
			}
		}
		for n := range crashed {
			w.register(n, "boot-back", 8, 32)
		}
		for range 30 {
			w.advance(w.cfg.Grace)
			for _, n := range nodes {
				for _, name := range vms {
					if w.has(w.sp.Assign(n, name)) {
						a := get[keys.Assignment](w, w.sp.Assign(n, name))
						if a.Withdraw {
							w.del(w.sp.Status(n, name))
							w.del(w.sp.Assign(n, name))
						}
					}
				}
			}
			w.round()
		}
		for _, name := range vms {
			if r := w.runnable(name); len(r) > 1 {
				t.Fatalf("seed %d: %s runnable on %v", seed, name, r)
			}
		}
	}
	t.Logf("%d quick rounds (%d asked for a full one), %d full rounds, %d VM decisions compared", quick, asked, full, compared)
	if compared < 1000 || asked == 0 {
		t.Fatalf("the random walk did not exercise quick rounds enough: %d compared, %d asked for full", compared, asked)
	}
}

// ledgerOf is a ledger made afresh from a snapshot's VMs.
func ledgerOf(snap *Snapshot) *Ledger {
	l := NewLedger()
	for n, v := range snap.VMs {
		l.Set(n, v)
	}
	return l
}

// quickSnapshot is what the coordinator's observe builds for a quick round: the focus VMs' records
// only, with the ledger's account of the rest.
func quickSnapshot(full *Snapshot, l *Ledger, dirty []string) *Snapshot {
	q := *full
	q.Focus, q.Held = l.Quick(dirty)
	q.VMs, q.Assigns, q.Reports = map[string]*VM{}, map[string]map[string]*rec[keys.Assignment]{}, map[string]map[string]*rec[keys.VMStatus]{}
	for _, n := range q.Focus {
		if v := full.VMs[n]; v != nil {
			q.VMs[n] = v
		}
		if a := full.Assigns[n]; a != nil {
			q.Assigns[n] = a
		}
		if r := full.Reports[n]; r != nil {
			q.Reports[n] = r
		}
	}
	q.Occupied = map[string]bool{}
	for hwid := range full.Fences {
		q.Occupied[hwid] = l.Occupied(hwid)
	}
	return &q
}

// sameQuick compares a ledger's quick round preparation with a fresh ledger's.
func sameQuick(focus []string, held []scheduler.VM, fresh *Ledger, dirty []string) bool {
	f2, h2 := fresh.Quick(dirty)
	key := func(v scheduler.VM) string {
		return fmt.Sprintf("%s/%s/%d/%d", v.Node, v.AntiAffinity, v.VCPUs, v.MemoryMiB)
	}
	a, b := make([]string, 0, len(held)), make([]string, 0, len(h2))
	for _, v := range held {
		a = append(a, key(v))
	}
	for _, v := range h2 {
		b = append(b, key(v))
	}
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(focus, f2) && slices.Equal(a, b)
}

// TestQuickRoundsLeaveDrainsAndRolloutsToFullRounds: whether a drain is done, and with it a
// rollout's next step, follows the VMs leaving the node, which only a full round counts: while
// either is under way every round is full.
func TestQuickRoundsLeaveDrainsAndRolloutsToFullRounds(t *testing.T) {
	w := newWorld(t)
	w.node("n1", 8, 32)
	w.node("n2", 8, 32)
	w.vm("a", 1, 512)
	w.settle()
	quick := func() Plan {
		snap := w.snapshot()
		return Decide(quickSnapshot(snap, ledgerOf(snap), []string{}), w.st, w.cfg)
	}
	if p := quick(); p.Full != "" {
		t.Fatalf("a settled cluster's quick round asks for a full one: %s", p.Full)
	}
	on := w.placedOn("a")
	w.put(w.sp.NodeSpec(on), &keys.NodeSpec{Cordoned: true, Drain: true}, 0)
	w.round()
	if p := quick(); !strings.Contains(string(p.Full), "drained") {
		t.Fatalf("a quick round during a drain: full %q", p.Full)
	}
	w.put(w.sp.NodeSpec(on), &keys.NodeSpec{}, 0)
	w.round()
	w.put(w.sp.Rollout(), &keys.Rollout{ID: "r1", Image: "v2", MaxUnavailable: 1, Nodes: []string{"n1", "n2"}}, 0)
	if p := quick(); !strings.Contains(string(p.Full), "rollout") {
		t.Fatalf("a quick round during a rollout: full %q", p.Full)
	}
}
