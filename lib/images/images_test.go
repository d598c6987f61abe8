package images

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/herdhq/herd/lib/keys"
)

// store makes a version v1 with a kernel and an initrd, described as herdctl image add would.
func store(t *testing.T) (*Store, *keys.Image, string) {
	t.Helper()
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "v1"), 0o755); err != nil {
		t.Fatal(err)
	}
	im := &keys.Image{}
	for name, content := range map[string]string{"vmlinuz": "KERNEL-0123456789", "initrd.gz": "INITRD-0123456789"} {
		p := filepath.Join(dir, "v1", name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		f, err := Describe(p)
		if err != nil {
			t.Fatal(err)
		}
		if name == "vmlinuz" {
			im.Kernel = f
		} else {
			im.Initrd = f
		}
	}
	return NewStore(dir), im, filepath.Join(dir, "v1", "vmlinuz")
}

// TestBytesFlippedWithTheTimeRestored: 16 bytes changed in place, size and modification time put
// back, is still caught: the change time moved.
func TestBytesFlippedWithTheTimeRestored(t *testing.T) {
	s, im, kernel := store(t)
	if r := s.Check("v1", im); r != OK {
		t.Fatal(r)
	}
	st, _ := os.Stat(kernel)
	time.Sleep(10 * time.Millisecond)
	f, err := os.OpenFile(kernel, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("XXXXXXXXXXXXXXXX"), 1); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := os.Chtimes(kernel, st.ModTime(), st.ModTime()); err != nil {
		t.Fatal(err)
	}
	if after, _ := os.Stat(kernel); after.Size() != st.Size() || !after.ModTime().Equal(st.ModTime()) {
		t.Fatal("the test did not restore size and mtime")
	}
	if r := s.Check("v1", im); r == OK {
		t.Fatal("flipped bytes served: the verdict keyed on size and mtime only")
	}
	if _, err := s.Open("v1", "vmlinuz", im); err == nil {
		t.Fatal("opened a file that fails its hash")
	}
}

// TestOpenServesTheFileVerified: a file renamed over a verified one after its check is not served.
func TestOpenServesTheFileVerified(t *testing.T) {
	s, im, kernel := store(t)
	if r := s.Check("v1", im); r != OK {
		t.Fatal(r)
	}
	other := kernel + ".new"
	if err := os.WriteFile(other, []byte("KERNEL-0123456789"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(other, kernel); err != nil {
		t.Fatal(err)
	}
	// Same bytes, another inode: verified again (and fine), never served on the old verdict.
	f, err := s.Open("v1", "vmlinuz", im)
	if err != nil {
		t.Fatalf("the same bytes under a new inode: %v", err)
	}
	f.Close()
}

// TestReverifyFindsWhatNoStampShows: a change that leaves every stamp as it was (storage rot) is
// found by the periodic re-hash.
func TestReverifyFindsWhatNoStampShows(t *testing.T) {
	s, im, kernel := store(t)
	if r := s.Check("v1", im); r != OK {
		t.Fatal(r)
	}
	if err := os.WriteFile(kernel, []byte("KERNEL-ROTTEN-789"), 0o644); err != nil {
		t.Fatal(err)
	}
	// Make the cached stamps match the rotten file, as if the change left no trace.
	st, err := statOf(kernel)
	if err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	v := s.cache["v1"]
	v.kernel = st
	s.cache["v1"] = v
	s.mu.Unlock()
	if r := s.Check("v1", im); r != OK {
		t.Fatal("setup: the stamps should hide the change")
	}
	s.Reverify(map[string]*keys.Image{"v1": im}, time.Hour)
	if r := s.Check("v1", im); r != OK {
		t.Fatal("re-hashed before its time")
	}
	s.Reverify(map[string]*keys.Image{"v1": im}, 0)
	if r := s.Check("v1", im); r == OK {
		t.Fatal("the periodic re-hash did not find the change")
	}
}
