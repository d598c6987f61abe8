package decide

import (
	"strings"
	"testing"
	"time"

	"github.com/herdhq/herd/lib/keys"
)

func TestFailover(t *testing.T) {
	cases := []struct {
		name  string
		check func(t *testing.T, w *world)
	}{
		{"a node gone within the grace period is waited for", func(t *testing.T, w *world) {
			w.crash("n1")
			p := w.decide()
			if hasPrefix(actions(p), "commit fence") || p.After <= 0 || p.After > w.cfg.Grace+time.Second {
				t.Fatalf("actions %v after %s", actions(p), p.After)
			}
		}},
		{"after the grace period the fence record is committed, conditioned on the node key still absent", func(t *testing.T, w *world) {
			w.crash("n1")
			w.round()
			w.advance(6 * time.Second)
			p := w.decide()
			var commit *Action
			for i := range p.Actions {
				if p.Actions[i].What == "commit fence" {
					commit = &p.Actions[i]
				}
			}
			if commit == nil {
				t.Fatalf("actions %v", actions(p))
			}
			if !containsCond(commit.Conds, CreateRev(w.sp.Node("n1"), 0)) {
				t.Fatalf("conds %+v", commit.Conds)
			}
			if p.Count(MetricNodeLost) != 1 {
				t.Fatal("a loss is counted")
			}
			// The node came back just before the write: the fence must not commit.
			w.register("n1", "boot-1", 4, 8)
			if got := w.apply(p); contains(got, "commit fence node/n1") {
				t.Fatal("fenced a node that is back")
			}
		}},
		{"a committed fence asks for the fencer, once per record revision", func(t *testing.T, w *world) {
			w.lose("n1")
			p := w.decide()
			if got := works(p); len(got) != 1 || got[0] != "fence "+w.sp.Fence("n1", "boot-1") {
				t.Fatalf("work %v", got)
			}
			wk := p.Work[0]
			if wk.Rev != w.kv[w.sp.Fence("n1", "boot-1")].mod || wk.Target.HWID != "n1" || wk.Target.BootID != "boot-1" || len(wk.Target.VMs) != 1 {
				t.Fatalf("work %+v", wk)
			}
			// Fencing: the VMs stay placed, with a problem saying why.
			w.settle()
			onN1 := vmOn(w, "n1")
			if w.placedOn(onN1) != "n1" || !strings.HasPrefix(w.problem(onN1), keys.ProblemNodeLost) {
				t.Fatalf("%s on %q, problem %q", onN1, w.placedOn(onN1), w.problem(onN1))
			}
		}},
		{"once fenced, the node's VMs move with epoch + 1 and the old assignment goes", func(t *testing.T, w *world) {
			w.lose("n1")
			onN1 := vmOn(w, "n1")
			w.fenceOutcome("n1", "boot-1", keys.FenceFenced)
			p := w.decide()
			if !contains(actions(p), "move vm/"+onN1) || p.Count(MetricMove) != 1 {
				t.Fatalf("actions %v", actions(p))
			}
			w.apply(p)
			pl := get[keys.Placement](w, w.sp.Placement(onN1))
			if pl.Node != "n2" || pl.Epoch != 2 || w.has(w.sp.Assign("n1", onN1)) || w.has(w.sp.Status("n1", onN1)) {
				t.Fatalf("placement %+v", pl)
			}
			if got := w.runnable(onN1); len(got) != 1 || got[0] != "n2" {
				t.Fatalf("runnable on %v", got)
			}
		}},
		{"a move is conditioned on the fence record as read", func(t *testing.T, w *world) {
			w.lose("n1")
			onN1 := vmOn(w, "n1")
			w.fenceOutcome("n1", "boot-1", keys.FenceFenced)
			p := w.decide()
			// An operator clears the fence between the read and the write.
			w.fenceOutcome("n1", "boot-1", keys.FenceClearing)
			if got := w.apply(p); contains(got, "move vm/"+onN1) {
				t.Fatal("moved on a fence that changed")
			}
		}},
		{"a Ceph fence's osdmap epoch reaches the new assignment", func(t *testing.T, w *world) {
			w.lose("n1")
			onN1 := vmOn(w, "n1")
			f := get[keys.Fence](w, w.sp.Fence("n1", "boot-1"))
			f.Phase, f.Details = keys.FenceFenced, map[string]string{"osdmap_epoch": "42"}
			w.put(w.sp.Fence("n1", "boot-1"), f, 0)
			w.round()
			if a := get[keys.Assignment](w, w.sp.Assign("n2", onN1)); a.MinOSDMapEpoch != 42 {
				t.Fatalf("min osdmap epoch %d", a.MinOSDMapEpoch)
			}
		}},
		{"a failed fence leaves the VMs placed and retries after a backoff", func(t *testing.T, w *world) {
			w.lose("n1")
			onN1 := vmOn(w, "n1")
			w.fenceOutcome("n1", "boot-1", keys.FenceFailed)
			w.settle()
			if w.placedOn(onN1) != "n1" || !strings.Contains(w.problem(onN1), "fencing failed") {
				t.Fatalf("%s on %q problem %q", onN1, w.placedOn(onN1), w.problem(onN1))
			}
			p := w.decide()
			if len(p.Work) != 0 || p.After <= 0 {
				t.Fatalf("work %v after %s", works(p), p.After)
			}
			w.advance(FenceBackoff(1))
			if got := works(w.decide()); len(got) != 1 || !strings.HasPrefix(got[0], "fence ") {
				t.Fatalf("work after backoff %v", got)
			}
		}},
		{"a node key deleted by hand while its lease lives is no death", func(t *testing.T, w *world) {
			w.del(w.sp.Node("n1"))
			w.round()
			w.advance(time.Minute)
			w.settle()
			if w.has(w.sp.Fence("n1", "boot-1")) {
				t.Fatal("fenced a node whose lease lives")
			}
		}},
		{"a clean departure is no death", func(t *testing.T, w *world) {
			w.left["n1"] = "boot-1"
			w.crash("n1")
			w.settle()
			w.advance(time.Minute)
			w.settle()
			if w.has(w.sp.Fence("n1", "boot-1")) || !get[keys.NodeState](w, w.sp.NodeState("n1")).Left {
				t.Fatal("a departure was taken for a death")
			}
		}},
		{"a node with nothing placed is just down", func(t *testing.T, w *world) {
			w.node("n3", 4, 8)
			w.settle()
			w.crash("n3")
			w.round()
			w.advance(time.Minute)
			w.settle()
			if w.has(w.sp.Fence("n3", "boot-1")) {
				t.Fatal("fenced an empty node")
			}
		}},
		{"losing most nodes at once holds failover until an operator confirms", func(t *testing.T, w *world) {
			for _, n := range []string{"n3", "n4", "n5"} {
				w.node(n, 4, 8)
			}
			for _, n := range []string{"c", "d", "e", "f"} {
				w.vm(n, 1, 512)
			}
			w.settle()
			for _, n := range []string{"n1", "n2", "n3"} {
				w.crash(n)
			}
			w.round()
			w.advance(time.Minute)
			w.settle()
			if !w.has(w.sp.LossGuard()) {
				t.Fatal("no loss guard")
			}
			for _, n := range []string{"n1", "n2", "n3"} {
				if w.has(w.sp.Fence(n, "boot-1")) {
					t.Fatalf("%s fenced while held", n)
				}
			}
			// The operator confirms (herdctl cluster confirm-loss writes the request).
			g := w.kv[w.sp.LossGuard()]
			w.put(w.sp.ConfirmLossRequest(), &keys.Request{Of: g.create, By: "ops"}, 0)
			w.settle()
			if !get[keys.LossGuard](w, w.sp.LossGuard()).Confirmed || w.has(w.sp.ConfirmLossRequest()) {
				t.Fatal("not confirmed")
			}
			fenced := 0
			for _, n := range []string{"n1", "n2", "n3"} {
				if w.has(w.sp.Fence(n, "boot-1")) {
					fenced++
					w.fenceOutcome(n, "boot-1", keys.FenceFenced)
				}
			}
			if fenced == 0 {
				t.Fatal("nothing fenced after confirmation")
			}
			w.settle()
			if w.has(w.sp.LossGuard()) {
				t.Fatal("guard not released once every node was fenced")
			}
		}},
		{"nodes lost while held join the guard; a confirmation covers what the operator saw", func(t *testing.T, w *world) {
			all := []string{"n1", "n2", "n3", "n4", "n5", "n6", "n7"}
			for _, n := range all[2:] {
				w.node(n, 4, 8)
			}
			for _, n := range []string{"c", "d", "e", "f", "g", "h"} {
				w.vm(n, 1, 512)
			}
			w.settle()
			used := map[string]bool{}
			for _, n := range []string{"a", "b", "c", "d", "e", "f", "g", "h"} {
				used[w.placedOn(n)] = true
			}
			for _, n := range all {
				if !used[n] {
					t.Fatalf("nothing placed on %s", n)
				}
			}
			for _, n := range all[:4] {
				w.crash(n)
			}
			w.round()
			w.advance(time.Minute)
			w.settle()
			if g := get[keys.LossGuard](w, w.sp.LossGuard()); len(g.Nodes) != 4 {
				t.Fatalf("guard lists %v", g.Nodes)
			}
			w.crash("n5")
			w.settle()
			if g := get[keys.LossGuard](w, w.sp.LossGuard()); strings.Join(g.Nodes, ",") != "n1,n2,n3,n4,n5" {
				t.Fatalf("guard lists %v after a fifth loss", g.Nodes)
			}
			// The operator confirms what they saw before the fifth loss: ignored.
			g := w.kv[w.sp.LossGuard()]
			w.put(w.sp.ConfirmLossRequest(), &keys.Request{Of: g.create, By: "ops", Listed: 4}, 0)
			w.settle()
			if get[keys.LossGuard](w, w.sp.LossGuard()).Confirmed || w.has(w.sp.ConfirmLossRequest()) {
				t.Fatal("a confirmation of 4 nodes confirmed 5")
			}
			w.put(w.sp.ConfirmLossRequest(), &keys.Request{Of: g.create, By: "ops", Listed: 5}, 0)
			w.settle()
			if !get[keys.LossGuard](w, w.sp.LossGuard()).Confirmed {
				t.Fatal("not confirmed")
			}
			// A sixth node lost after the confirmation is not covered by it.
			w.crash("n6")
			w.round()
			w.advance(time.Minute)
			w.settle()
			if w.has(w.sp.Fence("n6", "boot-1")) {
				t.Fatal("a node lost after the confirmation was fenced under it")
			}
			if g := get[keys.LossGuard](w, w.sp.LossGuard()); len(g.Nodes) != 5 {
				t.Fatalf("a confirmed guard grew: %v", g.Nodes)
			}
			for _, n := range all[:5] {
				if !w.has(w.sp.Fence(n, "boot-1")) {
					t.Fatalf("%s not fenced after the confirmation", n)
				}
				w.fenceOutcome(n, "boot-1", keys.FenceFenced)
			}
			w.settle()
			// Released; n6 alone is no mass failure: judged anew, it is fenced after the grace.
			w.advance(time.Minute)
			w.settle()
			if w.has(w.sp.LossGuard()) && get[keys.LossGuard](w, w.sp.LossGuard()).Confirmed {
				t.Fatal("the confirmed guard was not released")
			}
			if !w.has(w.sp.Fence("n6", "boot-1")) {
				t.Fatal("n6 is still held after the confirmed nodes were done")
			}
		}},
		{"a node back with a new boot has its old boot's fence undone", func(t *testing.T, w *world) {
			w.lose("n1")
			w.fenceOutcome("n1", "boot-1", keys.FenceFenced)
			w.settle()
			w.register("n1", "boot-2", 4, 8)
			p := w.decide()
			if got := works(p); !contains(got, "unfence "+w.sp.Fence("n1", "boot-1")+"#unfence") {
				t.Fatalf("work %v", got)
			}
		}},
		{"a node back with a new boot takes no VM while its earlier boot's fence stands", func(t *testing.T, w *world) {
			w.lose("n1")
			w.fenceOutcome("n1", "boot-1", keys.FenceFenced)
			w.settle()
			w.register("n1", "boot-2", 4, 8)
			w.vm("z", 1, 512)
			w.settle()
			if on := w.placedOn("z"); on != "n2" {
				t.Fatalf("z placed on %q while n1's earlier boot's fence record stands", on)
			}
			w.del(w.sp.Fence("n1", "boot-1")) // the unfence work done
			w.vm("y", 1, 512)
			w.settle()
			if on := w.placedOn("y"); on != "n1" {
				t.Fatalf("y placed on %q: n1 is free again once the record is gone", on)
			}
		}},
		{"an operator's fence-clear request turns the record to clearing", func(t *testing.T, w *world) {
			w.lose("n1")
			f := w.kv[w.sp.Fence("n1", "boot-1")]
			w.put(w.sp.FenceClearRequest("n1", "boot-1"), &keys.Request{Of: f.create, By: "ops"}, 0)
			w.round()
			if get[keys.Fence](w, w.sp.Fence("n1", "boot-1")).Phase != keys.FenceClearing || w.has(w.sp.FenceClearRequest("n1", "boot-1")) {
				t.Fatal("not clearing")
			}
			if got := works(w.decide()); !hasPrefix(got, "unfence ") {
				t.Fatalf("work %v", got)
			}
		}},
		{"a fence-clear request naming an earlier record is dropped", func(t *testing.T, w *world) {
			w.lose("n1")
			w.put(w.sp.FenceClearRequest("n1", "boot-1"), &keys.Request{Of: 1, By: "ops"}, 0)
			if got := actions(w.decide()); !contains(got, "drop request request") {
				t.Fatalf("actions %v", got)
			}
			w.settle()
			if get[keys.Fence](w, w.sp.Fence("n1", "boot-1")).Phase != keys.FenceFencing {
				t.Fatal("a stale request cleared a fence")
			}
		}},
		{"moves off a fenced node are rate-limited", func(t *testing.T, w *world) {
			for _, n := range []string{"c", "d", "e"} {
				w.vm(n, 1, 256)
			}
			w.put(w.sp.NodeSpec("n2"), &keys.NodeSpec{Cordoned: true}, 0)
			w.settle()
			w.del(w.sp.NodeSpec("n2"))
			w.settle()
			w.lose("n1")
			w.fenceOutcome("n1", "boot-1", keys.FenceFenced)
			w.budget = 1
			p := w.decide()
			if p.Count(MetricMove) != 1 || p.After <= 0 {
				t.Fatalf("moves %d after %s", p.Count(MetricMove), p.After)
			}
		}},
		{"a fenced node's VM that fits nowhere stays placed with a node-lost problem", func(t *testing.T, w *world) {
			w.put(w.sp.NodeSpec("n2"), &keys.NodeSpec{Cordoned: true}, 0)
			w.lose("n1")
			w.fenceOutcome("n1", "boot-1", keys.FenceFenced)
			w.settle()
			onN1 := vmOn(w, "n1")
			if w.placedOn(onN1) != "n1" || !strings.Contains(w.problem(onN1), "no other node can take the VM") {
				t.Fatalf("%s on %q problem %q", onN1, w.placedOn(onN1), w.problem(onN1))
			}
		}},
		{"a node key without a lease is not trusted and the node counts as absent", func(t *testing.T, w *world) {
			n := get[keys.Node](w, w.sp.Node("n1"))
			w.put(w.sp.Node("n1"), n, 0)
			w.settle()
			if ns := get[keys.NodeState](w, w.sp.NodeState("n1")); !strings.Contains(ns.Doubt, "without a lease") {
				t.Fatalf("doubt %q", ns.Doubt)
			}
			// Its lease is gone (the key was rewritten without it): after the grace period it is
			// fenced, conditioned on exactly that untrusted key.
			delete(w.leases, get[keys.NodeState](w, w.sp.NodeState("n1")).Lease)
			w.round()
			w.advance(6 * time.Second)
			p := w.decide()
			if !contains(actions(p), "commit fence node/n1") {
				t.Fatalf("actions %v", actions(p))
			}
		}},
		{"a node key on a lease longer than nodes may take is not trusted", func(t *testing.T, w *world) {
			n := get[keys.Node](w, w.sp.Node("n1"))
			w.leases[9999] = time.Hour
			n.Lease = 9999
			w.put(w.sp.Node("n1"), n, 9999)
			w.settle()
			if ns := get[keys.NodeState](w, w.sp.NodeState("n1")); !strings.Contains(ns.Doubt, "more than") {
				t.Fatalf("doubt %q", ns.Doubt)
			}
		}},
		{"a node that reports more capacity than recorded is capped", func(t *testing.T, w *world) {
			w.register("n1", "boot-1", 64, 512)
			w.settle()
			ns := get[keys.NodeState](w, w.sp.NodeState("n1"))
			if ns.Capacity.CPUs != 4 || !strings.Contains(ns.Capped, "capped") {
				t.Fatalf("state %+v", ns)
			}
			w.vm("huge", 1, 100*1024)
			w.settle()
			if w.placedOn("huge") != "" {
				t.Fatal("placed on capacity the node may not offer")
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { c.check(t, steady(t)) })
	}
}

// vmOn names a VM placed on a node.
func vmOn(w *world, hwid string) string {
	for _, n := range []string{"a", "b", "c", "d", "e", "f"} {
		if w.placedOn(n) == hwid {
			return n
		}
	}
	w.t.Fatalf("nothing on %s", hwid)
	return ""
}

func containsCond(cs []Cond, c Cond) bool {
	for _, x := range cs {
		if x == c {
			return true
		}
	}
	return false
}
