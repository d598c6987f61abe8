// Package qemu runs herd on real hypervisors: hosts in network namespaces, each with its own
// libvirtd, real QEMU guests (TCG) that print a counter on their serial console. Heavy: run alone.
package qemu

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"libvirt.org/go/libvirt"

	"github.com/herdhq/herd/e2e/rig"
	"github.com/herdhq/herd/lib/keys"
)

var bin rig.Binaries

func TestMain(m *testing.M) { rig.Main(m, "herd-qemu-bin-", &bin) }

type vmRow struct {
	Name      string `json:"name"`
	State     string `json:"state"`
	Placement *struct {
		Node      string `json:"node"`
		Epoch     int64  `json:"epoch"`
		Migration *struct {
			ID string `json:"id"`
			To string `json:"to"`
		} `json:"migration"`
	} `json:"placement"`
	Problem *struct {
		Message string `json:"message"`
	} `json:"problem"`
}

func vms(l *rig.Lab) map[string]vmRow {
	out, err := l.Herdctl("vm", "list", "-o", "json")
	if err != nil {
		return nil
	}
	var rows []vmRow
	_ = json.Unmarshal([]byte(out), &rows)
	m := map[string]vmRow{}
	for _, r := range rows {
		m[r.Name] = r
	}
	return m
}

// guest creates a VM booting the test guest.
func guest(l *rig.Lab, name string, extra ...string) {
	l.MustHerdctl(append([]string{"vm", "create", name, "--memory", "128MiB", "--kernel", l.Guest.Kernel,
		"--initrd", l.Guest.Initrd, "--cmdline", "console=ttyS0 quiet herd.guest=" + name}, extra...)...)
}

// counting waits until each guest has booted and printed a few counters.
func counting(t *testing.T, l *rig.Lab, names ...string) {
	t.Helper()
	rig.Eventually(t, 120*time.Second, "guests counting", func() error {
		for _, n := range names {
			if c := l.ReadConsole(n); c.Boots != 1 || c.Last() < 2 {
				return fmt.Errorf("%s: %d boots, last counter %d", n, c.Boots, c.Last())
			}
		}
		return nil
	})
}

// runsOnlyOn checks with libvirt itself that vm runs on host and nowhere else.
func runsOnlyOn(l *rig.Lab, vm string, host *rig.Host) error {
	for _, h := range l.Hosts {
		doms, err := h.Domains()
		if err != nil {
			if h.Libvirtd.Running() {
				return err
			}
			continue
		}
		st, ok := doms[vm]
		running := ok && st == libvirt.DOMAIN_RUNNING
		if h == host && !running {
			return fmt.Errorf("%s does not run on host %d (%v)", vm, h.N, doms)
		}
		if h != host && running {
			return fmt.Errorf("%s also runs on host %d", vm, h.N)
		}
	}
	return nil
}

func hostOf(l *rig.Lab, hwid string) *rig.Host {
	for _, h := range l.Hosts {
		if h.HWID == hwid {
			return h
		}
	}
	return nil
}

