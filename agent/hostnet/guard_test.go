package hostnet

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// sh runs a command, failing the test with its output.
func sh(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%v: %v: %s", args, err, out)
	}
}

// pings says whether guest namespace ns reaches ip, sending from src ("" for its own address).
func pings(ns, src, ip string) bool {
	args := []string{"netns", "exec", ns, "busybox", "ping", "-c", "1", "-W", "1"}
	if src != "" {
		args = append(args, "-I", src)
	}
	args = append(args, ip)
	return exec.Command("ip", args...).Run() == nil
}

// reaches is pings for what must get through: a few tries, each with fresh neighbour caches. A
// spoof just dropped leaves the neighbour's ARP entry for the spoofed address probing, and its
// last probe may fail after the guard is gone, dropping the queued answer with it (seen in CI).
func reaches(t *testing.T, ns, peer, src, ip string) bool {
	t.Helper()
	for try := 0; try < 3; try++ {
		sh(t, "ip", "-n", ns, "neigh", "flush", "all")
		sh(t, "ip", "-n", peer, "neigh", "flush", "all")
		if pings(ns, src, ip) {
			return true
		}
	}
	return false
}

// TestGuardDropsSpoofedTraffic: two "guests" (namespaces on veth pairs standing for taps) on a
// bridge in a hypervisor namespace, both guarded. The honest one reaches the other; sending from
// an address or a MAC that is not its own reaches nobody; with the guard removed the same spoof
// gets through (so it is the guard that drops it). The kernel's bridge and nftables do the work.
func TestGuardDropsSpoofedTraffic(t *testing.T) {
	for _, tool := range []string{"nft", "busybox"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") != "" {
				t.Fatalf("%s is missing: scripts/deps.sh installs it", tool)
			}
			t.Skipf("%s is missing", tool)
		}
	}
	inNetns(t, func(hv string) {
		guests := []struct{ ns, tap, mac, ip string }{
			{hv + "-g1", "hv1n0", "52:54:00:00:0a:01", "10.9.0.1"},
			{hv + "-g2", "hv2n0", "52:54:00:00:0a:02", "10.9.0.2"},
		}
		sh(t, "ip", "-n", hv, "link", "add", "br0", "type", "bridge")
		sh(t, "ip", "-n", hv, "link", "set", "br0", "up")
		var ports []Port
		for _, g := range guests {
			sh(t, "ip", "netns", "add", g.ns)
			ns := g.ns
			t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
			sh(t, "ip", "-n", hv, "link", "add", g.tap, "type", "veth", "peer", "name", "eth0", "netns", g.ns)
			sh(t, "ip", "-n", hv, "link", "set", g.tap, "master", "br0", "up")
			sh(t, "ip", "-n", g.ns, "link", "set", "eth0", "address", g.mac, "up")
			sh(t, "ip", "-n", g.ns, "addr", "add", g.ip+"/24", "dev", "eth0")
			ports = append(ports, Port{Tap: g.tap, MAC: g.mac, IP: g.ip})
		}
		if err := ApplyGuard(context.Background(), ports); err != nil {
			t.Fatal(err)
		}
		if err := ApplyGuard(context.Background(), ports); err != nil { // again: replaces, no error
			t.Fatal(err)
		}
		g1, g2 := guests[0].ns, guests[1].ns
		if !reaches(t, g1, g2, "", "10.9.0.2") {
			t.Fatal("the honest guest does not reach its neighbour")
		}
		// Another address on the same NIC.
		sh(t, "ip", "-n", g1, "addr", "add", "10.9.0.3/24", "dev", "eth0")
		if pings(g1, "10.9.0.3", "10.9.0.2") {
			t.Fatal("a guest sending from an address not its own reached its neighbour")
		}
		// Another MAC, its own address.
		sh(t, "ip", "-n", g1, "link", "set", "eth0", "address", "52:54:00:00:0a:99")
		if pings(g1, "10.9.0.1", "10.9.0.2") {
			t.Fatal("a guest sending from a MAC not its own reached its neighbour")
		}
		// Without the guard, the same spoofs go through: the guard is what stopped them.
		if err := ApplyGuard(context.Background(), nil); err != nil {
			t.Fatal(err)
		}
		if !reaches(t, g1, g2, "10.9.0.3", "10.9.0.2") {
			t.Fatal("without the guard the spoofing guest still does not get through: the test proves nothing")
		}
	})
}

// TestGuardRulesRefuseWhatIsNotAPort: what etcd says goes into an nft script only well formed.
func TestGuardRulesRefuseWhatIsNotAPort(t *testing.T) {
	for _, p := range []Port{
		{Tap: `x"; flush ruleset; "`, MAC: "52:54:00:00:00:01", IP: "10.0.0.1"},
		{Tap: "hv1n0", MAC: "52:54:00:00:00:01 drop", IP: "10.0.0.1"},
		{Tap: "hv1n0", MAC: "52:54:00:00:00:01", IP: "10.0.0.1 }"},
		{Tap: "hv1n0", MAC: "52:54:00:00:00:01", IP: "fd00::1"},
	} {
		if s, err := GuardRules([]Port{p}); err == nil {
			t.Fatalf("%+v made a script:\n%s", p, s)
		}
	}
	s, err := GuardRules([]Port{{Tap: "hv1n0", MAC: "52:54:00:00:00:01", IP: "10.0.0.1"}})
	if err != nil || !strings.Contains(s, `iifname "hv1n0" ether saddr != 52:54:00:00:00:01 drop`) {
		t.Fatalf("%v:\n%s", err, s)
	}
	if n := TapName(1<<62, 7); len(n) > 15 {
		t.Fatalf("tap name %s is longer than 15", n)
	}
}
