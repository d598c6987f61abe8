// Package ceph runs herd against a real single-node Ceph cluster (fixed ports: one rig for the
// package, tests in sequence): the leader makes each VM's disk before placing it.
package ceph

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/herdhq/herd/e2e/rig"
	"github.com/herdhq/herd/lib/leaktest"
)

var (
	bin      rig.Binaries
	cephDir  string
	confFile string
	script   string
)

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "the Ceph tests need root; run `just test` as root")
		os.Exit(1)
	}
	dir, err := os.MkdirTemp("", "herd-ceph-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if bin, err = rig.Build(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	_, file, _, _ := runtime.Caller(0)
	script = filepath.Join(filepath.Dir(file), "..", "..", "scripts", "ceph-rig.sh")
	cephDir = filepath.Join(dir, "ceph")
	start := time.Now()
	if out, err := exec.Command(script, "start", cephDir).CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "ceph rig: %v\n%s\n", err, out)
		_ = exec.Command(script, "stop", cephDir).Run()
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "ceph rig up in %s\n", time.Since(start).Round(100*time.Millisecond))
	confFile = filepath.Join(cephDir, "ceph.conf")
	code := m.Run()
	_ = exec.Command(script, "stop", cephDir).Run()
	os.RemoveAll(dir)
	os.Exit(leaktest.Check(code))
}

