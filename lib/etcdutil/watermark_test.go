package etcdutil

import (
	"os"
	"path/filepath"
	"testing"
)

func TestWatermark(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "revision.json")
	w, err := OpenWatermark(path)
	if err != nil || w.Loaded() != (Mark{}) {
		t.Fatalf("a missing file: %+v, %v", w.Loaded(), err)
	}
	if err := w.Note("c1", 0, 100); err != nil {
		t.Fatal(err)
	}
	if err := w.Note("c1", 0, 90); err != nil { // a lower revision in the same generation is no news
		t.Fatal(err)
	}
	w.every = 0
	if err := w.Note("c1", 0, 120); err != nil {
		t.Fatal(err)
	}
	w, err = OpenWatermark(path)
	if m := w.Loaded(); err != nil || m.Cluster != "c1" || m.Revision != 120 || m.Generation != 0 || m.Saved.IsZero() {
		t.Fatalf("reopened: %+v, %v", m, err)
	}
	m := w.Loaded()
	for _, c := range []struct {
		cluster string
		gen     int
		rev     int64
		back    bool
	}{
		{"c1", 0, 120, false},
		{"c1", 0, 500, false},
		{"c1", 0, 119, true},  // restored from a backup
		{"c2", 0, 5, false},   // another cluster (etcd wiped): not this rule's to judge
		{"c1", 1, 5, false},   // a recovery finished since: the history started over
		{"c1", -1, 999, true}, // a backup from before a recovery this replica saw
	} {
		if got := m.WentBack(c.cluster, c.gen, c.rev); got != c.back {
			t.Errorf("WentBack(%s, %d, %d) = %v, want %v", c.cluster, c.gen, c.rev, got, c.back)
		}
	}
	// A new generation replaces the revision, even with a lower one.
	w.every = 0
	if err := w.Note("c1", 1, 7); err != nil {
		t.Fatal(err)
	}
	w, _ = OpenWatermark(path)
	if m := w.Loaded(); m.Generation != 1 || m.Revision != 7 {
		t.Fatalf("after a recovery: %+v", m)
	}
	// An unreadable file is reported and ignored; a path that cannot be written is reported once.
	if err := os.WriteFile(path, []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if w, err := OpenWatermark(path); err == nil || w.Loaded() != (Mark{}) {
		t.Fatalf("garbage: %+v, %v", w.Loaded(), err)
	}
	bad, _ := OpenWatermark(filepath.Join(path, "under-a-file"))
	bad.every = 0
	if err := bad.Note("c1", 0, 1); err == nil {
		t.Fatal("a write under a file did not fail")
	}
	if err := bad.Note("c1", 0, 2); err != nil {
		t.Fatalf("the same failure reported twice: %v", err)
	}
	if none, _ := OpenWatermark(""); none.Note("c1", 0, 1) != nil || none.Flush() != nil {
		t.Fatal("an empty path keeps nothing and says nothing")
	}
}
