package coordinator

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/volume"
)

// TestImagesAndDisks runs a leader against a real etcd with a directory volume backend. Images
// written as records are imported: a raw file, and a qcow2 made by qemu-img which the leader
// converts with qemu-img; a qcow2 naming a backing file (which would read a file of the leader's
// host) and a file whose checksum differs are refused with their reason. A VM with two disks gets
// its boot disk cloned from the qcow2 image, holding its bytes, and an empty second disk of its
// own, each recorded with its name; a VM naming a missing image or a disk smaller than its image
// waits with the problem in words. A deleted image goes from storage, then its status.
func TestImagesAndDisks(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("qemu-img is missing: scripts/deps.sh installs qemu-utils")
		}
		t.Skip("qemu-img is missing (qemu-utils)")
	}
	srv := etcdtest.Start(t)
	c := etcdtest.NewClient(t, srv.Endpoints)
	ctx := context.Background()
	addNode(t, c, "n1", 64, 65536, nil)
	root, files := t.TempDir(), t.TempDir()
	// An import of this replica killed half way left its files; another replica's are at work.
	work := t.TempDir()
	for _, d := range []string{"herd-image-c1-123", "herd-image-c2-456"} {
		if err := os.MkdirAll(filepath.Join(work, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	r := startReplicaWith(t, srv.Endpoints, "c1", func(cfg *Config) {
		cfg.Volumes, cfg.ImportDir, cfg.ImportWorkDir = volume.Dir{Root: root}, files, work
	})
	if left, _ := filepath.Glob(filepath.Join(work, "*")); len(left) != 1 || filepath.Base(left[0]) != "herd-image-c2-456" {
		t.Fatalf("import work left at start: %v", left)
	}
	leads(t, r, "the only replica")
	put := func(key, val string) {
		t.Helper()
		if _, err := c.Put(ctx, key, val); err != nil {
			t.Fatal(err)
		}
	}

	// A 1 GiB + 1 MiB disk image, sparse, with bytes at both ends: its clone needs a 2 GiB disk.
	raw := filepath.Join(files, "disk.raw")
	size := int64(1<<30 + 1<<20)
	f, err := os.Create(raw)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = f.WriteAt([]byte("bootsector"), 0)
	_, _ = f.WriteAt([]byte("tail"), size-4)
	f.Close()
	qcow := filepath.Join(files, "disk.qcow2")
	if out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v: %s", err, out)
	}
	backed := filepath.Join(files, "backed.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-f", "qcow2", "-b", raw, "-F", "raw", backed).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v: %s", err, out)
	}
	small := filepath.Join(files, "small.raw")
	if err := os.WriteFile(small, bytes.Repeat([]byte("x"), 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	image := func(source, sum string) string {
		return keys.MustEncode(&keys.VMImage{Source: "file://" + source, Pool: "default", SHA256: sum})
	}
	put(space.VMImage("deb"), image(qcow, ""))
	put(space.VMImage("plain"), image(small, ""))
	put(space.VMImage("backed"), image(backed, ""))
	put(space.VMImage("badsum"), image(small, strings.Repeat("0", 64)))
	// The leader's own files are not for importing, by path or by a link in the directory.
	if err := os.Symlink("/etc", filepath.Join(files, "etc")); err != nil {
		t.Fatal(err)
	}
	put(space.VMImage("secret"), image("/etc/hostname", ""))
	put(space.VMImage("linked"), image(filepath.Join(files, "etc", "hostname"), ""))

	status := func(name string) *keys.VMImageStatus {
		var st keys.VMImageStatus
		if err := decodeInto(get(t, c, space.VMImageStatus(name)), &st); err != nil {
			return nil
		}
		return &st
	}
	settled := func(name, state string) *keys.VMImageStatus {
		t.Helper()
		var st *keys.VMImageStatus
		eventually(t, "image "+name+" "+state, func() error {
			if st = status(name); st == nil || st.State != state {
				return fmt.Errorf("%+v", st)
			}
			return nil
		})
		return st
	}
	start := time.Now()
	deb := settled("deb", keys.ImageReady)
	t.Logf("a 1 GiB qcow2 imported: %s", time.Since(start).Round(time.Millisecond))
	if deb.Format != "qcow2" || deb.SizeBytes != size || deb.MinDiskGiB() != 2 || deb.From == "" {
		t.Fatalf("deb: %+v", deb)
	}
	sum := sha256.Sum256(bytes.Repeat([]byte("x"), 4096))
	if plain := settled("plain", keys.ImageReady); plain.Format != "raw" || plain.SHA256 != hex.EncodeToString(sum[:]) {
		t.Fatalf("plain: %+v", plain)
	}
	if st := settled("backed", keys.ImageError); !strings.Contains(st.Error, "backing") {
		t.Fatalf("a qcow2 with a backing file: %+v", st)
	}
	if st := settled("badsum", keys.ImageError); !strings.Contains(st.Error, "sha256") {
		t.Fatalf("a checksum that differs: %+v", st)
	}
	for _, name := range []string{"secret", "linked"} {
		if st := settled(name, keys.ImageError); !strings.Contains(st.Error, "is not in the coordinators' --import-dir") {
			t.Fatalf("%s: %+v", name, st)
		}
	}

	problem := func(name string) string {
		var p keys.Problem
		if err := decodeInto(get(t, c, space.Problem(name)), &p); err != nil {
			return ""
		}
		return p.Message
	}
	waitProblem := func(name, want string) {
		t.Helper()
		eventually(t, name+": "+want, func() error {
			if p := problem(name); !strings.Contains(p, want) {
				return fmt.Errorf("problem %q", p)
			}
			return nil
		})
	}
	put(space.VMSpec("web"), `{"vcpus":1,"memory_mib":256,"disks":[{"pool":"default","size_gib":2,"image":"deb"},{"name":"data","pool":"default","size_gib":1}]}`)
	put(space.VMSpec("nope"), `{"vcpus":1,"memory_mib":256,"disks":[{"pool":"default","size_gib":2,"image":"missing"}]}`)
	put(space.VMSpec("tiny"), `{"vcpus":1,"memory_mib":256,"disk":{"pool":"default","size_gib":1,"image":"deb"}}`)
	t.Logf("all four settled: %s", time.Since(start).Round(time.Millisecond))
	waitProblem("nope", "disk root: no image missing")
	waitProblem("tiny", "disk root: 1 GiB is smaller than image deb (2 GiB at least)")
	var uid int64
	eventually(t, "web placed", func() error {
		var pl keys.Placement
		if err := decodeInto(get(t, c, space.Placement("web")), &pl); err != nil {
			return err
		}
		uid = pl.UID
		return nil
	})
	t.Logf("web placed: %s", time.Since(start).Round(time.Millisecond))
	bootDisk, err := os.Open(filepath.Join(root, "default", keys.DiskImage("web", uid, "root")+".raw"))
	if err != nil {
		t.Fatal(err)
	}
	head, tail := make([]byte, 10), make([]byte, 4)
	_, _ = bootDisk.ReadAt(head, 0)
	_, _ = bootDisk.ReadAt(tail, size-4)
	st, _ := bootDisk.Stat()
	bootDisk.Close()
	if st.Size() != 2<<30 || string(head) != "bootsector" || string(tail) != "tail" {
		t.Fatalf("the boot disk is not the image's clone: %d bytes, %q ... %q", st.Size(), head, tail)
	}
	st, err = os.Stat(filepath.Join(root, "default", keys.DiskImage("web", uid, "data")+".raw"))
	if err != nil || st.Size() != 1<<30 {
		t.Fatalf("the second disk: %v %v", st, err)
	}
	resp, err := c.Get(ctx, space.VolumeRoot(), clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	disks := map[string]string{}
	for _, kv := range resp.Kvs {
		v, err := keys.Decode[keys.VolumeRecord](kv.Value)
		if err != nil {
			t.Fatal(err)
		}
		disks[strings.TrimPrefix(string(kv.Key), space.VolumeRoot())] = v.Disk + " from " + v.From
	}
	if disks["default/"+keys.DiskImage("web", uid, "root")] != "root from "+deb.From || disks["default/"+keys.DiskImage("web", uid, "data")] != "data from " {
		t.Fatalf("volume records: %v", disks)
	}

	// Deleted: out of storage, then the status goes.
	if _, err := c.Delete(ctx, space.VMImage("plain")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the deleted image's status gone", func() error {
		if st := status("plain"); st != nil {
			return fmt.Errorf("%+v", st)
		}
		return nil
	})
	t.Logf("an image deleted: %s", time.Since(start).Round(time.Millisecond))
	matches, _ := filepath.Glob(filepath.Join(root, "default", "image_plain.*"))
	if len(matches) != 0 {
		t.Fatalf("the deleted image is still stored: %v", matches)
	}
}
