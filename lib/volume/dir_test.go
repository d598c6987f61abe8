package volume

import (
	"context"
	"os"
	"path/filepath"
	"testing"
)

// TestDirImagesAndDisks: an imported image is a file disks copy (sparse), a VM's second disk is a
// file of its own, List names both disks and not the image.
func TestDirImagesAndDisks(t *testing.T) {
	ctx := context.Background()
	d := Dir{Root: t.TempDir()}
	size := int64(3*ChunkSize + 7)
	raw := make([]byte, size)
	copy(raw, "bootsector")
	copy(raw[size-4:], "tail")
	f := filepath.Join(t.TempDir(), "src.raw")
	if err := os.WriteFile(f, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	src, err := os.Open(f)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	from, err := d.ImportImage(ctx, "default", "image_deb.4", src, size, nil)
	if err != nil || from != "default/image_deb.4@herd" {
		t.Fatalf("%q %v", from, err)
	}
	root := Volume{Pool: "default", VM: "web", UID: 9, SizeGiB: 1, From: from}
	data := Volume{Pool: "default", VM: "web", UID: 9, SizeGiB: 2, Disk: "data"}
	for _, v := range []Volume{root, data} {
		if _, err := d.Ensure(ctx, v); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(filepath.Join(d.Root, "default", "web.9.raw"))
	if err != nil || int64(len(got)) != 1<<30 || string(got[:10]) != "bootsector" || string(got[size-4:size]) != "tail" {
		t.Fatalf("the clone: %d bytes, %v", len(got), err)
	}
	if _, err := d.Ensure(ctx, Volume{Pool: "default", VM: "x", UID: 1, SizeGiB: 1, From: "default/../../etc@herd"}); err == nil {
		t.Fatal("a clone source outside the directory was copied")
	}
	list, err := d.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	disks := map[string]string{}
	for _, in := range list {
		disks[in.ID] = in.Disk
	}
	if len(disks) != 2 || disks["web.9"] != "root" || disks["web.9.data"] != "data" {
		t.Fatalf("list: %+v", list)
	}
	if err := d.DeleteImage(ctx, "default", "image_deb.4"); err != nil {
		t.Fatal(err)
	}
	if err := d.DeleteImage(ctx, "default", "image_deb.4"); err != nil {
		t.Fatal(err)
	}
}
