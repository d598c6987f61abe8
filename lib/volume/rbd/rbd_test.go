package rbd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/herdhq/herd/coordinator/fence"
	"github.com/herdhq/herd/lib/leaktest"
	"github.com/herdhq/herd/lib/volume"
)

var confFile string

// TestMain starts one real single-node Ceph cluster for the package (fixed ports: one at a time).
func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "rbd tests need root to run a Ceph cluster; run `just test` as root")
		os.Exit(1)
	}
	for _, p := range []string{"ceph-mon", "ceph-osd", "ceph", "rbd", "uuidgen"} {
		if _, err := exec.LookPath(p); err != nil {
			fmt.Fprintf(os.Stderr, "rbd tests need %s: run `just deps`\n", p)
			os.Exit(1)
		}
	}
	_, file, _, _ := runtime.Caller(0)
	script := filepath.Join(filepath.Dir(file), "..", "..", "..", "scripts", "ceph-rig.sh")
	dir, err := os.MkdirTemp("", "herd-ceph-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	start := time.Now()
	out, err := exec.Command(script, "start", dir).CombinedOutput()
	code := 1
	if err != nil {
		fmt.Fprintf(os.Stderr, "ceph rig: %v\n%s\n", err, out)
	} else {
		fmt.Fprintf(os.Stderr, "ceph rig up in %s\n", time.Since(start).Round(100*time.Millisecond))
		confFile = filepath.Join(dir, "ceph.conf")
		code = m.Run()
	}
	_ = exec.Command(script, "stop", dir).Run()
	os.RemoveAll(dir)
	os.Exit(leaktest.Check(code))
}