// TestDrainLiveMigrationAdoptionPower: four guests on host 1; drain host 1: they move live (the
// counters go on, each guest booted once) and host 1 ends drained. kill -9 an agent: its guests
// keep running and the restarted agent adopts them. A stopped power state shuts a guest down through
// ACPI (its own shutdown), running boots it again; a restart-policy VM leaves a drained node by
// stop and start.
func TestDrainLiveMigrationAdoptionPower(t *testing.T) {
	l := rig.NewLab(t, bin, 1, "--session-ttl", "2s", "--strategy", "binpack")
	for range 3 {
		l.AddHost().StartAgent("--shutdown-timeout", "30s", "--resync", "5s")
	}
	rig.Eventually(t, 60*time.Second, "three nodes ready", func() error {
		if n := strings.Count(l.MustHerdctl("node", "list"), " ready "); n != 3 {
			return fmt.Errorf("%d ready", n)
		}
		return nil
	})
	h1 := l.Hosts[0]
	names := []string{"g1", "g2", "g3", "g4"}
	for _, n := range names {
		guest(l, n)
	}
	counting(t, l, names...)
	for _, n := range names {
		if err := runsOnlyOn(l, n, h1); err != nil {
			t.Fatalf("binpack: %v", err)
		}
	}
	before := map[string]int{}
	for _, n := range names {
		before[n] = l.ReadConsole(n).Last()
	}

	start := time.Now()
	l.MustHerdctl("node", "drain", h1.HWID, "--wait", "--wait-timeout", "5m")
	drain := time.Since(start)
	rows := vms(l)
	for _, n := range names {
		r := rows[n]
		if r.State != "running" || r.Placement == nil || r.Placement.Node == h1.HWID || r.Placement.Epoch != 2 {
			t.Fatalf("%s after drain: %+v", n, r)
		}
		if err := runsOnlyOn(l, n, hostOf(l, r.Placement.Node)); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(2 * time.Second)
	for _, n := range names {
		c := l.ReadConsole(n)
		if c.Boots != 1 || c.Unbroken() != nil || c.Last() <= before[n] {
			t.Fatalf("%s restarted or stopped during live migration: boots %d, %v, last %d (before %d)", n, c.Boots, c.Unbroken(), c.Last(), before[n])
		}
	}
	if out := l.MustHerdctl("node", "list"); !strings.Contains(out, "cordoned,drained") {
		t.Fatalf("host 1 not drained:\n%s", out)
	}
	t.Logf("drain of 4 live VMs: %s; agent RSS %s", drain.Round(100*time.Millisecond), rss(l.Hosts[1].Agent.Pid()))
	if ev := l.MustHerdctl("events", "--object", "vm/g1"); !strings.Contains(ev, "migrated") {
		t.Fatalf("no migration event:\n%s", ev)
	}
	checkConsole(t, l, "g3")

	// kill -9 the agent of a host with guests: they keep running; a new agent adopts them.
	h2 := hostOf(l, rows["g1"].Placement.Node)
	var onH2 []string
	for _, n := range names {
		if rows[n].Placement.Node == h2.HWID {
			onH2 = append(onH2, n)
		}
	}
	h2.Agent.Kill()
	time.Sleep(2 * time.Second)
	for _, n := range onH2 {
		if err := runsOnlyOn(l, n, h2); err != nil {
			t.Fatalf("after the agent died: %v", err)
		}
	}
	h2.StartAgent("--shutdown-timeout", "30s")
	time.Sleep(5 * time.Second)
	for _, n := range onH2 {
		c := l.ReadConsole(n)
		if c.Boots != 1 || c.Unbroken() != nil {
			t.Fatalf("%s was restarted by adoption: %d boots, %v", n, c.Boots, c.Unbroken())
		}
		if vms(l)[n].State != "running" {
			t.Fatalf("%s not reported running after adoption", n)
		}
	}

	// A guest's QEMU dies: its node starts it again (a second boot there), with an event.
	gh := hostOf(l, vms(l)["g2"].Placement.Node)
	if err := syscall.Kill(qemuPidOf(t, gh, "g2"), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	rig.Eventually(t, 120*time.Second, "g2 booted again on its node after its QEMU died", func() error {
		if c := l.ReadConsole("g2"); c.Boots != 2 {
			return fmt.Errorf("%d boots", c.Boots)
		}
		return runsOnlyOn(l, "g2", gh)
	})
	t.Logf("QEMU killed: the guest booted again on its node %s later", time.Since(killed).Round(100*time.Millisecond))
	if ev := l.MustHerdctl("events", "--object", "vm/g2"); !strings.Contains(ev, "crashed") {
		t.Fatalf("no crash event:\n%s", ev)
	}

	// libvirtd dies: the node takes no VMs and says why, its guests keep running; once libvirtd
	// is back the agent connects again and adopts them as they are.
	lastBefore := l.ReadConsole("g2").Last()
	if err := gh.Libvirtd.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	rig.Eventually(t, 60*time.Second, "the node reports libvirtd down", func() error {
		if out := l.MustHerdctl("node", "get", gh.HWID); !strings.Contains(out, "libvirtd does not answer") {
			return fmt.Errorf("node:\n%s", out)
		}
		return nil
	})
	if err := syscall.Kill(qemuPidOf(t, gh, "g2"), 0); err != nil {
		t.Fatalf("g2's QEMU died with libvirtd: %v", err)
	}
	gh.StartLibvirtd()
	rig.Eventually(t, 60*time.Second, "the agent connected again and adopted g2", func() error {
		if out := l.MustHerdctl("node", "get", gh.HWID); strings.Contains(out, "libvirtd does not answer") {
			return fmt.Errorf("node:\n%s", out)
		}
		if r := vms(l)["g2"]; r.State != "running" {
			return fmt.Errorf("g2 %+v", r)
		}
		return nil
	})
	time.Sleep(2 * time.Second)
	if c := l.ReadConsole("g2"); c.Boots != 2 || c.Last() <= lastBefore {
		t.Fatalf("g2 restarted or stopped while libvirtd was away: %d boots, counter %d (was %d)", c.Boots, c.Last(), lastBefore)
	}
	if ev := l.MustHerdctl("events", "--object", "node/"+gh.HWID); !strings.Contains(ev, "libvirtd-down") || !strings.Contains(ev, "libvirtd-back") {
		t.Fatalf("no libvirtd events:\n%s", ev)
	}

	// Power: stopped shuts the guest down through ACPI; running boots it again.
	_ = os.WriteFile(l.Dir+"/stop.yaml", []byte(fmt.Sprintf("name: g1\nvcpus: 1\nmemory_mib: 128\npower: stopped\nboot: {kernel: %s, initrd: %s, cmdline: \"console=ttyS0 quiet herd.guest=g1\"}\n", l.Guest.Kernel, l.Guest.Initrd)), 0o644)
	l.MustHerdctl("vm", "apply", "-f", l.Dir+"/stop.yaml")
	rig.Eventually(t, 60*time.Second, "g1 stopped", func() error {
		if r := vms(l)["g1"]; r.State != "stopped" {
			return fmt.Errorf("%+v", r)
		}
		return nil
	})
	if c := l.ReadConsole("g1"); !c.Clean {
		b, _ := os.ReadFile(l.Console + "/g1.log")
		lines := strings.Split(string(b), "\n")
		t.Fatalf("g1 stopped without its own ACPI shutdown; console ends:\n%s", strings.Join(lines[max(0, len(lines)-15):], "\n"))
	}
	if log := rig.Tail(hostOf(l, vms(l)["g1"].Placement.Node).Agent.Log, 200); strings.Contains(log, "fallback") {
		t.Fatalf("the destroy fallback was used:\n%s", log)
	}
	_ = os.WriteFile(l.Dir+"/start.yaml", []byte(strings.Replace(string(must(os.ReadFile(l.Dir+"/stop.yaml"))), "power: stopped", "power: running", 1)), 0o644)
	l.MustHerdctl("vm", "apply", "-f", l.Dir+"/start.yaml")
	rig.Eventually(t, 120*time.Second, "g1 booted again", func() error {
		if c := l.ReadConsole("g1"); c.Boots != 2 {
			return fmt.Errorf("%d boots", c.Boots)
		}
		return nil
	})

	// A restart-policy VM leaves a drained node by stop and start.
	l.MustHerdctl("node", "uncordon", h1.HWID)
	guest(l, "r1", "--migration-policy", "restart")
	counting(t, l, "r1")
	rh := hostOf(l, vms(l)["r1"].Placement.Node)
	l.MustHerdctl("node", "drain", rh.HWID, "--wait", "--wait-timeout", "5m")
	rig.Eventually(t, 120*time.Second, "r1 restarted elsewhere", func() error {
		r := vms(l)["r1"]
		c := l.ReadConsole("r1")
		if r.State != "running" || r.Placement.Node == rh.HWID || c.Boots != 2 || !c.Clean {
			return fmt.Errorf("%+v, boots %d, clean %v", r, c.Boots, c.Clean)
		}
		return runsOnlyOn(l, "r1", hostOf(l, r.Placement.Node))
	})
}

// qemuPidOf reads the pid of a guest's QEMU from the pid file the host's libvirtd wrote.
func qemuPidOf(t *testing.T, h *rig.Host, vm string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(h.Dir, "run", "qemu", vm+".pid"))
	if err != nil {
		t.Fatalf("QEMU pid file of %s: %v", vm, err)
	}
	var pid int
	if _, err := fmt.Sscan(string(b), &pid); err != nil || pid <= 1 {
		t.Fatalf("QEMU pid file of %s: %q", vm, b)
	}
	return pid
}

// rss reads a process's resident set size.
func rss(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "?"
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			return strings.TrimSpace(strings.TrimPrefix(line, "VmRSS:"))
		}
	}
	return "?"
}

