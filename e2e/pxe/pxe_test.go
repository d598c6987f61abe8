// Package pxe boots real (emulated) machines over the network: QEMU under TCG, in a network
// namespace made by the test, against herd's bootserver, etcd and coordinator. Heavy: run alone.
package pxe

import (
	"bytes"
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
)

var bin rig.Binaries

func TestMain(m *testing.M) { rig.Main(m, "herd-pxe-bin-", &bin) }

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// buildImage runs the image recipe into dir (Debian packages are cached outside the repository).
func buildImage(t *testing.T, dir, version string) {
	t.Helper()
	cmd := exec.Command(filepath.Join(repoRoot(), "scripts", "build-image.sh"), "--lab", dir, version)
	cmd.Dir = repoRoot()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("build image: %v\n%s", err, out)
	}
}

type lab struct {
	t    *testing.T
	ns   *rig.Netns
	dir  string
	etcd string
	pki  string
	bs   *rig.Proc
}

// tls are the etcd flags of a process acting as user (a certificate in the lab's CA directory).
func (l *lab) tls(user string) []string {
	return []string{"--endpoints", l.etcd, "--cacert", filepath.Join(l.pki, "ca.crt"),
		"--cert", filepath.Join(l.pki, user+".crt"), "--key", filepath.Join(l.pki, user+".key")}
}

