package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/herdhq/herd/e2e/rig"
	"github.com/herdhq/herd/lib/keys"
)

// TestDevDemo runs `herd dev` (what `just demo` runs) as a newcomer would: from the banner's
// exports, herdctl (TLS, as the dev operator) creates a VM, and a rollout reboots every simulated
// node in-process onto the new image — never running a reboot command on this machine — with the
// VM moving out of the way; the agents' metrics survive the reboots; Ctrl-C stops everything cleanly.
func TestDevDemo(t *testing.T) {
	dir := t.TempDir()
	// Should a reboot ever reach a shell again, it hits this stand-in, not the machine's systemctl.
	fake := filepath.Join(dir, "bin")
	marker := filepath.Join(dir, "systemctl-called")
	if err := os.MkdirAll(fake, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"systemctl", "reboot"} {
		script := fmt.Sprintf("#!/bin/sh\necho \"$0 $*\" >> %s\nexit 1\n", marker)
		if err := os.WriteFile(filepath.Join(fake, name), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("PATH", fake+string(os.PathListSeparator)+os.Getenv("PATH"))
	status := fmt.Sprintf("127.0.0.1:%d", rig.FreePort(t))
	p := rig.Start(t, dir, "herd-dev", bin.Herd, "dev", "--data-dir", filepath.Join(dir, "data"),
		"--etcd-client-url", fmt.Sprintf("http://127.0.0.1:%d", rig.FreePort(t)),
		"--etcd-peer-url", fmt.Sprintf("http://127.0.0.1:%d", rig.FreePort(t)),
		"--listen", status, "--lease-ttl", "3s", "--session-ttl", "2s", "--ui-listen", "127.0.0.1:0")

	// The banner's exports are all a newcomer gets.
	var env []string
	rig.Eventually(t, 90*time.Second, "herd dev banner", func() error {
		b, _ := os.ReadFile(p.Log)
		env = nil
		for _, line := range strings.Split(string(b), "\n") {
			line, _, _ = strings.Cut(strings.TrimSpace(line), "#")
			if rest, ok := strings.CutPrefix(line, "export "); ok {
				env = append(env, strings.Fields(rest)...)
			}
		}
		if len(env) < 4 || !strings.Contains(string(b), "Ctrl-C stops everything") {
			return fmt.Errorf("no banner yet (exports %v)", env)
		}
		return nil
	})
	try := func(args ...string) (string, error) {
		cmd := exec.Command(bin.Herdctl, args...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	herdctl := func(args ...string) string {
		t.Helper()
		out, err := try(args...)
		if err != nil {
			t.Fatalf("herdctl %v: %v\n%s", args, err, out)
		}
		return out
	}
	rig.Eventually(t, 30*time.Second, "three nodes ready", func() error {
		if n := strings.Count(herdctl("node", "list"), " ready "); n != 3 {
			return fmt.Errorf("%d ready", n)
		}
		return nil
	})
	herdctl("vm", "create", "web1", "--vcpus", "2", "--memory", "1GiB", "--disk", "10GiB", "--migration-policy", "restart")
	rig.Eventually(t, 30*time.Second, "web1 running", func() error {
		if out := herdctl("vm", "get", "web1"); !strings.Contains(out, "running") {
			return fmt.Errorf("%s", out)
		}
		return nil
	})
	// The banner's web console shows it, as the dev operator.
	b, _ := os.ReadFile(p.Log)
	console := ""
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(line), "web console"); ok {
			console = strings.TrimSpace(rest)
		}
	}
	rig.Eventually(t, 10*time.Second, "web1 on the console's VMs page", func() error {
		out, err := exec.Command("curl", "-sf", console+"vms").Output()
		if err != nil || !strings.Contains(string(out), `data-vm="web1" data-state="running"`) {
			return fmt.Errorf("%s: %v\n%s", console, err, out)
		}
		return nil
	})

	devImagesAndDisks(t, herdctl, try, filepath.Join(dir, "data"))

	addImages(t, func(args ...string) string { return herdctl(args...) }, "v2")
	herdctl("rollout", "start", "--image", "v2")
	rig.Eventually(t, 120*time.Second, "rollout done", func() error {
		out := herdctl("rollout", "status")
		if strings.Contains(out, ": "+keys.RolloutPaused+",") {
			t.Fatalf("rollout paused:\n%s", out)
		}
		if !strings.Contains(out, ": "+keys.RolloutDone+",") {
			return fmt.Errorf("%s", out)
		}
		return nil
	})
	t.Logf("%s", herdctl("rollout", "status"))
	if nl := herdctl("node", "list"); strings.Count(nl, " v2 ") != 3 || strings.Count(nl, " ready ") != 3 {
		t.Fatalf("not every node back on v2:\n%s", nl)
	}
	if b, err := os.ReadFile(marker); err == nil {
		t.Fatalf("herd dev ran a reboot command on the host: %s", b)
	}
	if ev := herdctl("events"); strings.Count(ev, "simulated reboot") != 3 || strings.Count(ev, "rollout-upgraded") != 3 {
		t.Fatalf("want 3 simulated reboots and 3 upgraded nodes:\n%s", ev)
	}
	rig.Eventually(t, 30*time.Second, "web1 running", func() error {
		if out := herdctl("vm", "get", "web1"); !strings.Contains(out, "running") {
			return fmt.Errorf("%s", out)
		}
		return nil
	})
	for i := 1; i <= 3; i++ {
		node := fmt.Sprintf(`node="52:54:00:00:00:%02x"`, i)
		if n, err := rig.Metric("http://"+status+"/metrics", "herd_agent_reconcile_seconds_count", node); err != nil {
			t.Fatalf("metrics of %s after its reboot: %v (%v)", node, err, n)
		}
	}

	if err := p.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	if err := p.Wait(30 * time.Second); err != nil {
		t.Fatalf("herd dev did not stop cleanly on Ctrl-C: %v\n%s", err, rig.Tail(p.Log, 20))
	}
}

// devImagesAndDisks: a VM image imported from a file on this machine (herdctl serves it to the
// leader), a VM whose boot disk clones it and which has a second disk; the image cannot go while
// the disk clones it, and can once the VM is purged.
func devImagesAndDisks(t *testing.T, herdctl func(...string) string, try func(...string) (string, error), data string) {
	t.Helper()
	file := filepath.Join(t.TempDir(), "tiny.raw")
	f, err := os.Create(file)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = f.WriteAt([]byte("herd-image-marker"), 0)
	_ = f.Truncate(64 << 20)
	f.Close()
	start := time.Now()
	out := herdctl("volume", "import", "tiny", "--from", file)
	if !strings.Contains(out, "image/tiny ready: raw, 64") {
		t.Fatalf("volume import:\n%s", out)
	}
	t.Logf("import of a 64 MiB raw file served by herdctl: %s", time.Since(start).Round(time.Millisecond))
	if out := herdctl("volume", "import", "tiny", "--from", file); !strings.Contains(out, "image/tiny exists") {
		t.Fatalf("importing again:\n%s", out)
	}
	start = time.Now()
	herdctl("vm", "create", "web2", "--image", "tiny", "--disk", "1GiB", "--disk", "data=2GiB", "--wait")
	t.Logf("vm create with a clone and a second disk, to running: %s", time.Since(start).Round(time.Millisecond))
	if out := herdctl("vm", "get", "web2"); !strings.Contains(out, "root 1GiB in pool default from image tiny") || !strings.Contains(out, "data 2GiB in pool default") {
		t.Fatalf("vm get:\n%s", out)
	}
	roots, _ := filepath.Glob(filepath.Join(data, "volumes", "default", "web2.*[0-9].raw"))
	datas, _ := filepath.Glob(filepath.Join(data, "volumes", "default", "web2.*.data.raw"))
	if len(roots) != 1 || len(datas) != 1 {
		t.Fatalf("web2's disks: %v %v", roots, datas)
	}
	head := make([]byte, 17)
	if f, err := os.Open(roots[0]); err == nil {
		_, _ = f.ReadAt(head, 0)
		f.Close()
	}
	if string(head) != "herd-image-marker" {
		t.Fatalf("web2's boot disk starts with %q, not the image's bytes", head)
	}
	if out := herdctl("volume", "images"); !strings.Contains(out, "tiny") || !strings.Contains(out, "ready") {
		t.Fatalf("volume images:\n%s", out)
	}
	if out, err := try("volume", "image-rm", "tiny"); err == nil || !strings.Contains(out, "cloned by 1 disks") {
		t.Fatalf("an image a disk clones was deleted: %v\n%s", err, out)
	}
	if out := herdctl("volume", "list"); !strings.Contains(out, " data ") {
		t.Fatalf("volume list shows no disk named data:\n%s", out)
	}
	herdctl("vm", "delete", "web2", "--purge", "--wait")
	rig.Eventually(t, 30*time.Second, "web2's disks purged", func() error {
		if out := herdctl("volume", "list"); strings.Contains(out, "web2") {
			return fmt.Errorf("%s", out)
		}
		return nil
	})
	herdctl("volume", "image-rm", "tiny")
	rig.Eventually(t, 30*time.Second, "image tiny gone", func() error {
		if out := herdctl("volume", "images"); strings.Contains(out, "tiny") {
			return fmt.Errorf("%s", out)
		}
		return nil
	})
}
