package pxe

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/herdhq/herd/e2e/rig"
)

// regNode is what a node registered (from `herdctl node get -o json`); zero when none.
type regNode struct {
	Addresses struct {
		Management string `json:"management"`
	} `json:"addresses"`
	MemoryMiB         int64 `json:"memory_mib"`
	ReservedMemoryMiB int64 `json:"reserved_memory_mib"`
}

func (l *lab) registered(hwid string) regNode {
	out, err := l.herdctl("node", "get", hwid, "-o", "json")
	if err != nil {
		return regNode{}
	}
	var n struct {
		Node *regNode `json:"node"`
	}
	_ = json.Unmarshal([]byte(out), &n)
	if n.Node == nil {
		return regNode{}
	}
	return *n.Node
}

// nodeAddr is a registered node's management address.
func (l *lab) nodeAddr(hwid string) string { return l.registered(hwid).Addresses.Management }

// vmNode is the node a VM's placement names ("" when none).
func (l *lab) vmNode(name string) string {
	out, err := l.herdctl("vm", "get", name, "-o", "json")
	if err != nil {
		return ""
	}
	var v struct {
		Placement *struct {
			Node string `json:"node"`
		} `json:"placement"`
	}
	_ = json.Unmarshal([]byte(out), &v)
	if v.Placement == nil {
		return ""
	}
	return v.Placement.Node
}

