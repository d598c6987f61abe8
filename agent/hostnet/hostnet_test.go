package hostnet

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// inNetns runs fn on a thread inside a fresh named network namespace (ip netns add), deleted at
// the end: nothing of the host's network is touched. It returns the namespace's name, for ip -n.
func inNetns(t *testing.T, fn func(name string)) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("CI must run as root: this test makes a network namespace")
		}
		t.Skip("needs root for a network namespace")
	}
	name := fmt.Sprintf("herd-hostnet-%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	ns, err := netns.GetFromName(name)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	if err := netns.Set(ns); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := netns.Set(orig); err != nil {
			panic(err) // the thread must not go back to the pool in the test's namespace
		}
	}()
	fn(name)
}

// link is ip(8)'s JSON view of one link.
type link struct {
	Name     string   `json:"ifname"`
	Link     string   `json:"link"`
	Master   string   `json:"master"`
	MTU      int      `json:"mtu"`
	Flags    []string `json:"flags"`
	LinkInfo struct {
		Kind string `json:"info_kind"`
		Data struct {
			ID int `json:"id"`
		} `json:"info_data"`
	} `json:"linkinfo"`
}

func links(t *testing.T, ns string) map[string]link {
	t.Helper()
	out, err := exec.Command("ip", "-n", ns, "-d", "-j", "link", "show").Output()
	if err != nil {
		t.Fatalf("ip link show: %v", err)
	}
	var ls []link
	if err := json.Unmarshal(out, &ls); err != nil {
		t.Fatalf("ip -j: %v: %s", err, out)
	}
	m := map[string]link{}
	for _, l := range ls {
		m[l.Name] = l
	}
	return m
}

func up(l link) bool {
	for _, f := range l.Flags {
		if f == "UP" {
			return true
		}
	}
	return false
}

// TestEnsureBridge: a bridge is made and up as iproute2 then reports it; a second call changes
// nothing; a link of that name that is not a bridge is refused, not changed.
func TestEnsureBridge(t *testing.T) {
	inNetns(t, func(ns string) {
		for i := 0; i < 2; i++ {
			if _, err := EnsureBridge("herd-v120", 1450); err != nil {
				t.Fatalf("call %d: %v", i+1, err)
			}
		}
		br := links(t, ns)["herd-v120"]
		if br.LinkInfo.Kind != "bridge" || !up(br) || br.MTU != 1450 {
			t.Fatalf("bridge %+v", br)
		}
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "herd-v121"}, PeerName: "peer121"}); err != nil {
			t.Fatal(err)
		}
		if _, err := EnsureBridge("herd-v121", 0); err == nil || links(t, ns)["herd-v121"].LinkInfo.Kind != "veth" {
			t.Fatalf("a veth in the bridge's place: %v", err)
		}
	})
}

// TestEnsureVLAN: the tagged link is made as iproute2 then reports it (VLAN 120 on the uplink,
// enslaved to the bridge, up, the MTU asked) and a second call changes nothing. It needs a kernel
// with 802.1Q (8021q); this test machine's has none, and the test says so.
func TestEnsureVLAN(t *testing.T) {
	inNetns(t, func(ns string) {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "up0", MTU: 9000}, PeerName: "up1"}); err != nil {
			t.Fatal(err)
		}
		probe := &netlink.Vlan{LinkAttrs: netlink.LinkAttrs{Name: "probe5", ParentIndex: mustIndex(t, "up0")}, VlanId: 5}
		if err := netlink.LinkAdd(probe); err != nil {
			t.Skipf("this kernel makes no VLAN links (%v): 802.1Q (8021q) is not built in; herd's VLAN networks need it on hypervisors", err)
		}
		_ = netlink.LinkDel(probe)
		for i := 0; i < 2; i++ {
			if err := EnsureVLAN("up0", 120, "herd-v120", 1450); err != nil {
				t.Fatalf("call %d: %v", i+1, err)
			}
		}
		ls := links(t, ns)
		tagged := ls["herd-t120"]
		if tagged.LinkInfo.Kind != "vlan" || tagged.LinkInfo.Data.ID != 120 || tagged.Link != "up0" || tagged.Master != "herd-v120" || !up(tagged) || tagged.MTU != 1450 {
			t.Fatalf("tagged link: %+v", tagged)
		}
		if err := EnsureVLAN("nope0", 122, "herd-v122", 0); err == nil {
			t.Fatal("a missing uplink was accepted")
		}
	})
}

func mustIndex(t *testing.T, name string) int {
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	return l.Attrs().Index
}

// TestProbeVLANAgreesWithEnsureVLAN: the start-up probe says yes exactly where EnsureVLAN works (on
// this machine's kernel, without 8021q, both refuse), leaves no link behind, and refuses a missing
// uplink.
func TestProbeVLANAgreesWithEnsureVLAN(t *testing.T) {
	inNetns(t, func(ns string) {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "up0"}, PeerName: "up1"}); err != nil {
			t.Fatal(err)
		}
		probeErr := ProbeVLAN("up0")
		if _, ok := links(t, ns)[ProbeName]; ok {
			t.Fatalf("the probe left %s behind", ProbeName)
		}
		ensureErr := EnsureVLAN("up0", 130, "herd-v130", 0)
		if (probeErr == nil) != (ensureErr == nil) {
			t.Fatalf("probe says %v, EnsureVLAN says %v", probeErr, ensureErr)
		}
		t.Logf("VLAN links on this kernel: probe %v", probeErr)
		if probeErr == nil {
			// With a VLAN link on the uplink, the probe makes none.
			if err := ProbeVLAN("up0"); err != nil {
				t.Fatal(err)
			}
		}
		if err := ProbeVLAN("nope0"); err == nil {
			t.Fatal("a missing uplink passed the probe")
		}
	})
}
