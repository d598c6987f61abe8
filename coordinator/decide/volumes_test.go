package decide

import (
	"strings"
	"testing"
	"time"

	"github.com/herdhq/herd/lib/keys"
)

// disks is a world whose leader manages disks, with one node.
func disks(t *testing.T) *world {
	w := newWorld(t)
	w.cfg.ManagedDisks = true
	w.st.LastAdopt = w.now // adoption is tested on its own
	w.node("n1", 4, 8)
	return w
}

// diskDone records a disk as the volume work would.
func (w *world) diskDone(name string, gib int64, state, errMsg string) {
	image := keys.VolumeImage(name, w.uid(name))
	w.put(w.sp.Volume("default", image), &keys.VolumeRecord{VM: name, UID: w.uid(name), SizeGiB: gib, State: state, Error: errMsg, Updated: w.now}, 0)
}

func TestVolumes(t *testing.T) {
	t.Run("a VM's disk is made before the VM is placed", func(t *testing.T) {
		w := disks(t)
		w.vm("a", 1, 512, withDisk("default", 10))
		p := w.decide()
		want := "ensure-volume " + w.sp.Volume("default", keys.VolumeImage("a", w.uid("a")))
		if got := works(p); len(got) != 1 || got[0] != want || hasPrefix(actions(p), "place") {
			t.Fatalf("work %v actions %v", got, actions(p))
		}
		if v := p.Work[0].Volume; v.SizeGiB != 10 || v.UID != w.uid("a") || v.Pool != "default" || p.Work[0].Rev != 0 {
			t.Fatalf("volume %+v", v)
		}
		w.diskDone("a", 10, keys.VolumeReady, "")
		w.settle()
		if w.placedOn("a") != "n1" {
			t.Fatal("not placed once the disk is ready")
		}
	})
	t.Run("a disk that failed is a problem, retried after a pause", func(t *testing.T) {
		w := disks(t)
		w.vm("a", 1, 512, withDisk("default", 10))
		w.diskDone("a", 10, keys.VolumeError, "pool full")
		w.settle()
		if w.placedOn("a") != "" || !strings.Contains(w.problem("a"), "disk root: pool full") {
			t.Fatalf("on %q problem %q", w.placedOn("a"), w.problem("a"))
		}
		if p := w.decide(); len(p.Work) != 0 || p.After <= 0 {
			t.Fatalf("work %v after %s", works(p), p.After)
		}
		w.advance(VolumeRetry)
		if got := works(w.decide()); !hasPrefix(got, "ensure-volume") {
			t.Fatalf("no retry: %v", got)
		}
	})
	t.Run("a bigger disk in the spec grows it for the placed VM", func(t *testing.T) {
		w := disks(t)
		w.vm("a", 1, 512, withDisk("default", 10))
		w.diskDone("a", 10, keys.VolumeReady, "")
		w.settle()
		w.vm("a", 1, 512, withDisk("default", 20))
		if got := works(w.decide()); !hasPrefix(got, "ensure-volume") {
			t.Fatalf("work %v", got)
		}
	})
	t.Run("a smaller disk in the spec is refused; the VM keeps its last spec", func(t *testing.T) {
		w := disks(t)
		w.vm("a", 1, 512, withDisk("default", 10))
		w.diskDone("a", 10, keys.VolumeReady, "")
		w.settle()
		w.vm("a", 1, 512, withDisk("default", 5))
		w.settle()
		if !strings.Contains(w.problem("a"), "refusing to shrink") || get[keys.Assignment](w, w.sp.Assign("n1", "a")).Spec.Disk.SizeGiB != 10 {
			t.Fatalf("problem %q", w.problem("a"))
		}
	})
	t.Run("a purge waits for the VM to go, then asks for the disk's deletion", func(t *testing.T) {
		w := disks(t)
		w.vm("a", 1, 512, withDisk("default", 10))
		w.diskDone("a", 10, keys.VolumeReady, "")
		w.settle()
		image := keys.VolumeImage("a", w.uid("a"))
		vol := w.kv[w.sp.Volume("default", image)]
		w.put(w.sp.PurgeRequest("default", image), &keys.Request{Of: vol.create}, 0)
		if got := works(w.decide()); hasPrefix(got, "purge-volume") {
			t.Fatal("purging the disk of a live VM")
		}
		w.del(w.sp.VMSpec("a"))
		w.settle()
		p := w.decide()
		if got := works(p); len(got) != 1 || !strings.HasPrefix(got[0], "purge-volume") || p.Work[0].Request != w.sp.PurgeRequest("default", image) {
			t.Fatalf("work %v", got)
		}
	})
	t.Run("a purge request naming an earlier disk is dropped", func(t *testing.T) {
		w := disks(t)
		w.vm("a", 1, 512, withDisk("default", 10))
		w.diskDone("a", 10, keys.VolumeReady, "")
		image := keys.VolumeImage("a", w.uid("a"))
		w.put(w.sp.PurgeRequest("default", image), &keys.Request{Of: 1}, 0)
		w.settle()
		if w.has(w.sp.PurgeRequest("default", image)) {
			t.Fatal("stale purge request kept")
		}
	})
	t.Run("disks in storage are compared with the records once a minute", func(t *testing.T) {
		w := disks(t)
		w.st.LastAdopt = time.Time{}
		if got := works(w.decide()); len(got) != 1 || got[0] != "adopt-volumes adopt-volumes" {
			t.Fatalf("work %v", got)
		}
		p := w.decide()
		if len(p.Work) != 0 || p.After <= 0 || p.After > AdoptEvery+time.Second {
			t.Fatalf("work %v after %s", works(p), p.After)
		}
		w.advance(AdoptEvery)
		if got := works(w.decide()); len(got) != 1 {
			t.Fatalf("work %v", got)
		}
	})
	t.Run("without managed disks nothing of this happens", func(t *testing.T) {
		w := newWorld(t)
		w.node("n1", 4, 8)
		w.vm("a", 1, 512, withDisk("default", 10))
		p := w.decide()
		if len(p.Work) != 0 || !contains(actions(p), "place vm/a") {
			t.Fatalf("work %v actions %v", works(p), actions(p))
		}
	})
}

func TestRequests(t *testing.T) {
	t.Run("an unreadable request is dropped with an event", func(t *testing.T) {
		w := steady(t)
		w.put(w.sp.ConfirmLossRequest(), `{"v":1,"of":"nope"}`, 0)
		p := w.decide()
		if !contains(actions(p), "drop request request") || p.Actions[0].Notes[0].Event != "ignored" {
			t.Fatalf("actions %v", actions(p))
		}
	})
	t.Run("a confirm-loss request without a guard is dropped", func(t *testing.T) {
		w := steady(t)
		w.put(w.sp.ConfirmLossRequest(), &keys.Request{Of: 3}, 0)
		w.settle()
		if w.has(w.sp.ConfirmLossRequest()) {
			t.Fatal("kept")
		}
	})
	t.Run("a request the leader does not know is left for a newer leader", func(t *testing.T) {
		w := steady(t)
		w.put(w.sp.RequestPrefix()+"reindex", &keys.Request{Of: 3}, 0)
		w.settle()
		if !w.has(w.sp.RequestPrefix() + "reindex") {
			t.Fatal("dropped a request a newer herd may know")
		}
	})
}
