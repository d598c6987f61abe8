package rig

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// RequireHost fails the test (never skips) when the machine lacks what real-network tests need:
// root, /dev/net/tun, iproute2, and the named programs.
func RequireHost(t testing.TB, programs ...string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root (network namespaces, taps, DHCP on port 67); run `just test` as root")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Fatalf("this test needs /dev/net/tun: %v", err)
	}
	for _, p := range append([]string{"ip"}, programs...) {
		if _, err := exec.LookPath(p); err != nil {
			t.Fatalf("this test needs %s: install it with `just deps` (%v)", p, err)
		}
	}
}

// Netns is a network namespace made by a test: a bridge with an address, taps for virtual machines.
// It is deleted at cleanup, after every process started in it has been stopped.
type Netns struct {
	Name   string
	Bridge string
	IP     string // the bridge's address, e.g. 10.99.0.1
	t      testing.TB
	taps   int
}

func ipCmd(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// NewNetns creates namespace herd-<random> with bridge br0 at cidr (e.g. 10.99.0.1/24).
func NewNetns(t testing.TB, cidr string) *Netns {
	t.Helper()
	var b [3]byte
	_, _ = rand.Read(b[:])
	n := &Netns{Name: "herd-" + hex.EncodeToString(b[:]), Bridge: "br0", IP: strings.Split(cidr, "/")[0], t: t}
	ipCmd(t, "netns", "add", n.Name)
	// Registered first, so it runs last: processes in the namespace are stopped before it goes.
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", n.Name).CombinedOutput(); err != nil {
			t.Logf("ip netns del %s: %v: %s", n.Name, err, out)
		}
	})
	ipCmd(t, "-n", n.Name, "link", "set", "lo", "up")
	ipCmd(t, "-n", n.Name, "link", "add", n.Bridge, "type", "bridge")
	ipCmd(t, "-n", n.Name, "addr", "add", cidr, "dev", n.Bridge)
	ipCmd(t, "-n", n.Name, "link", "set", n.Bridge, "up")
	return n
}

// Tap adds a tap device on the bridge for one virtual machine and returns its name.
func (n *Netns) Tap() string {
	n.t.Helper()
	name := fmt.Sprintf("tap%d", n.taps)
	n.taps++
	ipCmd(n.t, "-n", n.Name, "tuntap", "add", name, "mode", "tap")
	ipCmd(n.t, "-n", n.Name, "link", "set", name, "master", n.Bridge)
	ipCmd(n.t, "-n", n.Name, "link", "set", name, "up")
	return name
}

// Start runs bin inside the namespace (see rig.Start).
func (n *Netns) Start(dir, name, bin string, args ...string) *Proc {
	n.t.Helper()
	return Start(n.t, dir, name, "ip", append([]string{"netns", "exec", n.Name, bin}, args...)...)
}

// Command prepares bin to run inside the namespace.
func (n *Netns) Command(bin string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", n.Name, bin}, args...)...)
}