// records reads the writer guest's records from its RBD disk.
func (l *lab) records(conf, keyring, image string) []rig.Record {
	l.t.Helper()
	out := filepath.Join(l.dir, "export.img")
	_ = os.Remove(out)
	if b, err := l.ns.Command("rbd", "-c", conf, "--keyring", keyring, "export", image, out).CombinedOutput(); err != nil {
		l.t.Fatalf("rbd export %s: %v: %s", image, err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		l.t.Fatal(err)
	}
	return rig.Records(b[:min(len(b), 1<<20)])
}

// writers counts the distinct writers (boots of the guest) among records, in order.
func writers(recs []rig.Record) []string {
	var out []string
	for _, r := range recs {
		if len(out) == 0 || out[len(out)-1] != r.Writer {
			out = append(out, r.Writer)
		}
	}
	return out
}

// TestProductionImage is the whole promise on one rig: two machines (QEMU, TCG, no disk) enrolled
// by MAC power on, PXE-boot the production image (libvirt and QEMU inside), join with one-time
// tokens over TLS and RBAC, and run a real VM whose disk is on Ceph: placed on one, migrated live to
// the other, kept running through a rolling upgrade that really reboots both machines into another
// image version, and restarted from the same disk on the survivor once its machine is killed and
// fenced through Ceph's blocklist.
func TestProductionImage(t *testing.T) {
	rig.RequireHost(t, "qemu-system-x86_64", "mmdebstrap", "zstd", "ceph-mon", "ceph-osd", "rbd")
	l := newLab(t, "10.98.0.1/24")

	// The image, with the test guest's boot files where a spec's boot.kernel may point.
	guest := rig.BuildGuest(t)
	overlay := filepath.Join(l.dir, "overlay")
	if err := os.MkdirAll(filepath.Join(overlay, "var/lib/herd/boot"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{guest.Kernel, guest.Initrd} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(overlay, "var/lib/herd/boot", filepath.Base(f)), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	build := filepath.Join(l.dir, "build")
	start := time.Now()
	cmd := exec.Command(filepath.Join(repoRoot(), "scripts", "build-image.sh"), build, "v1")
	cmd.Dir = repoRoot()
	cmd.Env = append(os.Environ(), "HERD_IMAGE_OVERLAY="+overlay)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the production image: %v\n%s", err, out)
	}
	st, _ := os.Stat(filepath.Join(build, "initrd.img"))
	t.Logf("production image built in %s: initrd %d MiB", time.Since(start).Round(time.Second), st.Size()>>20)

	// Ceph in the lab, reached by the machines over the bridge; nodes get its key when they join.
	cephDir := filepath.Join(l.dir, "ceph")
	script := filepath.Join(repoRoot(), "scripts", "ceph-rig.sh")
	t.Cleanup(func() { _ = l.ns.Command(script, "stop", cephDir).Run() })
	if out, err := l.ns.Command(script, "start", cephDir, l.ns.IP).CombinedOutput(); err != nil {
		t.Fatalf("ceph rig: %v\n%s", err, out)
	}
	conf, keyring := filepath.Join(cephDir, "ceph.conf"), filepath.Join(cephDir, "admin.keyring")
	l.startCoordinator("--ceph-conf", conf, "--ceph-user", "admin", "--ceph-keyring", keyring, "--pools", "rbd",
		"--fence-ceph", "--node-ceph-user", "admin", "--node-ceph-keyring", keyring, "--node-ceph-conf", conf)

	for _, v := range []string{"v1", "v2"} { // the same files under two versions: what a node reports is herd.image
		l.mustHerdctl("image", "add", v, "--kernel", filepath.Join(build, "vmlinuz"), "--initrd", filepath.Join(build, "initrd.img"),
			"--cmdline", "console=ttyS0", "--copy-to", filepath.Join(l.dir, "images"))
	}
	l.mustHerdctl("image", "set-current", "v1")
	l.bs = l.ns.Start(l.dir, "bootserver", bin.Herd, append(append([]string{"bootserver"}, l.tls("bs")...),
		"--node-join", "https://"+l.ns.IP+":9443", "--interface", l.ns.Bridge, "--dhcp-mode", "full",
		"--range", "10.98.0.100-10.98.0.150", "--http", l.ns.IP+":8080", "--tftp", l.ns.IP+":69",
		"--listen", l.ns.IP+":9482", "--image-dir", filepath.Join(l.dir, "images"), "--retry", "2s",
		"--node-param", "herd.agent=--lease-ttl=5s")...)
	rig.Eventually(t, 60*time.Second, "bootserver verified the images", func() error {
		if out := l.mustHerdctl("image", "list"); strings.Count(out, "=ok") < 2 {
			return fmt.Errorf("%s", out)
		}
		return nil
	})

	macs := []string{"52:54:00:bb:00:01", "52:54:00:bb:00:02"}
	machines := map[string]*rig.Proc{}
	start = time.Now()
	for i, mac := range macs {
		l.mustHerdctl("hw", "add", mac)
		machines[mac] = l.machineSized(fmt.Sprintf("hv%d", i+1), mac, 2048)
	}
	rig.Eventually(t, 300*time.Second, "both machines boot the production image and report in", func() error {
		for _, mac := range macs {
			if st := l.nodeStatus(mac); st != "ready" {
				return fmt.Errorf("%s: %s", mac, st)
			}
		}
		return nil
	})
	t.Logf("power-on to node ready (production image, TCG, 2 GiB): %s", time.Since(start).Round(time.Second))
	n := l.registered(macs[0])
	t.Logf("node memory of a 2 GiB machine: %d MiB seen, %d MiB reserved for the host, %d MiB for VMs",
		n.MemoryMiB, n.ReservedMemoryMiB, n.MemoryMiB-n.ReservedMemoryMiB)
	for _, mac := range macs {
		// Fencing from Ceph needs the node's storage address: here the one DHCP gave it.
		l.mustHerdctl("hw", "add", mac, "--storage-ip", l.nodeAddr(mac))
		if get := l.mustHerdctl("node", "get", mac); !strings.Contains(get, "v1") {
			t.Fatalf("node %s:\n%s", mac, get)
		}
	}

	// 1. A real VM with its disk on Ceph, nested (TCG inside TCG).
	start = time.Now()
	l.mustHerdctl("vm", "create", "g1", "--memory", "96MiB", "--disk", "1GiB", "--pool", "rbd",
		"--kernel", "/var/lib/herd/boot/vmlinuz", "--initrd", "/var/lib/herd/boot/guest.gz",
		"--cmdline", "console=ttyS0 quiet herd.guest=g1 herd.writer")
	var image string
	rig.Eventually(t, 600*time.Second, "the nested guest writes its records", func() error {
		out, err := l.herdctl("volume", "list", "-o", "json")
		if err != nil {
			return err
		}
		var vols []struct {
			Pool   string `json:"pool"`
			Image  string `json:"image"`
			Record *struct {
				VM string `json:"vm"`
			} `json:"record"`
		}
		_ = json.Unmarshal([]byte(out), &vols)
		for _, v := range vols {
			if v.Record != nil && v.Record.VM == "g1" {
				image = v.Pool + "/" + v.Image
			}
		}
		if image == "" {
			return fmt.Errorf("no disk yet")
		}
		if n := len(l.records(conf, keyring, image)); n < 3 {
			return fmt.Errorf("%d records", n)
		}
		return nil
	})
	first := l.vmNode("g1")
	t.Logf("nested guest: spec to records on its RBD disk: %s (on %s)", time.Since(start).Round(time.Second), first)

	// 2. Live migration to the other machine: the same boot keeps writing.
	start = time.Now()
	l.mustHerdctl("vm", "migrate", "g1")
	rig.Eventually(t, 600*time.Second, "g1 migrated live", func() error {
		if n := l.vmNode("g1"); n == first || n == "" {
			return fmt.Errorf("on %q", n)
		}
		return nil
	})
	t.Logf("live migration between the netbooted machines: %s", time.Since(start).Round(time.Second))
	before := len(l.records(conf, keyring, image))
	rig.Eventually(t, 120*time.Second, "g1 keeps writing after the migration", func() error {
		recs := l.records(conf, keyring, image)
		if w := writers(recs); len(w) != 1 {
			return fmt.Errorf("writers %v: the guest restarted", w)
		}
		if len(recs) <= before+2 {
			return fmt.Errorf("%d records, %d before", len(recs), before)
		}
		return nil
	})

	// 3. A rolling upgrade to v2: each machine drained live, rebooted (reboot -f), PXE-booted v2.
	start = time.Now()
	l.mustHerdctl("rollout", "start", "--image", "v2", "--node-timeout", "10m")
	rig.Eventually(t, 1200*time.Second, "rollout done", func() error {
		out := l.mustHerdctl("rollout", "status", "-o", "json")
		var r struct {
			State   string `json:"state"`
			PerNode map[string]struct {
				Phase    string    `json:"phase"`
				Began    time.Time `json:"began"`
				Finished time.Time `json:"finished"`
			} `json:"per_node"`
		}
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			return fmt.Errorf("rollout status: %v: %s", err, out)
		}
		if r.State != "done" {
			return fmt.Errorf("rollout %s: %s", r.State, l.mustHerdctl("rollout", "status"))
		}
		for _, mac := range macs {
			if p := r.PerNode[mac].Phase; p != "done" {
				return fmt.Errorf("rollout done but %s is %q", mac, p)
			}
		}
		for _, mac := range macs {
			t.Logf("rollout of %s (drain, reboot, PXE, rejoin): %s", mac, r.PerNode[mac].Finished.Sub(r.PerNode[mac].Began).Round(time.Second))
		}
		return nil
	})
	t.Logf("rolling upgrade of both machines (drain live, reboot, PXE, rejoin): %s", time.Since(start).Round(time.Second))
	// The timeline, to tell which step of a slow rollout took the time.
	t.Logf("the rollout's events:\n%s", l.mustHerdctl("events", "--limit", "0", "--since", time.Since(start).Round(time.Second).String()))
	for _, mac := range macs {
		if img := l.nodeImage(mac); img != "v2" {
			t.Fatalf("%s runs %q after the rollout", mac, img)
		}
	}
	if w := writers(l.records(conf, keyring, image)); len(w) != 1 {
		t.Fatalf("the guest restarted during the rollout: writers %v", w)
	}

	// 4. The machine running the guest dies: fenced through Ceph's blocklist, the guest boots on the
	// other from the same disk, its earlier records intact.
	on := l.vmNode("g1")
	onAddr := l.nodeAddr(on)
	kept := l.records(conf, keyring, image)
	start = time.Now()
	machines[on].Kill()
	rig.Eventually(t, 600*time.Second, "g1 restarted on the survivor after the fence", func() error {
		if n := l.vmNode("g1"); n == on || n == "" {
			return fmt.Errorf("on %q", n)
		}
		if w := writers(l.records(conf, keyring, image)); len(w) < 2 {
			return fmt.Errorf("writers %v", w)
		}
		return nil
	})
	t.Logf("machine killed to guest writing on the survivor: %s", time.Since(start).Round(time.Second))
	b, err := l.ns.Command("ceph", "-c", conf, "--keyring", keyring, "osd", "blocklist", "ls").CombinedOutput()
	if err != nil || onAddr == "" || !strings.Contains(string(b), onAddr+":0/0") {
		t.Fatalf("no blocklist entry for %s: %v %s", on, err, b)
	}
	after := l.records(conf, keyring, image)
	for i, r := range kept {
		if i >= len(after) || after[i] != r {
			t.Fatalf("record %d changed by the restart: %+v", i, r)
		}
	}

	// 5. An enrolled machine too small for the image (half of its memory cannot hold the unpacked
	// root): told so in words on its console and in the boot server's log, never a bare panic.
	small := "52:54:00:bb:00:03"
	l.mustHerdctl("hw", "add", small)
	start = time.Now()
	l.machineSized("hv3", small, 640)
	rig.Eventually(t, 300*time.Second, "the small machine says why, there and to the boot server", func() error {
		console, _ := os.ReadFile(filepath.Join(l.dir, "hv3.console"))
		if !strings.Contains(string(console), "Add memory; nothing runs here.") {
			return fmt.Errorf("console: %q", lastLines(string(console), 3))
		}
		logb, _ := os.ReadFile(filepath.Join(l.dir, "bootserver.log"))
		for _, line := range strings.Split(string(logb), "\n") {
			if strings.Contains(line, "too little memory") && strings.Contains(line, "mac="+small) {
				return nil
			}
		}
		return fmt.Errorf("nothing in the boot server's log yet")
	})
	t.Logf("machine with 640 MiB: refused in words on its console and in the boot server log after %s", time.Since(start).Round(time.Second))
	if st := l.nodeStatus(small); st == "ready" {
		t.Fatalf("the small machine registered as %s", st)
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// machineSized powers on an emulated machine with memMiB of memory that network-boots from tap with
// mac. A reboot inside it resets it, and it network-boots again, as a server would.
func (l *lab) machineSized(name, mac string, memMiB int) *rig.Proc {
	tap := l.ns.Tap()
	return l.ns.Start(l.dir, name, "qemu-system-x86_64",
		"-m", fmt.Sprint(memMiB), "-smp", "1", "-display", "none", "-monitor", "none",
		"-serial", "file:"+filepath.Join(l.dir, name+".console"),
		"-boot", "n", "-netdev", "tap,id=n0,ifname="+tap+",script=no,downscript=no",
		"-device", "virtio-net-pci,netdev=n0,mac="+mac)
}