func must(b []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return b
}

// TestMigrationFailures: a migration whose destination libvirtd dies leaves the VM running on its
// source; a leader killed mid-migration leaves the VM on exactly one host, running, counter unbroken.
func TestMigrationFailures(t *testing.T) {
	l := rig.NewLab(t, bin, 2, "--session-ttl", "2s", "--strategy", "binpack")
	for range 3 {
		l.AddHost().StartAgent()
	}
	rig.Eventually(t, 60*time.Second, "three nodes ready", func() error {
		if n := strings.Count(l.MustHerdctl("node", "list"), " ready "); n != 3 {
			return fmt.Errorf("%d ready", n)
		}
		return nil
	})
	guest(l, "f1")
	guest(l, "f2")
	counting(t, l, "f1", "f2")
	h1, h2, h3 := l.Hosts[0], l.Hosts[1], l.Hosts[2]
	if err := runsOnlyOn(l, "f1", h1); err != nil {
		t.Fatal(err)
	}

	// The destination's libvirtd dies as the migration starts.
	l.MustHerdctl("vm", "migrate", "f1", "--to", h2.HWID)
	rig.Eventually(t, 30*time.Second, "migration opened", func() error {
		if r := vms(l)["f1"]; r.Placement == nil || r.Placement.Migration == nil {
			return fmt.Errorf("%+v", r)
		}
		return nil
	})
	_ = h2.Libvirtd.Signal(syscall.SIGKILL)
	rig.Eventually(t, 120*time.Second, "migration aborted, VM stays on its source", func() error {
		r := vms(l)["f1"]
		if r.Placement == nil || r.Placement.Migration != nil || r.Placement.Node != h1.HWID || r.State != "running" {
			return fmt.Errorf("%+v", r)
		}
		if r.Problem == nil || !strings.Contains(r.Problem.Message, "migration to") {
			return fmt.Errorf("no problem recorded: %+v", r)
		}
		return nil
	})
	if err := runsOnlyOn(l, "f1", h1); err != nil {
		t.Fatal(err)
	}
	if c := l.ReadConsole("f1"); c.Boots != 1 || c.Unbroken() != nil {
		t.Fatalf("f1 restarted: %+v", c)
	}
	if ev := l.MustHerdctl("events", "--object", "vm/f1"); !strings.Contains(ev, "migration-aborted") {
		t.Fatalf("no event:\n%s", ev)
	}

	// The leader dies right after opening a migration.
	leader := l.Coords[0]
	if !leader.IsLeader() {
		leader = l.Coords[1]
	}
	l.MustHerdctl("vm", "migrate", "f2", "--to", h3.HWID)
	rig.Eventually(t, 30*time.Second, "migration opened", func() error {
		if r := vms(l)["f2"]; r.Placement == nil || r.Placement.Migration == nil {
			return fmt.Errorf("%+v", r)
		}
		return nil
	})
	leader.Kill()
	rig.Eventually(t, 120*time.Second, "f2 settled on exactly one host", func() error {
		r := vms(l)["f2"]
		if r.Placement == nil || r.Placement.Migration != nil || r.State != "running" {
			return fmt.Errorf("%+v", r)
		}
		return runsOnlyOn(l, "f2", hostOf(l, r.Placement.Node))
	})
	time.Sleep(2 * time.Second)
	if c := l.ReadConsole("f2"); c.Boots != 1 || c.Unbroken() != nil {
		t.Fatalf("f2 restarted: %+v", c)
	}
	t.Logf("f2 ended on %s", vms(l)["f2"].Placement.Node)
}

