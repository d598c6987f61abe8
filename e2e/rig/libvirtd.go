package rig

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"libvirt.org/go/libvirt"
)

// Lab is a small data centre in network namespaces: a lab namespace with a bridge (10.97.0.1/24)
// where etcd and the coordinators run, and hosts, each a namespace of its own with an address on
// that bridge, its own libvirtd (in a private mount namespace) and its own agent. Guests are real
// QEMU processes (TCG). Everything is stopped and deleted at cleanup, also on failure.
type Lab struct {
	T        testing.TB
	Bin      Binaries
	Dir      string
	NS       *Netns
	Endpoint string
	Guest    GuestImage
	Console  string // console log directory shared by all hosts
	Hosts    []*Host
	Coords   []*Coordinator
	// MigrationTLS, while true, gives each new host a live-migration certificate from the lab's
	// CA (herd pki migration) and points its qemu.conf at it.
	MigrationTLS bool
}

// GuestImage is the test guest (scripts/build-guest.sh).
type GuestImage struct{ Kernel, Initrd string }

// Host is one hypervisor of the lab.
type Host struct {
	lab      *Lab
	N        int
	IP       string
	NS       string
	Dir      string
	HWID     string
	URI      string // local libvirt URI (unix socket)
	PeerURI  string // what other libvirtds migrate to
	Libvirtd *Proc
	Agent    *Proc
	Status   string
	ldArgs   []string
}

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// BuildGuest builds (or reuses from the cache) the test guest image.
func BuildGuest(t testing.TB) GuestImage {
	t.Helper()
	cache := os.Getenv("HERD_CACHE")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache", "herd")
	}
	out := filepath.Join(cache, "guest")
	cmd := exec.Command(filepath.Join(repoRoot(), "scripts", "build-guest.sh"), out)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build guest: %v\n%s", err, b)
	}
	return GuestImage{Kernel: filepath.Join(out, "vmlinuz"), Initrd: filepath.Join(out, "guest.gz")}
}

// NewLab starts the lab namespace with etcd and n coordinators (coordArgs added to each).
func NewLab(t testing.TB, bin Binaries, coords int, coordArgs ...string) *Lab {
	t.Helper()
	RequireHost(t, "libvirtd", "qemu-system-x86_64", "unshare")
	if err := exec.Command("getent", "passwd", "libvirt-qemu").Run(); err != nil {
		t.Fatal("libvirtd needs the libvirt-qemu user: run `just deps`")
	}
	l := &Lab{T: t, Bin: bin, Dir: t.TempDir(), Guest: BuildGuest(t)}
	l.Console = filepath.Join(l.Dir, "console")
	if err := os.MkdirAll(l.Console, 0o755); err != nil {
		t.Fatal(err)
	}
	l.NS = NewNetns(t, "10.97.0.1/24")
	l.Endpoint = "http://10.97.0.1:2379"
	l.NS.Start(l.Dir, "etcd", bin.Herd, "etcd", "--data-dir", filepath.Join(l.Dir, "etcd"),
		"--listen-client", l.Endpoint, "--listen-peer", "http://127.0.0.1:2380", "--unsafe-no-fsync", "--auto-compaction", "24h")
	Eventually(t, 30*time.Second, "etcd up", func() error { _, err := l.Herdctl("hw", "list"); return err })
	for i := 1; i <= coords; i++ {
		l.StartCoordinator(coordArgs...)
	}
	return l
}

// StartCoordinator starts one more coordinator in the lab namespace.
func (l *Lab) StartCoordinator(args ...string) *Coordinator {
	n := len(l.Coords) + 1
	name := fmt.Sprintf("coordinator%d", n)
	addr := fmt.Sprintf("127.0.0.1:%d", 9500+n)
	p := l.NS.Start(l.Dir, name, l.Bin.Herd, append([]string{"coordinator", "--endpoints", l.Endpoint, "--name", name, "--listen", addr}, args...)...)
	co := &Coordinator{Proc: p, Status: "http://" + addr}
	l.Coords = append(l.Coords, co)
	return co
}

