package decide

import (
	"strings"
	"testing"
	"time"

	"github.com/herdhq/herd/lib/keys"
)

// rolling is the steady world with a rollout to image v2 over both nodes, one at a time.
func rolling(t *testing.T) *world {
	w := steady(t)
	w.put(w.sp.Rollout(), &keys.Rollout{ID: "r1", Image: "v2", MaxUnavailable: 1, Nodes: []string{"n1", "n2"},
		NodeTimeoutSeconds: 600, State: keys.RolloutRunning, Started: w.now}, 0)
	return w
}

func progress(w *world) *keys.RolloutStatus { return get[keys.RolloutStatus](w, w.sp.RolloutStatus()) }

// finishMigrations plays the targets of every open migration reporting the VM running.
func (w *world) finishMigrations() {
	for _, n := range []string{"a", "b", "c", "d"} {
		if !w.has(w.sp.Placement(n)) {
			continue
		}
		if pl := get[keys.Placement](w, w.sp.Placement(n)); pl.Migration != nil {
			w.report(pl.Migration.To, n, keys.StateRunning, func(st *keys.VMStatus) { st.Migration = pl.Migration.ID })
		}
	}
}

func TestRollout(t *testing.T) {
	t.Run("a node at a time: drain, reboot command for its boot, done when back on the image", func(t *testing.T) {
		w := rolling(t)
		w.round()
		ro := progress(w)
		if ro.Per["n1"].Phase != keys.PhaseDraining || ro.Per["n2"].Phase != keys.PhasePending {
			t.Fatalf("per node %+v %+v", ro.Per["n1"], ro.Per["n2"])
		}
		ns := get[keys.NodeState](w, w.sp.NodeState("n1"))
		if ns.Rollout != "r1" || ns.Image != "v2" {
			t.Fatalf("n1 state %+v", ns)
		}
		// n1 is drained by migrations; then the reboot command names its boot.
		for i := 0; i < 4; i++ {
			w.settle()
			w.finishMigrations()
		}
		w.settle()
		if progress(w).Per["n1"].Phase != keys.PhaseRebooting {
			t.Fatalf("n1 %+v (last %v)", progress(w).Per["n1"], actions(w.last))
		}
		cmd := get[keys.NodeCommand](w, w.sp.NodeCmd("n1", "r1-1"))
		if cmd.Command != keys.CmdReboot || cmd.IfBootID != "boot-1" {
			t.Fatalf("command %+v", cmd)
		}
		if w.placedOn("a") == "n1" || w.placedOn("b") == "n1" {
			t.Fatal("a VM is left on the node being rebooted")
		}
		// It comes back on v2 with a new boot: done, released, and n2 goes next.
		w.images["n1"] = "v2"
		w.crash("n1")
		w.register("n1", "boot-2", 4, 8)
		w.settle()
		ro = progress(w)
		if ro.Per["n1"].Phase != keys.PhaseDone || ro.Per["n2"].Phase != keys.PhaseDraining {
			t.Fatalf("per node %+v %+v", ro.Per["n1"], ro.Per["n2"])
		}
		if ns := get[keys.NodeState](w, w.sp.NodeState("n1")); ns.Rollout != "" {
			t.Fatal("n1 still held by the rollout")
		}
		if ro.Updated != w.now {
			t.Fatal("progress not dated")
		}
	})
	t.Run("a node already on the image is skipped", func(t *testing.T) {
		w := newWorld(t)
		w.images["n1"] = "v2"
		w.node("n1", 4, 8)
		w.node("n2", 4, 8)
		w.settle()
		w.put(w.sp.Rollout(), &keys.Rollout{ID: "r1", Image: "v2", MaxUnavailable: 1, Nodes: []string{"n1", "n2"}, NodeTimeoutSeconds: 600, State: keys.RolloutRunning}, 0)
		w.round()
		w.round()
		if p := progress(w).Per["n1"]; p.Phase != keys.PhaseSkipped {
			t.Fatalf("n1 %+v", p)
		}
	})
	t.Run("a node whose VMs cannot fit elsewhere waits, saying why", func(t *testing.T) {
		w := newWorld(t)
		w.node("n1", 4, 8)
		w.node("n2", 4, 8)
		w.vm("a", 1, 6*1024)
		w.vm("b", 1, 6*1024)
		w.settle()
		w.put(w.sp.Rollout(), &keys.Rollout{ID: "r1", Image: "v2", MaxUnavailable: 1, Nodes: []string{"n1", "n2"}, NodeTimeoutSeconds: 600, State: keys.RolloutRunning}, 0)
		w.settle()
		ro := progress(w)
		if ro.Per["n1"].Phase != keys.PhasePending || !strings.Contains(ro.Reason, "waiting for capacity") || !strings.Contains(ro.Reason, "insufficient memory") {
			t.Fatalf("progress %+v", ro)
		}
	})
	t.Run("a node that does not come back in time pauses the rollout", func(t *testing.T) {
		w := newWorld(t)
		w.node("n1", 4, 8)
		w.node("n2", 4, 8)
		w.settle()
		w.put(w.sp.Rollout(), &keys.Rollout{ID: "r1", Image: "v2", MaxUnavailable: 1, Nodes: []string{"n2", "n1"}, NodeTimeoutSeconds: 60, State: keys.RolloutRunning}, 0)
		w.settle()
		if p := progress(w).Per["n2"]; p.Phase != keys.PhaseRebooting {
			t.Fatalf("n2 %+v", p)
		}
		// n2 never comes back: after the node timeout the rollout pauses, and starts no other.
		w.advance(2 * time.Minute)
		w.settle()
		if ro := progress(w); ro.State != keys.RolloutPaused || !strings.Contains(ro.Reason, "n2") || ro.Per["n1"].Phase != keys.PhasePending {
			t.Fatalf("progress %+v", ro)
		}
	})
	t.Run("aborting releases every node the rollout holds", func(t *testing.T) {
		w := rolling(t)
		w.round()
		r := get[keys.Rollout](w, w.sp.Rollout())
		r.State = keys.RolloutAborting
		w.put(w.sp.Rollout(), r, 0)
		w.settle()
		if ro := progress(w); ro.State != keys.RolloutAborted || ro.Ended.IsZero() {
			t.Fatalf("progress %+v", ro)
		}
		for _, n := range []string{"n1", "n2"} {
			if ns := get[keys.NodeState](w, w.sp.NodeState(n)); ns.Rollout != "" {
				t.Fatalf("%s still held", n)
			}
		}
	})
	t.Run("a request deleted under a running rollout stops it as an abort would", func(t *testing.T) {
		w := rolling(t)
		w.round()
		w.del(w.sp.Rollout())
		w.settle()
		if ro := progress(w); ro.Ended.IsZero() || ro.State != keys.RolloutAborted {
			t.Fatalf("progress %+v", ro)
		}
		if ns := get[keys.NodeState](w, w.sp.NodeState("n1")); ns.Rollout != "" {
			t.Fatal("n1 still held by a rollout nobody follows")
		}
	})
	t.Run("an operator uncordoning a node mid-upgrade pauses the rollout and lets go of the node", func(t *testing.T) {
		w := rolling(t)
		w.round()
		w.put(w.sp.NodeSpec("n1"), &keys.NodeSpec{}, 0)
		w.settle()
		ro := progress(w)
		if ro.State != keys.RolloutPaused || get[keys.NodeState](w, w.sp.NodeState("n1")).Rollout != "" {
			t.Fatalf("progress %+v", ro)
		}
	})
	t.Run("an invalid request is left alone with a log line", func(t *testing.T) {
		w := steady(t)
		w.put(w.sp.Rollout(), &keys.Rollout{ID: "r1", MaxUnavailable: 1}, 0)
		p := w.decide()
		if len(p.Actions) != 0 || len(p.Logs) == 0 {
			t.Fatalf("actions %v logs %v", actions(p), p.Logs)
		}
	})
	t.Run("the progress gauge counts nodes per phase", func(t *testing.T) {
		w := rolling(t)
		w.round()
		p := w.decide()
		if p.Rollout[keys.PhaseDraining] != 1 || p.Rollout[keys.PhasePending] != 1 {
			t.Fatalf("gauge %v", p.Rollout)
		}
	})
}