// TestRBDDiskFollowsTheVM: a guest boots from its RBD disk's host, writes a marker on the disk, is
// stopped (ACPI), moved to another host and started there, and reads the marker back.
func TestRBDDiskFollowsTheVM(t *testing.T) {
	l := rig.NewLab(t, bin, 0)
	ceph := l.StartCeph()
	cephArgs := []string{"--ceph-conf", ceph.Conf, "--ceph-user", "admin", "--ceph-keyring", ceph.Keyring}
	l.StartCoordinator(append([]string{"--session-ttl", "2s", "--strategy", "binpack", "--pools", "rbd"}, cephArgs...)...)
	for range 2 {
		l.AddHost().StartAgent(cephArgs...)
	}
	rig.Eventually(t, 60*time.Second, "two nodes ready", func() error {
		if n := strings.Count(l.MustHerdctl("node", "list"), " ready "); n != 2 {
			return fmt.Errorf("%d ready", n)
		}
		return nil
	})
	spec := func(power string) string {
		f := l.Dir + "/d1-" + power + ".yaml"
		_ = os.WriteFile(f, []byte(fmt.Sprintf("name: d1\nvcpus: 1\nmemory_mib: 128\npower: %s\ndisk: {pool: rbd, size_gib: 1}\nboot: {kernel: %s, initrd: %s, cmdline: \"console=ttyS0 quiet herd.guest=d1\"}\n", power, l.Guest.Kernel, l.Guest.Initrd)), 0o644)
		return f
	}
	l.MustHerdctl("vm", "apply", "-f", spec("running"))
	rig.Eventually(t, 120*time.Second, "marker written on the RBD disk", func() error {
		if !l.ConsoleHas("d1", "guest d1: wrote marker") {
			return fmt.Errorf("no marker yet")
		}
		return nil
	})
	first := vms(l)["d1"].Placement.Node
	l.MustHerdctl("vm", "apply", "-f", spec("stopped"))
	rig.Eventually(t, 60*time.Second, "d1 stopped", func() error {
		if r := vms(l)["d1"]; r.State != "stopped" {
			return fmt.Errorf("%+v", r)
		}
		return nil
	})
	var other *rig.Host
	for _, h := range l.Hosts {
		if h.HWID != first {
			other = h
		}
	}
	l.MustHerdctl("vm", "migrate", "d1", "--to", other.HWID)
	rig.Eventually(t, 60*time.Second, "d1 moved while stopped", func() error {
		if r := vms(l)["d1"]; r.Placement == nil || r.Placement.Node != other.HWID || r.Placement.Migration != nil {
			return fmt.Errorf("%+v", r)
		}
		return nil
	})
	l.MustHerdctl("vm", "apply", "-f", spec("running"))
	rig.Eventually(t, 120*time.Second, "marker read back on the other host", func() error {
		if !l.ConsoleHas("d1", "guest d1: found marker: herd-marker d1") {
			return fmt.Errorf("not yet")
		}
		return runsOnlyOn(l, "d1", other)
	})
}