func (l *Lab) run(bin string, args ...string) {
	l.T.Helper()
	if out, err := exec.Command(bin, args...).CombinedOutput(); err != nil {
		l.T.Fatalf("%s %s: %v\n%s", filepath.Base(bin), strings.Join(args, " "), err, out)
	}
}

// Herdctl runs herdctl in the lab namespace.
func (l *Lab) Herdctl(args ...string) (string, error) {
	cmd := l.NS.Command(l.Bin.Herdctl, append([]string{"--endpoints", l.Endpoint}, args...)...)
	out, err := cmd.Output()
	if err != nil {
		var stderr string
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		return string(out), fmt.Errorf("herdctl %s: %v: %s", strings.Join(args, " "), err, stderr)
	}
	return string(out), nil
}

// MustHerdctl is Herdctl failing the test on error.
func (l *Lab) MustHerdctl(args ...string) string {
	l.T.Helper()
	out, err := l.Herdctl(args...)
	if err != nil {
		l.T.Fatal(err)
	}
	return out
}

// AddHost creates a host namespace wired to the lab bridge and starts its libvirtd.
func (l *Lab) AddHost() *Host {
	t := l.T
	t.Helper()
	n := len(l.Hosts) + 1
	h := &Host{lab: l, N: n, IP: fmt.Sprintf("10.97.0.%d", 10+n), Dir: filepath.Join(l.Dir, fmt.Sprintf("host%d", n)),
		HWID: fmt.Sprintf("52:54:00:00:02:%02x", n)}
	h.NS = fmt.Sprintf("%s-h%d", l.NS.Name, n)
	ipCmd(t, "netns", "add", h.NS)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", h.NS).Run() })
	ipCmd(t, "-n", h.NS, "link", "set", "lo", "up")
	ipCmd(t, "-n", l.NS.Name, "link", "add", fmt.Sprintf("vh%d", n), "type", "veth", "peer", "name", "eth0", "netns", h.NS)
	ipCmd(t, "-n", l.NS.Name, "link", "set", fmt.Sprintf("vh%d", n), "master", l.NS.Bridge, "up")
	ipCmd(t, "-n", h.NS, "addr", "add", h.IP+"/24", "dev", "eth0")
	ipCmd(t, "-n", h.NS, "link", "set", "eth0", "up")

	for _, d := range []string{"etc", "run", "lib", "cache", "log", "seeds"} {
		if err := os.MkdirAll(filepath.Join(h.Dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	conf := fmt.Sprintf(`auth_unix_rw = "none"
auth_unix_ro = "none"
unix_sock_rw_perms = "0777"
listen_tls = 0
listen_tcp = 1
listen_addr = %q
auth_tcp = "none"
host_uuid = "00000000-0000-4000-8000-%012d"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
`, h.IP, n)
	qemu := `stdio_handler = "file"
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
`
	if l.MigrationTLS {
		ca := filepath.Join(l.Dir, "pki")
		if _, err := os.Stat(filepath.Join(ca, "ca.crt")); err != nil {
			l.run(l.Bin.Herd, "pki", "init", "--dir", ca)
		}
		tlsDir := filepath.Join(h.Dir, "qemu-tls")
		l.run(l.Bin.Herd, "pki", "migration", "--dir", ca, "--host", h.IP, "--out", tlsDir)
		qemu += fmt.Sprintf("migrate_tls_x509_cert_dir = %q\nmigrate_tls_x509_verify = 1\n", tlsDir)
	}
	_ = os.WriteFile(filepath.Join(h.Dir, "etc", "libvirtd.conf"), []byte(conf), 0o644)
	_ = os.WriteFile(filepath.Join(h.Dir, "etc", "qemu.conf"), []byte(qemu), 0o644)
	for _, d := range []string{"/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt"} {
		_ = os.MkdirAll(d, 0o755)
	}
	// The seeds' directory is the agent's default path on every host, each its own (as on real
	// nodes): a migrated domain's CD-ROM path must exist on its new host.
	script := fmt.Sprintf(seedMount+" && mount --bind %[1]s/etc /etc/libvirt && mount --bind %[1]s/run /run/libvirt && "+
		"mount --bind %[1]s/lib /var/lib/libvirt && mount --bind %[1]s/cache /var/cache/libvirt && "+
		"mount --bind %[1]s/log /var/log/libvirt && exec libvirtd --listen --pid-file %[1]s/run/libvirtd.pid", h.Dir)
	h.ldArgs = []string{"netns", "exec", h.NS, "unshare", "--mount", "--propagation", "private", "sh", "-c", script}
	h.URI = fmt.Sprintf("qemu+unix:///system?socket=%s/run/libvirt-sock", h.Dir)
	h.PeerURI = fmt.Sprintf("qemu+tcp://%s/system", h.IP)
	// Guests outlive a libvirtd: destroy them before it stops (cleanups run last-in first-out).
	t.Cleanup(h.destroyGuests)
	h.StartLibvirtd()
	l.Hosts = append(l.Hosts, h)
	return h
}

// seedMount binds a host's seeds directory (format argument 1: the host's directory) over the
// agent's default --seed-dir, in the mount namespace of the command that follows.
const seedMount = "mkdir -p /var/lib/herd/seeds && mount --bind %[1]s/seeds /var/lib/herd/seeds"

// AddVMNetwork puts a bridge br0 in each host, joined to one bridge of the lab's, so that guests
// on br0 on different hosts share a link (an untagged network). Call after the hosts are added.
func (l *Lab) AddVMNetwork() {
	t := l.T
	t.Helper()
	ipCmd(t, "-n", l.NS.Name, "link", "add", "vmnet", "type", "bridge")
	ipCmd(t, "-n", l.NS.Name, "link", "set", "vmnet", "up")
	for _, h := range l.Hosts {
		ipCmd(t, "-n", h.NS, "link", "add", "br0", "type", "bridge")
		ipCmd(t, "-n", l.NS.Name, "link", "add", fmt.Sprintf("vm%d", h.N), "type", "veth", "peer", "name", "trunk0", "netns", h.NS)
		ipCmd(t, "-n", l.NS.Name, "link", "set", fmt.Sprintf("vm%d", h.N), "master", "vmnet", "up")
		ipCmd(t, "-n", h.NS, "link", "set", "trunk0", "master", "br0", "up")
		ipCmd(t, "-n", h.NS, "link", "set", "br0", "up")
	}
}

// StartLibvirtd (re)starts the host's libvirtd and waits for it.
func (h *Host) StartLibvirtd() {
	t := h.lab.T
	t.Helper()
	h.Libvirtd = Start(t, h.Dir, "libvirtd", "ip", h.ldArgs...)
	Eventually(t, 60*time.Second, fmt.Sprintf("libvirtd on host %d", h.N), func() error {
		c, err := libvirt.NewConnect(h.URI)
		if err != nil {
			return err
		}
		_, _ = c.Close()
		return nil
	})
}

// destroyGuests destroys every domain of the host's libvirtd, and as a last resort kills the QEMU
// processes whose pid files that libvirtd wrote (they are this test's own).
func (h *Host) destroyGuests() {
	if h.Libvirtd != nil && h.Libvirtd.Running() {
		if c, err := libvirt.NewConnect(h.URI); err == nil {
			doms, _ := c.ListAllDomains(0)
			for i := range doms {
				if active, _ := doms[i].IsActive(); active {
					_ = doms[i].Destroy()
				}
				_ = doms[i].Undefine()
				_ = doms[i].Free()
			}
			_, _ = c.Close()
		}
	}
	pids, _ := filepath.Glob(filepath.Join(h.Dir, "run", "qemu", "*.pid"))
	for _, p := range pids {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 1 {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	// libvirtd probes QEMU's capabilities with a daemonized `qemu -machine none` that leaves its
	// process group; a libvirtd stopped mid-probe leaves it running. Its pid file sits in a
	// qmp-XXXXXX dir under this host's /var/lib/libvirt; the dir's name is on its command line,
	// which guards against a reused pid.
	probes, _ := filepath.Glob(filepath.Join(h.Dir, "lib", "qemu", "qmp-*", "qmp.pid"))
	for _, p := range probes {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 1 {
			continue
		}
		if cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil &&
			strings.Contains(string(cmdline), filepath.Base(filepath.Dir(p))) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// StartAgent starts the host's agent, enrolling the host first.
func (h *Host) StartAgent(extra ...string) *Proc {
	l := h.lab
	l.T.Helper()
	if _, err := l.Herdctl("hw", "list", "-o", "json"); err == nil {
		out, _ := l.Herdctl("hw", "list")
		if !strings.Contains(out, h.HWID) {
			l.MustHerdctl("hw", "add", h.HWID)
		}
	}
	h.Status = "http://" + h.IP + ":9480"
	args := append([]string{"agent", "--endpoints", l.Endpoint, "--hwid", h.HWID, "--libvirt-uri", h.URI,
		"--migration-uri", h.PeerURI, "--address-migration", h.IP, "--address-management", h.IP,
		"--listen", h.IP + ":9480", "--console-dir", l.Console, "--domain-type", "qemu",
		"--volume-dir", filepath.Join(l.Dir, "volumes"), "--cpus", "4", "--memory", "4GiB",
		"--boot-dir", filepath.Dir(l.Guest.Kernel)}, extra...)
	// In a mount namespace of its own, where the seeds' directory is this host's (see AddHost).
	wrap := []string{"netns", "exec", h.NS, "unshare", "--mount", "--propagation", "private", "sh", "-c",
		fmt.Sprintf(seedMount, h.Dir) + ` && exec "$0" "$@"`, l.Bin.Herd}
	h.Agent = Start(l.T, h.Dir, "agent", "ip", append(wrap, args...)...)
	return h.Agent
}

// Domains lists the host's domains straight from its libvirtd.
func (h *Host) Domains() (map[string]libvirt.DomainState, error) {
	c, err := libvirt.NewConnect(h.URI)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	doms, err := c.ListAllDomains(0)
	if err != nil {
		return nil, err
	}
	out := map[string]libvirt.DomainState{}
	for i := range doms {
		name, _ := doms[i].GetName()
		st, _, _ := doms[i].GetState()
		out[name] = st
		_ = doms[i].Free()
	}
	return out, nil
}

var counterRE = regexp.MustCompile(`^guest (\S+): (counter (\d+)|booted)`)

// Console reads a VM's console log: how often the guest booted, its counters in order, whether it
// shut down cleanly.
type Console struct {
	Boots    int
	Counters []int
	Clean    bool
}

// ReadConsole parses the console log of vm.
func (l *Lab) ReadConsole(vm string) Console {
	var c Console
	f, err := os.Open(filepath.Join(l.Console, vm+".log"))
	if err != nil {
		return c
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.Contains(line, "ACPI power button: shutting down cleanly") {
			c.Clean = true
		}
		m := counterRE.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		if m[2] == "booted" {
			c.Boots++
			continue
		}
		n, _ := strconv.Atoi(m[3])
		c.Counters = append(c.Counters, n)
	}
	return c
}

// Last is the last counter printed, or -1.
func (c Console) Last() int {
	if len(c.Counters) == 0 {
		return -1
	}
	return c.Counters[len(c.Counters)-1]
}

// Unbroken reports whether the counter never went backwards (a restart starts again at 0).
func (c Console) Unbroken() error {
	for i := 1; i < len(c.Counters); i++ {
		if c.Counters[i] < c.Counters[i-1] {
			return fmt.Errorf("counter went from %d to %d: the guest restarted", c.Counters[i-1], c.Counters[i])
		}
	}
	return nil
}

// CephConf is the lab's Ceph cluster, once StartCeph ran.
type CephConf struct {
	Conf, Keyring string
}

// StartCeph runs the single-node Ceph rig (scripts/ceph-rig.sh) inside the lab namespace on the
// bridge address, so every host reaches it over the network with its own address. Stopped at cleanup.
func (l *Lab) StartCeph() CephConf {
	t := l.T
	t.Helper()
	RequireHost(t, "ceph-mon", "ceph-osd", "rbd", "uuidgen")
	dir := filepath.Join(l.Dir, "ceph")
	script := filepath.Join(repoRoot(), "scripts", "ceph-rig.sh")
	t.Cleanup(func() { _ = l.NS.Command(script, "stop", dir).Run() })
	if out, err := l.NS.Command(script, "start", dir, "10.97.0.1").CombinedOutput(); err != nil {
		t.Fatalf("ceph rig: %v\n%s", err, out)
	}
	return CephConf{Conf: filepath.Join(dir, "ceph.conf"), Keyring: filepath.Join(dir, "admin.keyring")}
}

// ConsoleHas reports whether vm's console log contains s.
func (l *Lab) ConsoleHas(vm, s string) bool {
	b, _ := os.ReadFile(filepath.Join(l.Console, vm+".log"))
	return strings.Contains(string(b), s)
}

// Partition cuts the host off from etcd (tcp 2379 to the lab bridge) while its Ceph traffic still
// flows: the dangerous case, a node that can write its VMs' disks but no longer hears the cluster.
func (h *Host) Partition() {
	t := h.lab.T
	t.Helper()
	for _, args := range [][]string{
		{"add", "table", "inet", "herdpart"},
		{"add", "chain", "inet", "herdpart", "out", "{ type filter hook output priority 0; policy accept; }"},
		{"add", "rule", "inet", "herdpart", "out", "ip", "daddr", "10.97.0.1", "tcp", "dport", "2379", "drop"},
	} {
		if out, err := exec.Command("ip", append([]string{"netns", "exec", h.NS, "nft"}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("nft %v: %v: %s", args, err, out)
		}
	}
}

// Heal removes the partition.
func (h *Host) Heal() {
	t := h.lab.T
	t.Helper()
	if out, err := exec.Command("ip", "netns", "exec", h.NS, "nft", "delete", "table", "inet", "herdpart").CombinedOutput(); err != nil {
		t.Fatalf("nft delete: %v: %s", err, out)
	}
}

// Disk reads the first n bytes of an RBD image with the rbd CLI inside the lab namespace.
func (l *Lab) Disk(c CephConf, image string, n int) []byte {
	l.T.Helper()
	out := filepath.Join(l.Dir, "export-"+strings.ReplaceAll(image, "/", "_"))
	_ = os.Remove(out)
	if b, err := l.NS.Command("rbd", "-c", c.Conf, "--keyring", c.Keyring, "export", image, out).CombinedOutput(); err != nil {
		l.T.Fatalf("rbd export %s: %v: %s", image, err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		l.T.Fatal(err)
	}
	if len(b) > n {
		b = b[:n]
	}
	return b
}

// Ceph runs the ceph CLI inside the lab namespace.
func (l *Lab) Ceph(c CephConf, args ...string) string {
	l.T.Helper()
	b, err := l.NS.Command("ceph", append([]string{"-c", c.Conf, "--keyring", c.Keyring}, args...)...).CombinedOutput()
	if err != nil {
		l.T.Fatalf("ceph %v: %v: %s", args, err, b)
	}
	return string(b)
}