func rbd(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("rbd", append([]string{"-c", confFile}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("rbd %v: %v: %s", args, err, out)
	}
	return string(out)
}

type vol struct {
	Pool   string `json:"pool"`
	Image  string `json:"image"`
	Owner  string `json:"owner"`
	Record struct {
		VM      string `json:"vm"`
		UID     int64  `json:"uid"`
		SizeGiB int64  `json:"size_gib"`
		State   string `json:"state"`
		Error   string `json:"error"`
		Purge   bool   `json:"purge"`
	} `json:"record"`
}

func volumes(c *rig.Cluster) map[string]vol {
	var list []vol
	_ = json.Unmarshal([]byte(c.Herdctl("volume", "list", "-o", "json")), &list)
	m := map[string]vol{}
	for _, v := range list {
		m[v.Image] = v
	}
	return m
}

func running(c *rig.Cluster, name string) error {
	if vm := c.VMs()[name]; vm.State != "running" {
		return fmt.Errorf("%s: %+v %+v", name, vm, vm.Problem)
	}
	return nil
}

// TestDisksOnRBD: disks are made by the leader before placement, cloned from a protected golden
// snapshot, grown but never shrunk, kept after delete unless purged, fresh for a re-created VM,
// listed with their VM or as orphans; a stopped cluster is a clear problem, not a hang.
func TestDisksOnRBD(t *testing.T) {
	c := rig.NewCluster(t, bin)
	keyring := filepath.Join(cephDir, "admin.keyring")
	ceph := []string{"--ceph-conf", confFile, "--ceph-user", "admin", "--ceph-keyring", keyring, "--ceph-timeout", "5s"}
	c.CoordArgs = append([]string{"--session-ttl", "2s", "--pools", "rbd"}, ceph...)
	c.AgentArgs = append([]string{"--lease-ttl", "3s"}, ceph...)
	c.StartCoordinator()
	c.StartAgent("52:54:00:00:03:01", 8, 16384)
	c.StartAgent("52:54:00:00:03:02", 8, 16384)
	c.Leader(30 * time.Second)

	start := time.Now()
	c.Herdctl("vm", "create", "web1", "--disk", "2GiB", "--pool", "rbd", "--memory", "128MiB", "--wait")
	t.Logf("create with a new 2 GiB RBD disk to running: %s", time.Since(start).Round(time.Millisecond))
	web1 := c.VMs()["web1"]
	img := fmt.Sprintf("web1.%d", web1.UID)
	if v := volumes(c)[img]; v.Record.State != "ready" || v.Owner != "in use" || v.Record.SizeGiB != 2 {
		t.Fatalf("volume %+v", v)
	}
	if info := rbd(t, "info", "rbd/"+img); !strings.Contains(info, "2 GiB") || !strings.Contains(info, "exclusive-lock") {
		t.Fatalf("rbd info:\n%s", info)
	}

	// A golden image, snapshot, protected: a VM disk cloned from it is instant and copy-on-write.
	rbd(t, "create", "rbd/golden", "--size", "1G")
	rbd(t, "snap", "create", "rbd/golden@base")
	rbd(t, "snap", "protect", "rbd/golden@base")
	start = time.Now()
	c.Herdctl("vm", "create", "db1", "--disk", "4GiB", "--pool", "rbd", "--from", "rbd/golden@base", "--memory", "128MiB", "--wait")
	t.Logf("create with a 4 GiB clone to running: %s", time.Since(start).Round(time.Millisecond))
	db1 := c.VMs()["db1"]
	if info := rbd(t, "info", fmt.Sprintf("rbd/db1.%d", db1.UID)); !strings.Contains(info, "parent: rbd/golden@base") {
		t.Fatalf("not a clone:\n%s", info)
	}
	importedImageAndTwoDisks(t, c)

	// Grow; a shrink is refused with a problem and the disk stays.
	write := func(name, spec string) {
		f := filepath.Join(c.Dir, name+".yaml")
		_ = os.WriteFile(f, []byte(spec), 0o644)
		c.Herdctl("vm", "apply", "-f", f)
	}
	write("web1", "name: web1\nvcpus: 1\nmemory_mib: 128\ndisk: {pool: rbd, size_gib: 3}\n")
	rig.Eventually(t, 30*time.Second, "grown", func() error {
		if info := rbd(t, "info", "rbd/"+img); !strings.Contains(info, "3 GiB") {
			return fmt.Errorf("%s", info)
		}
		return nil
	})
	write("web1", "name: web1\nvcpus: 1\nmemory_mib: 128\ndisk: {pool: rbd, size_gib: 1}\n")
	rig.Eventually(t, 30*time.Second, "shrink refused", func() error {
		vm := c.VMs()["web1"]
		if vm.Problem == nil || !strings.Contains(vm.Problem.Message, "refusing to shrink disk root from 3 to 1 GiB") {
			return fmt.Errorf("%+v", vm.Problem)
		}
		return nil
	})
	if info := rbd(t, "info", "rbd/"+img); !strings.Contains(info, "3 GiB") {
		t.Fatalf("the disk shrank:\n%s", info)
	}

	// Delete keeps the disk (an orphan); delete --purge removes it.
	c.Herdctl("vm", "delete", "web1", "--wait")
	if v := volumes(c)[img]; v.Owner != "orphan" {
		t.Fatalf("after delete: %+v", v)
	}
	if !strings.Contains(rbd(t, "ls", "rbd"), img) {
		t.Fatal("delete without --purge removed the disk")
	}
	// Re-created under the same name: a new uid, a fresh disk.
	c.Herdctl("vm", "create", "web1", "--disk", "2GiB", "--pool", "rbd", "--memory", "128MiB", "--wait")
	img2 := fmt.Sprintf("web1.%d", c.VMs()["web1"].UID)
	if img2 == img || volumes(c)[img2].Owner != "in use" || volumes(c)[img].Owner != "orphan" {
		t.Fatalf("re-created VM: %s vs %s: %+v", img2, img, volumes(c))
	}
	c.Herdctl("volume", "rm", "rbd/"+img)
	c.Herdctl("vm", "delete", "db1", "--purge", "--wait")
	rig.Eventually(t, 30*time.Second, "purged", func() error {
		ls := rbd(t, "ls", "rbd")
		if strings.Contains(ls, img+"\n") || strings.Contains(ls, fmt.Sprintf("db1.%d", db1.UID)) {
			return fmt.Errorf("still there:\n%s", ls)
		}
		if _, ok := volumes(c)[img]; ok {
			return fmt.Errorf("record left")
		}
		return nil
	})

	// A stopped cluster: a clear problem within the timeout; the coordinator keeps working.
	if out, err := exec.Command(script, "stop", cephDir).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	c.Herdctl("vm", "create", "late", "--disk", "1GiB", "--pool", "rbd", "--memory", "64MiB")
	c.Herdctl("vm", "create", "diskless", "--memory", "64MiB")
	rig.Eventually(t, 60*time.Second, "clear error for the disk, diskless VM runs", func() error {
		vm := c.VMs()["late"]
		if vm.Problem == nil || !strings.Contains(vm.Problem.Message, "disk root:") {
			return fmt.Errorf("late: %+v", vm.Problem)
		}
		return running(c, "diskless")
	})
	t.Logf("stopped cluster: %s", c.VMs()["late"].Problem.Message)
	for _, p := range c.Coords {
		if !p.Running() {
			t.Fatal("a coordinator died with the Ceph cluster")
		}
	}
}

// importedImageAndTwoDisks: a qcow2 file here, imported by the leader through herdctl (which serves
// it), becomes an RBD image with a protected snapshot; a VM's boot disk is a clone of it, its
// second disk an image of its own; the image cannot be deleted while cloned.
func importedImageAndTwoDisks(t *testing.T, c *rig.Cluster) {
	dir := t.TempDir()
	raw, qcow := filepath.Join(dir, "deb.raw"), filepath.Join(dir, "deb.qcow2")
	f, err := os.Create(raw)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = f.WriteAt([]byte("herd-image-marker"), 0)
	_ = f.Truncate(256 << 20)
	f.Close()
	if out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v: %s", err, out)
	}
	start := time.Now()
	out, errOut, code := c.Run(c.Bin.Herdctl, "volume", "import", "deb", "--from", qcow, "--pool", "rbd")
	t.Logf("import of a 256 MiB qcow2 into RBD: %s", time.Since(start).Round(time.Millisecond))
	if code != 0 || !strings.Contains(errOut, "image/deb ready: qcow2, 256") {
		t.Fatalf("volume import: exit %d\n%s%s", code, out, errOut)
	}
	c.Herdctl("vm", "create", "app1", "--image", "deb", "--disk", "1GiB", "--disk", "data=2GiB", "--pool", "rbd", "--memory", "128MiB", "--wait")
	uid := c.VMs()["app1"].UID
	info := rbd(t, "info", fmt.Sprintf("rbd/app1.%d", uid))
	if !strings.Contains(info, "parent: rbd/image_deb.") || !strings.Contains(info, "@herd") || !strings.Contains(info, "1 GiB") {
		t.Fatalf("the boot disk is not a clone of the image:\n%s", info)
	}
	if info := rbd(t, "info", fmt.Sprintf("rbd/app1.%d.data", uid)); strings.Contains(info, "parent:") || !strings.Contains(info, "2 GiB") {
		t.Fatalf("the second disk:\n%s", info)
	}
	if v := volumes(c)[fmt.Sprintf("app1.%d.data", uid)]; v.Record.State != "ready" || v.Owner != "in use" {
		t.Fatalf("the second disk's record: %+v", v)
	}
	if _, errOut, code := c.Run(c.Bin.Herdctl, "volume", "image-rm", "deb"); code == 0 || !strings.Contains(errOut, "cloned by 1 disks") {
		t.Fatalf("an image with a clone was deleted: exit %d\n%s", code, errOut)
	}
}