// TestMigrationOverTLS: with --migrate-tls the memory stream is QEMU's native TLS, with
// certificates from the cluster CA naming each node's migration address (herd pki migration). A
// guest moves live between two such hosts; a third host whose qemu.conf has no certificates
// refuses the migration, and the guest stays where it runs: TLS is really required, not optional.
func TestMigrationOverTLS(t *testing.T) {
	l := rig.NewLab(t, bin, 1, "--session-ttl", "2s", "--strategy", "binpack")
	l.MigrationTLS = true
	h1, h2 := l.AddHost(), l.AddHost()
	l.MigrationTLS = false
	h3 := l.AddHost()
	for _, h := range l.Hosts {
		h.StartAgent("--migrate-tls")
	}
	rig.Eventually(t, 60*time.Second, "three nodes ready", func() error {
		if n := strings.Count(l.MustHerdctl("node", "list"), " ready "); n != 3 {
			return fmt.Errorf("%d ready", n)
		}
		return nil
	})
	l.MustHerdctl("node", "cordon", h2.HWID)
	l.MustHerdctl("node", "cordon", h3.HWID)
	guest(l, "tls1")
	counting(t, l, "tls1")
	if err := runsOnlyOn(l, "tls1", h1); err != nil {
		t.Fatal(err)
	}
	l.MustHerdctl("node", "uncordon", h2.HWID)
	l.MustHerdctl("node", "uncordon", h3.HWID)

	// To a host without certificates: refused, the guest keeps running on h1.
	l.MustHerdctl("vm", "migrate", "tls1", "--to", h3.HWID)
	rig.Eventually(t, 120*time.Second, "migration to the host without certificates refused", func() error {
		r := vms(l)["tls1"]
		if r.Placement == nil || r.Placement.Migration != nil || r.Placement.Node != h1.HWID || r.Problem == nil {
			return fmt.Errorf("%+v", r)
		}
		return nil
	})
	if err := runsOnlyOn(l, "tls1", h1); err != nil {
		t.Fatal(err)
	}
	ev := l.MustHerdctl("events", "--object", "vm/tls1")
	if !strings.Contains(ev, "migration-failed") {
		t.Fatalf("no migration-failed event:\n%s", ev)
	}
	t.Logf("refused: %s", vms(l)["tls1"].Problem.Message)

	// To a host with certificates: live, over TLS.
	l.MustHerdctl("vm", "migrate", "tls1", "--to", h2.HWID)
	rig.Eventually(t, 120*time.Second, "tls1 on host 2", func() error {
		r := vms(l)["tls1"]
		if r.Placement == nil || r.Placement.Migration != nil || r.Placement.Node != h2.HWID || r.State != "running" {
			return fmt.Errorf("%+v", r)
		}
		return runsOnlyOn(l, "tls1", h2)
	})
	time.Sleep(2 * time.Second)
	if c := l.ReadConsole("tls1"); c.Boots != 1 || c.Unbroken() != nil {
		t.Fatalf("tls1 restarted: %+v", c)
	}
}