func backend(t *testing.T) *Backend {
	b, err := New(Config{ConfFile: confFile, User: "admin", Pools: []string{"rbd"}, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	return b
}

// withImage opens an image directly, for checks the backend does not expose.
func withImage(t *testing.T, name string, fn func(*rbd.Image)) {
	conn, _ := rados.NewConnWithUser("admin")
	if err := conn.ReadConfigFile(confFile); err != nil {
		t.Fatal(err)
	}
	if err := conn.Connect(); err != nil {
		t.Fatal(err)
	}
	defer conn.Shutdown()
	io, err := conn.OpenIOContext("rbd")
	if err != nil {
		t.Fatal(err)
	}
	defer io.Destroy()
	img, err := rbd.OpenImage(io, name, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	fn(img)
}

func TestCreateGrowShrinkDelete(t *testing.T) {
	b := backend(t)
	ctx := context.Background()
	v := volume.Volume{Pool: "rbd", VM: "web1", UID: 11, SizeGiB: 2}
	start := time.Now()
	att, err := b.Ensure(ctx, v)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("create 2 GiB image: %s", time.Since(start).Round(time.Millisecond))
	if att.Kind != "rbd" || att.Image != "web1.11" || len(att.Monitors) != 1 || att.Monitors[0] != "127.0.0.1:6789" || att.User != "admin" {
		t.Fatalf("attachment %+v", att)
	}
	withImage(t, "web1.11", func(img *rbd.Image) {
		f, _ := img.GetFeatures()
		if f&rbd.FeatureExclusiveLock == 0 {
			t.Error("exclusive-lock not enabled")
		}
		if vm, _ := img.GetMetadata("herd.vm"); vm != "web1" {
			t.Errorf("metadata herd.vm %q", vm)
		}
	})
	if _, err := b.Ensure(ctx, v); err != nil {
		t.Fatalf("ensure is idempotent: %v", err)
	}
	v.SizeGiB = 3
	if _, err := b.Ensure(ctx, v); err != nil {
		t.Fatal(err)
	}
	withImage(t, "web1.11", func(img *rbd.Image) {
		if size, _ := img.GetSize(); size != 3<<30 {
			t.Errorf("size %d after grow", size)
		}
	})
	v.SizeGiB = 1
	if _, err := b.Ensure(ctx, v); !errors.Is(err, volume.ErrShrink) {
		t.Fatalf("shrink must be refused: %v", err)
	}
	if _, err := b.Attach(ctx, v); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Attach(ctx, volume.Volume{Pool: "rbd", VM: "nope", UID: 1}); err == nil {
		t.Fatal("attach must not create")
	}
	list, err := b.List(ctx)
	if err != nil || len(list) != 1 || list[0].VM != "web1" || list[0].UID != 11 || list[0].SizeGiB != 3 {
		t.Fatalf("list %+v %v", list, err)
	}
	if err := b.Delete(ctx, v); err != nil {
		t.Fatal(err)
	}
	if err := b.Delete(ctx, v); err != nil {
		t.Fatalf("deleting a missing image: %v", err)
	}
}

func TestCloneAndFreshDiskForRecreatedVM(t *testing.T) {
	b := backend(t)
	ctx := context.Background()
	// A golden image with data, snapshot, protected.
	golden := volume.Volume{Pool: "rbd", VM: "golden", UID: 1, SizeGiB: 1}
	if _, err := b.Ensure(ctx, golden); err != nil {
		t.Fatal(err)
	}
	withImage(t, "golden.1", func(img *rbd.Image) {
		if _, err := img.WriteAt([]byte("debian-12"), 0); err != nil {
			t.Fatal(err)
		}
		snap, err := img.CreateSnapshot("base")
		if err != nil {
			t.Fatal(err)
		}
		if err := snap.Protect(); err != nil {
			t.Fatal(err)
		}
	})
	start := time.Now()
	vm := volume.Volume{Pool: "rbd", VM: "db1", UID: 20, SizeGiB: 2, From: "rbd/golden.1@base"}
	if _, err := b.Ensure(ctx, vm); err != nil {
		t.Fatal(err)
	}
	t.Logf("clone from a protected snapshot: %s", time.Since(start).Round(time.Millisecond))
	read := func(name string) string {
		buf := make([]byte, 9)
		withImage(t, name, func(img *rbd.Image) { _, _ = img.ReadAt(buf, 0) })
		return strings.TrimRight(string(buf), "\x00")
	}
	if got := read("db1.20"); got != "debian-12" {
		t.Fatalf("clone content %q", got)
	}
	withImage(t, "db1.20", func(img *rbd.Image) {
		if _, err := img.WriteAt([]byte("db1-data!"), 0); err != nil {
			t.Fatal(err)
		}
	})
	// The VM is deleted and created again under the same name: a new uid, a fresh disk.
	again := volume.Volume{Pool: "rbd", VM: "db1", UID: 35, SizeGiB: 2}
	if _, err := b.Ensure(ctx, again); err != nil {
		t.Fatal(err)
	}
	if got := read("db1.35"); got != "" {
		t.Fatalf("the re-created VM's disk holds %q", got)
	}
	if got := read("db1.20"); got != "db1-data!" {
		t.Fatalf("the old disk was touched: %q", got)
	}
	if _, err := b.Ensure(ctx, volume.Volume{Pool: "rbd", VM: "x", UID: 2, SizeGiB: 1, From: "golden@base"}); err == nil {
		t.Fatal("a malformed clone source was accepted")
	}
}

// TestImportImageAndCloneDisks: a raw file becomes an image with a protected snapshot (again:
// nothing rewritten; half written: written anew); a VM's root disk clones it and holds its bytes,
// its second disk is its own empty image; List shows both disks and not the image; the image
// cannot go while a disk clones it, and can after.
func TestImportImageAndCloneDisks(t *testing.T) {
	b := backend(t)
	ctx := context.Background()
	size := int64(2*volume.ChunkSize + 100) // a chunk of data, one of zeros, a tail
	raw := make([]byte, size)
	copy(raw, "bootsector")
	copy(raw[size-4:], "tail")
	f := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(f, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	src, err := os.Open(f)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	// An import that died half way left an image without its snapshot.
	if _, err := b.Ensure(ctx, volume.Volume{Pool: "rbd", VM: "image_debian", UID: 5, SizeGiB: 1}); err != nil {
		t.Fatal(err)
	}
	var done int64
	start := time.Now()
	from, err := b.ImportImage(ctx, "rbd", "image_debian.5", src, size, func(n int64) { done = n })
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("import %d bytes: %s", size, time.Since(start).Round(time.Millisecond))
	if from != "rbd/image_debian.5@herd" || done != size {
		t.Fatalf("from %q, progress %d of %d", from, done, size)
	}
	withImage(t, "image_debian.5", func(img *rbd.Image) {
		if got, _ := img.GetSize(); got != uint64(size) {
			t.Errorf("image size %d, file %d (the half-written image was kept?)", got, size)
		}
		if ok, err := protectedSnap(img); !ok || err != nil {
			t.Errorf("snapshot herd protected: %v %v", ok, err)
		}
	})
	done = 0
	if again, err := b.ImportImage(ctx, "rbd", "image_debian.5", src, size, func(n int64) { done = n }); err != nil || again != from || done != 0 {
		t.Fatalf("a second import: %q %v, %d bytes written again", again, err, done)
	}
	root := volume.Volume{Pool: "rbd", VM: "db", UID: 7, SizeGiB: 1, From: from}
	data := volume.Volume{Pool: "rbd", VM: "db", UID: 7, SizeGiB: 2, Disk: "data"}
	for _, v := range []volume.Volume{root, data} {
		if _, err := b.Ensure(ctx, v); err != nil {
			t.Fatal(err)
		}
	}
	withImage(t, "db.7", func(img *rbd.Image) {
		head, tail := make([]byte, 10), make([]byte, 4)
		_, _ = img.ReadAt(head, 0)
		_, _ = img.ReadAt(tail, size-4)
		if string(head) != "bootsector" || string(tail) != "tail" {
			t.Errorf("the clone reads %q ... %q", head, tail)
		}
		if got, _ := img.GetSize(); got != 1<<30 {
			t.Errorf("clone size %d", got)
		}
	})
	withImage(t, "db.7.data", func(img *rbd.Image) {
		head := make([]byte, 10)
		_, _ = img.ReadAt(head, 0)
		if strings.Trim(string(head), "\x00") != "" {
			t.Errorf("the second disk holds %q", head)
		}
	})
	list, err := b.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	disks := map[string]string{}
	for _, in := range list {
		disks[in.ID] = in.Disk
	}
	if disks["db.7"] != "root" || disks["db.7.data"] != "data" || disks["image_debian.5"] != "" {
		t.Fatalf("list: %+v", list)
	}
	if err := b.DeleteImage(ctx, "rbd", "image_debian.5"); err == nil || !strings.Contains(err.Error(), "still cloned") {
		t.Fatalf("an image with a clone was deleted: %v", err)
	}
	for _, v := range []volume.Volume{root, data} {
		if err := b.Delete(ctx, v); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 2; i++ {
		if err := b.DeleteImage(ctx, "rbd", "image_debian.5"); err != nil {
			t.Fatalf("delete image (%d): %v", i, err)
		}
	}
}

func TestParseBlocklistStream(t *testing.T) {
	got, err := ParseBlocklist([]byte("\n[{\"addr\":\"10.0.0.5:0/0\",\"until\":\"x\"}][]"))
	if err != nil || len(got) != 1 || got[0].Addr != "10.0.0.5:0/0" {
		t.Fatalf("%+v %v", got, err)
	}
	if _, err := ParseBlocklist([]byte("[{")); err == nil {
		t.Fatal("garbage accepted")
	}
	for in, want := range map[string]string{"v1:10.0.0.1:6800/123": "10.0.0.1", "10.0.0.2:0/456": "10.0.0.2", "[::1]:0/0": "::1"} {
		if got := AddrIP(in); got != want {
			t.Errorf("AddrIP(%s) = %s", in, got)
		}
	}
}

// TestCephFencerLocksOutTheWriter: a client holds an image's exclusive lock and writes; the ceph
// fencer blocklists its address (the whole IP, and the lock owner exactly); its next write fails;
// unfencing removes the entries. Runs before the stopped-cluster test: it blocklists 127.0.0.1.
func TestCephFencerLocksOutTheWriter(t *testing.T) {
	b := backend(t)
	ctx := context.Background()
	v := volume.Volume{Pool: "rbd", VM: "victim", UID: 50, SizeGiB: 1}
	if _, err := b.Ensure(ctx, v); err != nil {
		t.Fatal(err)
	}
	// The "old node": its own client, holding the lock by writing.
	conn, _ := rados.NewConnWithUser("admin")
	_ = conn.ReadConfigFile(confFile)
	_ = conn.SetConfigOption("rados_osd_op_timeout", "5")
	if err := conn.Connect(); err != nil {
		t.Fatal(err)
	}
	defer conn.Shutdown()
	io, _ := conn.OpenIOContext("rbd")
	defer io.Destroy()
	img, err := rbd.OpenImage(io, "victim.50", rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if _, err := img.WriteAt([]byte("before"), 0); err != nil {
		t.Fatal(err)
	}
	clients, err := b.ImageClients(ctx, "rbd", "victim.50")
	if err != nil || len(clients) == 0 {
		t.Fatalf("lock owners and watchers: %v %v", clients, err)
	}
	before, _ := b.OSDMapEpoch(ctx)
	f := fence.Ceph{Admin: b, Expire: time.Hour}
	d, err := f.Fence(ctx, fence.Target{HWID: "n1", StorageIP: "127.0.0.1", Disks: []string{"rbd/victim.50"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("fence details: %v", d)
	if !strings.Contains(d[fence.DetailBlocklist], "127.0.0.1:0/0") || !strings.Contains(d[fence.DetailBlocklist], strings.TrimPrefix(clients[0], "v1:")) {
		t.Fatalf("blocklisted %s, clients %v", d[fence.DetailBlocklist], clients)
	}
	if epoch, _ := strconv.ParseInt(d[fence.DetailEpoch], 10, 64); epoch <= before {
		t.Fatalf("osdmap epoch %d not after %d", epoch, before)
	}
	if _, err := img.WriteAt([]byte("after!"), 512); err == nil {
		t.Fatal("the fenced writer could still write")
	}
	if err := f.Unfence(ctx, d); err != nil {
		t.Fatal(err)
	}
	in, err := b.BlocklistAddrs(ctx)
	if err != nil || len(in) != 0 {
		t.Fatalf("entries left after unfence: %v %v", in, err)
	}
	if _, err := f.Fence(ctx, fence.Target{HWID: "n2"}); err == nil || !strings.Contains(err.Error(), "storage_ip") {
		t.Fatalf("a node without a storage IP was fenced: %v", err)
	}
}

// TestStoppedClusterIsAClearErrorNotAHang must run last: it stops the cluster.
func TestStoppedClusterIsAClearErrorNotAHang(t *testing.T) {
	b := backend(t)
	ctx := context.Background()
	if _, err := b.Ensure(ctx, volume.Volume{Pool: "rbd", VM: "pre", UID: 3, SizeGiB: 1}); err != nil {
		t.Fatal(err)
	}
	_, file, _, _ := runtime.Caller(0)
	script := filepath.Join(filepath.Dir(file), "..", "..", "..", "scripts", "ceph-rig.sh")
	if out, err := exec.Command(script, "stop", filepath.Dir(confFile)).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	start := time.Now()
	_, err := b.Ensure(ctx, volume.Volume{Pool: "rbd", VM: "late", UID: 4, SizeGiB: 1})
	took := time.Since(start)
	if err == nil {
		t.Fatal("a stopped cluster gave no error")
	}
	t.Logf("stopped cluster: %v after %s", err, took.Round(100*time.Millisecond))
	// Bounded by the configured 5 s (plus a little); never hung.
	if took > 30*time.Second {
		t.Fatalf("took %s", took)
	}
	fresh, _ := New(Config{ConfFile: confFile, User: "admin", Timeout: 3 * time.Second})
	if _, err := fresh.Attach(ctx, volume.Volume{Pool: "rbd", VM: "pre", UID: 3}); err == nil {
		t.Fatal("connecting to a stopped cluster succeeded")
	}
}
