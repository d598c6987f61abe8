package hostnet

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"regexp"
	"sort"
	"strings"
	"time"
)

// Anti-spoofing. A NIC on a herd network may send only from its own MAC and, for IPv4 and ARP, its
// own address: everything else it sends is dropped at the bridge (nftables, bridge family, table
// herd_guard, hooks forward and input so neither other guests nor the host see it). The rules
// match the tap by name, so they are in place before QEMU makes the tap: a guest never has a
// moment unguarded, also on a migration target. The agent rewrites the whole table in one nft
// transaction whenever the set of guarded ports changes; a port not listed is not filtered (a NIC
// on a bare bridge, as before networks existed).

// Table is the nftables table the guard owns (bridge family).
const Table = "herd_guard"

// Port is one guarded tap: what it may send from.
type Port struct {
	Tap string
	MAC string
	IP  string
}

var (
	tapRE = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,15}$`)
	macRE = regexp.MustCompile(`^[0-9a-f]{2}(:[0-9a-f]{2}){5}$`)
)

// GuardRules is the nft script that makes the table hold exactly ports' rules. Ports with a tap
// name, MAC or address that is not well formed are refused: they come from etcd.
func GuardRules(ports []Port) (string, error) {
	sorted := append([]Port(nil), ports...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Tap < sorted[j].Tap })
	var rules strings.Builder
	for _, p := range sorted {
		ip, err := netip.ParseAddr(p.IP)
		if !tapRE.MatchString(p.Tap) || !macRE.MatchString(strings.ToLower(p.MAC)) || err != nil || !ip.Is4() {
			return "", fmt.Errorf("guard port %+v: not a tap name, MAC and IPv4 address", p)
		}
		mac := strings.ToLower(p.MAC)
		fmt.Fprintf(&rules, "    iifname %q ether saddr != %s drop\n", p.Tap, mac)
		fmt.Fprintf(&rules, "    iifname %q ether type ip ip saddr != %s drop\n", p.Tap, ip)
		fmt.Fprintf(&rules, "    iifname %q ether type arp arp saddr ip != %s drop\n", p.Tap, ip)
		fmt.Fprintf(&rules, "    iifname %q ether type arp arp saddr ether != %s drop\n", p.Tap, mac)
	}
	var b strings.Builder
	// Adding the table first makes the delete succeed when it does not exist yet; the whole file
	// is one transaction, so the rules are never absent in between.
	fmt.Fprintf(&b, "add table bridge %s\ndelete table bridge %s\ntable bridge %s {\n", Table, Table, Table)
	for _, hook := range []string{"forward", "input"} {
		fmt.Fprintf(&b, "  chain %s {\n    type filter hook %s priority -200; policy accept;\n%s  }\n", hook+"_guard", hook, rules.String())
	}
	b.WriteString("}\n")
	return b.String(), nil
}

// ApplyGuard makes the table hold exactly ports' rules.
func ApplyGuard(ctx context.Context, ports []Port) error {
	script, err := GuardRules(ports)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("nft: %w: %s", err, strings.TrimSpace(out.String()))
	}
	return nil
}

// TapName is the tap of a VM's NIC: fixed by the VM's uid and the NIC's index, so that the guard
// names it before it exists, on every node (at most 15 characters).
func TapName(uid int64, nic int) string {
	h := fmt.Sprintf("%x", uid)
	if len(h) > 10 {
		h = h[len(h)-10:] // a uid past 2^40 revisions: its low bits
	}
	return fmt.Sprintf("hv%sn%d", h, nic)
}