// TestRollingUpgrade: three real hypervisors run six counting guests; `herdctl rollout start`
// moves every node from image v1 to v2 with at most one unavailable. The rig plays the firmware:
// an agent's reboot command restarts it as a new boot reporting the image it is pinned to. The
// leader is killed with SIGKILL mid-way; the rollout completes. Every guest's counter runs on
// unbroken (no VM was stopped) and etcd's history shows never two nodes unavailable at once.
func TestRollingUpgrade(t *testing.T) {
	l := rig.NewLab(t, bin, 2, "--session-ttl", "2s", "--strategy", "spread")
	dir := t.TempDir()
	for _, v := range []string{"v1", "v2"} {
		k, i := dir+"/"+v+"-vmlinuz", dir+"/"+v+"-initrd"
		_ = os.WriteFile(k, []byte("kernel "+v), 0o644)
		_ = os.WriteFile(i, []byte("initrd "+v), 0o644)
		l.MustHerdctl("image", "add", v, "--kernel", k, "--initrd", i)
	}
	l.MustHerdctl("image", "set-current", "v1")

	var fw *rig.Firmware
	boots := 0
	start := func(h *rig.Host, image string) {
		boots++
		// Small nodes (the capacity override): two of them hold all six guests, one cannot.
		h.StartAgent("--image", image, "--boot-id", fmt.Sprintf("boot-%d", boots), "--reboot-command", fw.Command(h.HWID),
			"--memory", "640MiB", "--lease-ttl", "3s", "--resync", "2s")
	}
	herdctl := func(args ...string) string {
		out, err := l.Herdctl(args...)
		if err != nil {
			t.Error(err)
		}
		return out
	}
	var mu sync.Mutex
	fw = rig.StartFirmware(t, func(hwid string) {
		mu.Lock()
		defer mu.Unlock()
		h := hostOf(l, strings.TrimPrefix(hwid, "!"))
		h.Agent.Stop(10 * time.Second)
		start(h, rig.PinnedImage(t, herdctl, h.HWID))
	})
	mu.Lock()
	for range 3 {
		start(l.AddHost(), "v1")
	}
	mu.Unlock()
	rig.Eventually(t, 60*time.Second, "three nodes ready", func() error {
		if n := strings.Count(l.MustHerdctl("node", "list"), " ready "); n != 3 {
			return fmt.Errorf("%d ready", n)
		}
		return nil
	})
	var names []string
	for i := range 6 {
		names = append(names, fmt.Sprintf("g%d", i))
		guest(l, names[i])
	}
	counting(t, l, names...)

	began := time.Now()
	l.MustHerdctl("rollout", "start", "--image", "v2", "--max-unavailable", "1", "--node-timeout", "5m")
	rollout := func() (state string, per map[string]string) {
		var v struct {
			State string `json:"state"`
			Per   map[string]struct {
				Phase string `json:"phase"`
			} `json:"per_node"`
		}
		out, _ := l.Herdctl("rollout", "status", "-o", "json")
		_ = json.Unmarshal([]byte(out), &v)
		per = map[string]string{}
		for k, p := range v.Per {
			per[k] = p.Phase
		}
		return v.State, per
	}
	rig.Eventually(t, 180*time.Second, "the first node upgraded, the second under way", func() error {
		_, per := rollout()
		done, under := 0, 0
		for _, p := range per {
			switch p {
			case "done":
				done++
			case "draining", "rebooting":
				under++
			}
		}
		if done < 1 || under < 1 {
			return fmt.Errorf("%v", per)
		}
		return nil
	})
	leader := l.Coords[0]
	if !leader.IsLeader() {
		leader = l.Coords[1]
	}
	leader.Kill()
	t.Logf("killed the leader mid-rollout")
	rig.Eventually(t, 300*time.Second, "rollout done", func() error {
		if st, per := rollout(); st != "done" {
			return fmt.Errorf("%s %v", st, per)
		}
		return nil
	})
	took := time.Since(began)
	status := l.MustHerdctl("rollout", "status")
	t.Logf("rollout of 3 nodes with 6 guests took %s:\n%s", took.Round(time.Second), status)
	nl := l.MustHerdctl("node", "list")
	if strings.Count(nl, " v2 ") != 3 || strings.Contains(nl, "cordoned") {
		t.Fatalf("not every node on v2 and schedulable:\n%s", nl)
	}
	time.Sleep(3 * time.Second)
	for _, n := range names {
		if c := l.ReadConsole(n); c.Boots != 1 || c.Unbroken() != nil {
			t.Fatalf("guest %s was restarted or lost time: %+v", n, c)
		}
		if r := vms(l)[n]; r.State != "running" {
			t.Fatalf("guest %s: %+v", n, r)
		}
	}
	evs := l.History("/herd/node")
	worst, when := rig.MostUnavailable(evs, keys.MustSpace("/herd"), []string{l.Hosts[0].HWID, l.Hosts[1].HWID, l.Hosts[2].HWID})
	if worst > 1 {
		t.Fatalf("%d nodes unavailable at once (max 1) at %s", worst, when)
	}
	t.Logf("history: at most %d node unavailable at once (%s); %d events replayed", worst, when, len(evs))
}
