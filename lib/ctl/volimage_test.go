package ctl

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
	"github.com/herdhq/herd/lib/keys"
)

// TestVolumeImageCommands plays the leader's part by hand: herdctl volume import waits for the
// status of this image's incarnation, takes a failure recorded before it started for one the
// leader will try again (and says so), reports the ready image; volume images lists it with its
// clones; image-rm is refused while a disk clones it and deletes the record after.
func TestVolumeImageCommands(t *testing.T) {
	srv := etcdtest.Start(t)
	ep := srv.Endpoints[0]
	c := etcdtest.NewClient(t, srv.Endpoints)
	ctx := context.Background()
	sp := keys.MustSpace(keys.DefaultPrefix)
	src := "http://images.example/deb.qcow2"
	if _, _, err := herdctl(t, ep, "volume", "import", "deb", "--from", src, "--no-wait"); err != nil {
		t.Fatal(err)
	}
	r, err := c.Get(ctx, sp.VMImage("deb"))
	if err != nil || len(r.Kvs) != 1 {
		t.Fatalf("%v %v", r, err)
	}
	uid := r.Kvs[0].CreateRevision
	status := func(st keys.VMImageStatus) {
		t.Helper()
		st.UID = uid
		if _, err := c.Put(ctx, sp.VMImageStatus("deb"), keys.MustEncode(&st)); err != nil {
			t.Fatal(err)
		}
	}
	status(keys.VMImageStatus{State: keys.ImageError, Error: "503 Service Unavailable", Updated: time.Now().Add(-time.Minute)})
	_, errOut, err := herdctl(t, ep, "volume", "import", "deb", "--from", src, "--wait-timeout", "1500ms")
	if err == nil || !strings.Contains(err.Error(), "not imported after 1.5s") || !strings.Contains(errOut, "the last try failed (503 Service Unavailable); waiting for the leader's next one") {
		t.Fatalf("an earlier failure: %v\n%s", err, errOut)
	}
	status(keys.VMImageStatus{State: keys.ImageError, Error: "404 Not Found", Updated: time.Now().Add(time.Hour)})
	if _, _, err := herdctl(t, ep, "volume", "import", "deb", "--from", src); err == nil || !strings.Contains(err.Error(), "image deb: 404 Not Found") {
		t.Fatalf("a failure of this try: %v", err)
	}
	from := "rbd/" + keys.ImageVolume("deb", uid) + "@herd"
	status(keys.VMImageStatus{State: keys.ImageReady, Format: "qcow2", SizeBytes: 2 << 30, From: from, Updated: time.Now()})
	if _, errOut, err := herdctl(t, ep, "volume", "import", "deb", "--from", src); err != nil || !strings.Contains(errOut, "image/deb ready: qcow2, 2GiB") {
		t.Fatalf("ready: %v\n%s", err, errOut)
	}
	if _, _, err := herdctl(t, ep, "volume", "import", "deb", "--from", "http://elsewhere/x.raw", "--no-wait"); err == nil || !strings.Contains(err.Error(), "image deb exists, from "+src) {
		t.Fatalf("another source under the name: %v", err)
	}
	vol := keys.VolumeRecord{VM: "web", UID: 99, SizeGiB: 4, From: from, State: keys.VolumeReady}
	if _, err := c.Put(ctx, sp.Volume("rbd", "web.99"), keys.MustEncode(&vol)); err != nil {
		t.Fatal(err)
	}
	if out, _, err := herdctl(t, ep, "volume", "images"); err != nil || !strings.Contains(out, "deb") || !strings.Contains(out, "ready") {
		t.Fatalf("volume images: %v\n%s", err, out)
	}
	if _, _, err := herdctl(t, ep, "volume", "image-rm", "deb"); err == nil || !strings.Contains(err.Error(), "cloned by 1 disks (rbd/web.99)") {
		t.Fatalf("image-rm with a clone: %v", err)
	}
	if _, err := c.Delete(ctx, sp.Volume("rbd", "web.99")); err != nil {
		t.Fatal(err)
	}
	if out, _, err := herdctl(t, ep, "volume", "image-rm", "deb"); err != nil || !strings.Contains(out, "image/deb deleted") {
		t.Fatalf("image-rm: %v %s", err, out)
	}
	if r, _ := c.Get(ctx, sp.VMImage("deb")); len(r.Kvs) != 0 {
		t.Fatal("the record is still there")
	}
}