// herd runs a herd subcommand in the lab namespace.
func (l *lab) herd(args ...string) {
	l.t.Helper()
	if out, err := l.ns.Command(bin.Herd, args...).CombinedOutput(); err != nil {
		l.t.Fatalf("herd %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func (l *lab) herdctl(args ...string) (string, error) {
	cmd := l.ns.Command(bin.Herdctl, append(l.tls("pxe-operator"), args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("herdctl %s: %v: %s", strings.Join(args, " "), err, errb.String())
	}
	return out.String(), nil
}

func (l *lab) mustHerdctl(args ...string) string {
	l.t.Helper()
	out, err := l.herdctl(args...)
	if err != nil {
		l.t.Fatal(err)
	}
	return out
}

func (l *lab) startBootserver(chainload string) {
	l.bs = l.ns.Start(l.dir, "bootserver-"+chainload, bin.Herd, append(append([]string{"bootserver"}, l.tls("bs")...),
		"--node-join", "https://"+l.ns.IP+":9443",
		"--interface", l.ns.Bridge, "--dhcp-mode", "full", "--range", "10.99.0.100-10.99.0.150",
		"--http", l.ns.IP+":8080", "--tftp", l.ns.IP+":69", "--listen", l.ns.IP+":9482",
		"--image-dir", filepath.Join(l.dir, "images"), "--chainload", chainload, "--retry", "2s",
		"--node-param", "herd.libvirt=test:///etc/herd/node.xml", "--node-param", "herd.agent=--lease-ttl=3s")...)
}

// machine is a 1 GiB machine (see machineSized).
func (l *lab) machine(name, mac string) *rig.Proc { return l.machineSized(name, mac, 1024) }

// machineUEFI powers on an emulated UEFI machine (OVMF, Debian's ovmf package) whose network card
// has no option ROM: the firmware's own EDK2 PXE boots it, as on most servers' UEFI firmware.
func (l *lab) machineUEFI(name, mac string) *rig.Proc {
	vars := filepath.Join(l.dir, name+"-vars.fd")
	b, err := os.ReadFile("/usr/share/OVMF/OVMF_VARS_4M.fd")
	if err != nil {
		l.t.Fatalf("Debian's ovmf package is needed: %v", err)
	}
	if err := os.WriteFile(vars, b, 0o644); err != nil {
		l.t.Fatal(err)
	}
	tap := l.ns.Tap()
	return l.ns.Start(l.dir, name, "qemu-system-x86_64",
		"-machine", "q35", "-m", "1024", "-smp", "1", "-display", "none", "-monitor", "none",
		"-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
		"-drive", "if=pflash,format=raw,file="+vars,
		"-serial", "file:"+filepath.Join(l.dir, name+".console"),
		"-netdev", "tap,id=n0,ifname="+tap+",script=no,downscript=no",
		"-device", "virtio-net-pci,netdev=n0,mac="+mac+",romfile=,bootindex=1")
}

// startBootserverMode runs the bootserver in a DHCP mode (full: it hands out addresses; proxy:
// beside the network's own DHCP server).
func (l *lab) startBootserverMode(mode string) {
	args := append(append([]string{"bootserver"}, l.tls("bs")...),
		"--node-join", "https://"+l.ns.IP+":9443", "--interface", l.ns.Bridge, "--dhcp-mode", mode,
		"--http", l.ns.IP+":8080", "--tftp", l.ns.IP+":69", "--listen", l.ns.IP+":9482",
		"--image-dir", filepath.Join(l.dir, "images"), "--retry", "2s",
		"--node-param", "herd.libvirt=test:///etc/herd/node.xml", "--node-param", "herd.agent=--lease-ttl=3s")
	if mode == "full" {
		args = append(args, "--range", "10.99.0.100-10.99.0.150")
	}
	l.bs = l.ns.Start(l.dir, "bootserver-"+mode, bin.Herd, args...)
}

// networkDHCP runs busybox's udhcpd as the network's own DHCP server (addresses only, no boot
// information), for proxy mode.
func (l *lab) networkDHCP() *rig.Proc {
	conf := filepath.Join(l.dir, "udhcpd.conf")
	leases := filepath.Join(l.dir, "udhcpd.leases")
	_ = os.WriteFile(leases, nil, 0o644)
	if err := os.WriteFile(conf, []byte("start 10.99.0.160\nend 10.99.0.199\ninterface "+l.ns.Bridge+
		"\noption subnet 255.255.255.0\nlease_file "+leases+"\npidfile "+filepath.Join(l.dir, "udhcpd.pid")+"\n"), 0o644); err != nil {
		l.t.Fatal(err)
	}
	return l.ns.Start(l.dir, "udhcpd", "busybox", "udhcpd", "-f", conf)
}

type nodeRow struct {
	HWID   string `json:"hwid"`
	Status string `json:"status"`
	Node   *struct {
		Image string `json:"image"`
	} `json:"node"`
}

// node returns the machine's row of `herdctl node list`, or nil.
func (l *lab) node(hwid string) *nodeRow {
	out, err := l.herdctl("node", "list", "-o", "json")
	if err != nil {
		return nil
	}
	var rows []nodeRow
	_ = json.Unmarshal([]byte(out), &rows)
	for _, r := range rows {
		if r.HWID == hwid {
			return &r
		}
	}
	return nil
}

func (l *lab) nodeImage(hwid string) string {
	if r := l.node(hwid); r != nil && r.Node != nil {
		return r.Node.Image
	}
	return ""
}

func (l *lab) nodeStatus(hwid string) string {
	if r := l.node(hwid); r != nil {
		return r.Status
	}
	return "absent"
}

// newLab is the lab network namespace with etcd as in production: TLS with client certificates,
// RBAC, every process with its own certificate.
func newLab(t *testing.T, cidr string) *lab {
	l := &lab{t: t, dir: t.TempDir()}
	l.ns = rig.NewNetns(t, cidr)
	l.etcd = "https://" + l.ns.IP + ":2379"
	l.pki = filepath.Join(l.dir, "pki")
	l.herd("pki", "init", "--dir", l.pki, "--etcd-host", l.ns.IP)
	l.ns.Start(l.dir, "etcd", bin.Herd, "etcd", "--data-dir", filepath.Join(l.dir, "etcd"),
		"--listen-client", l.etcd, "--listen-peer", "http://127.0.0.1:2380", "--unsafe-no-fsync",
		"--cert-file", filepath.Join(l.pki, "etcd-server.crt"), "--key-file", filepath.Join(l.pki, "etcd-server.key"),
		"--trusted-ca-file", filepath.Join(l.pki, "ca.crt"))
	rig.Eventually(t, 30*time.Second, "etcd up", func() error {
		return l.ns.Command(bin.Herd, append([]string{"rbac", "apply"}, l.tls("root")...)...).Run()
	})
	for _, u := range [][]string{{"operator", "pxe-operator"}, {"coordinator", "coord"}, {"bootserver", "bs"}} {
		args := []string{"pki", "issue", "--dir", l.pki, "--role", u[0], u[1]}
		if u[0] != "operator" { // servers name their address; an operator's certificate is client-only
			args = append(args, "--host", l.ns.IP)
		}
		l.herd(append(args, l.tls("root")...)...)
	}
	return l
}

// startCoordinator runs the coordinator with its join endpoint, grace 1 s, and extra flags.
func (l *lab) startCoordinator(extra ...string) {
	l.ns.Start(l.dir, "coordinator", bin.Herd, append(append(append([]string{"coordinator"}, l.tls("coord")...),
		"--listen", "127.0.0.1:9481", "--session-ttl", "2s", "--ca-dir", l.pki, "--join-listen", l.ns.IP+":9443",
		"--grace", "1s"), extra...)...)
}

// TestPXEBootEnrolRunLeave, with TLS and RBAC on as in production: an unknown machine PXE-boots
// and waits; approving it boots herd's image over DHCP and HTTP; its agent joins with the boot's
// one-time token and registers as its own etcd user; a rollout reboots it into another image version
// (it PXE-boots again, is served the pinned version and joins with a fresh token); a VM runs on it;
// powered off, it leaves when its lease expires. Then a machine made to load the bootserver's own
// iPXE over TFTP first boots too.
func TestPXEBootEnrolRunLeave(t *testing.T) {
	rig.RequireHost(t, "qemu-system-x86_64", "cpio", "gzip")
	if _, err := os.Stat("/usr/lib/ipxe/undionly.kpxe"); err != nil {
		t.Fatalf("Debian's ipxe package is needed (/usr/lib/ipxe): %v", err)
	}
	l := newLab(t, "10.99.0.1/24")
	imgStart := time.Now()
	buildImage(t, filepath.Join(l.dir, "build"), "pxe1")
	t.Logf("image built in %s", time.Since(imgStart).Round(time.Second))
	// The test powers machines off itself (kills QEMU): the fence agent has nothing left to do.
	l.startCoordinator("--fence-exec", "echo QEMU already killed by the test")
	l.mustHerdctl("image", "add", "pxe1", "--kernel", filepath.Join(l.dir, "build", "vmlinuz"),
		"--initrd", filepath.Join(l.dir, "build", "initrd.gz"), "--cmdline", "console=ttyS0 quiet",
		"--copy-to", filepath.Join(l.dir, "images"))
	l.mustHerdctl("image", "set-current", "pxe1")
	l.startBootserver("auto")
	rig.Eventually(t, 30*time.Second, "bootserver verified the image", func() error {
		out := l.mustHerdctl("image", "list")
		if !strings.Contains(out, "=ok") {
			return fmt.Errorf("%s", out)
		}
		return nil
	})

	// An unknown machine: it appears in discovered and waits.
	const macA = "52:54:00:aa:00:01"
	powerOn := time.Now()
	qa := l.machine("machine-a", macA)
	rig.Eventually(t, 120*time.Second, "unknown machine discovered", func() error {
		out := l.mustHerdctl("hw", "discovered")
		if !strings.Contains(out, macA) {
			return fmt.Errorf("not yet: %s", out)
		}
		return nil
	})
	discovered := time.Since(powerOn)
	time.Sleep(3 * time.Second) // it keeps waiting, unbooted
	if st := l.nodeStatus(macA); st != "absent" {
		t.Fatalf("an unknown machine registered: %s", st)
	}

	approved := time.Now()
	l.mustHerdctl("hw", "approve", macA, "--label", "rack=lab")
	rig.Eventually(t, 180*time.Second, "approved machine boots and reports in", func() error {
		if st := l.nodeStatus(macA); st != "ready" {
			return fmt.Errorf("node %s", st)
		}
		return nil
	})
	ready := time.Since(approved)
	t.Logf("power-on to discovered: %s; approval to node ready (no power cycle): %s", discovered.Round(time.Second), ready.Round(time.Second))

	// A rollout to image pxe2: the node is pinned to it, its agent runs the image's reboot command
	// (reboot -f), the machine network-boots again, is served pxe2's kernel and initrd and rejoins
	// reporting pxe2.
	l.mustHerdctl("image", "add", "pxe2", "--kernel", filepath.Join(l.dir, "build", "vmlinuz"),
		"--initrd", filepath.Join(l.dir, "build", "initrd.gz"), "--cmdline", "console=ttyS0 quiet",
		"--copy-to", filepath.Join(l.dir, "images"))
	rig.Eventually(t, 30*time.Second, "bootserver verified pxe2", func() error {
		if out := l.mustHerdctl("image", "list"); strings.Count(out, "=ok") < 2 {
			return fmt.Errorf("%s", out)
		}
		return nil
	})
	rolled := time.Now()
	l.mustHerdctl("rollout", "start", "--image", "pxe2", "--node-timeout", "4m")
	rig.Eventually(t, 240*time.Second, "rollout done: the node rebooted into pxe2", func() error {
		out := l.mustHerdctl("rollout", "status")
		if !strings.Contains(out, ": done,") {
			return fmt.Errorf("%s", out)
		}
		return nil
	})
	t.Logf("rollout of the netbooted node (drain, reboot, PXE, rejoin): %s", time.Since(rolled).Round(time.Second))
	if img := l.nodeImage(macA); img != "pxe2" {
		t.Fatalf("node runs image %q after the rollout, want pxe2", img)
	}
	if log := rig.Tail(l.bs.Log, 400); !strings.Contains(log, "hwid="+macA+" image=pxe2") {
		t.Fatalf("the bootserver did not serve pxe2 to %s:\n%s", macA, log)
	}
	// Each boot joined with its own token, and the agent acted as the node's own etcd user.
	ev := l.mustHerdctl("events", "--object", "node/"+macA)
	if n := strings.Count(ev, " joined "); n != 2 {
		t.Fatalf("%d joins of %s, want one per boot (2):\n%s", n, macA, ev)
	}
	if !strings.Contains(ev, "herd-node:"+macA) {
		t.Fatalf("no event by etcd user herd-node:%s:\n%s", macA, ev)
	}

	l.mustHerdctl("vm", "create", "pxe-vm", "--memory", "128MiB")
	rig.Eventually(t, 60*time.Second, "VM running on the netbooted node", func() error {
		out := l.mustHerdctl("vm", "list")
		if !strings.Contains(out, macA) || !strings.Contains(out, "running") {
			return fmt.Errorf("%s", out)
		}
		return nil
	})

	qa.Kill() // power off
	rig.Eventually(t, 60*time.Second, "powered-off node leaves and is fenced", func() error {
		if st := l.nodeStatus(macA); st != "lost,fenced" {
			return fmt.Errorf("node %s", st)
		}
		return nil
	})

	// A machine that must load the bootserver's own iPXE over TFTP first (its ROM is iPXE too).
	l.bs.Stop(10 * time.Second)
	l.startBootserver("always")
	const macB = "52:54:00:aa:00:02"
	l.mustHerdctl("hw", "add", macB)
	powerOn = time.Now()
	l.machine("machine-b", macB)
	rig.Eventually(t, 180*time.Second, "TFTP-chainloaded machine reports in", func() error {
		if st := l.nodeStatus(macB); st != "ready" {
			return fmt.Errorf("node %s", st)
		}
		return nil
	})
	t.Logf("power-on to node ready via TFTP chainload: %s", time.Since(powerOn).Round(time.Second))
	log := rig.Tail(l.bs.Log, 400)
	if !strings.Contains(log, "transfer done: file=undionly.kpxe mac="+macB) {
		t.Fatalf("no TFTP transfer of undionly.kpxe for %s in the bootserver log:\n%s", macB, log)
	}

	// UEFI firmware without an iPXE ROM (EDK2's own PXE, as on most servers), in both DHCP modes:
	// it needs the PXE vendor options, loads ipxe.efi over TFTP, and iPXE boots the node.
	for i, mode := range []string{"full", "proxy"} {
		l.bs.Stop(10 * time.Second)
		if mode == "proxy" {
			l.networkDHCP()
		}
		l.startBootserverMode(mode)
		mac := fmt.Sprintf("52:54:00:aa:00:%02x", 0x10+i)
		l.mustHerdctl("hw", "add", mac)
		powerOn = time.Now()
		l.machineUEFI("uefi-"+mode, mac)
		rig.Eventually(t, 240*time.Second, "UEFI machine ("+mode+" mode) reports in", func() error {
			if st := l.nodeStatus(mac); st != "ready" {
				return fmt.Errorf("node %s; console: %s", st, rig.Tail(filepath.Join(l.dir, "uefi-"+mode+".console"), 5))
			}
			return nil
		})
		t.Logf("UEFI (OVMF, EDK2 PXE), %s DHCP mode: power-on to node ready: %s", mode, time.Since(powerOn).Round(time.Second))
		if log := rig.Tail(l.bs.Log, 400); !strings.Contains(log, "file=ipxe.efi") {
			t.Fatalf("no TFTP transfer of ipxe.efi in the %s-mode bootserver log:\n%s", mode, log)
		}
	}
}
