package keys

import (
	"fmt"
	"net/netip"
	"strings"
)

// Limits of a network record.
const (
	MaxVLAN       = 4094
	MinMTU        = 576
	MaxMTU        = 9216
	maxDNSServers = 3
	// DefaultBridge carries untagged networks that name no bridge.
	DefaultBridge = "br0"
)

// HostBridge is the hypervisor bridge the network's NICs join: a VLAN network's is named after its
// tag (each node makes it on its uplink), an untagged network's is its Bridge.
func (n *NetworkSpec) HostBridge() string {
	switch {
	case n.VLAN > 0:
		return fmt.Sprintf("herd-v%d", n.VLAN)
	case n.Bridge != "":
		return n.Bridge
	}
	return DefaultBridge
}

// Prefix is the network's CIDR, parsed (the zero Prefix when invalid).
func (n *NetworkSpec) Prefix() netip.Prefix {
	p, _ := netip.ParsePrefix(n.CIDR)
	return p
}

// Host says whether ip is a host address of the network: inside its CIDR, neither its network nor
// its broadcast address.
func (n *NetworkSpec) Host(ip netip.Addr) bool {
	p := n.Prefix()
	if !p.IsValid() || !p.Contains(ip) {
		return false
	}
	return ip != p.Addr() && ip != lastOf(p)
}

// Range is the addresses the leader allocates from, both included.
func (n *NetworkSpec) Range() (first, last netip.Addr) {
	p := n.Prefix()
	first, last = p.Addr().Next(), lastOf(p).Prev()
	// A gateway at either end of the default range is left out of it, as it is out of allocation.
	if gw, err := netip.ParseAddr(n.Gateway); err == nil {
		if gw == first && first.Compare(last) < 0 {
			first = first.Next()
		} else if gw == last && first.Compare(last) < 0 {
			last = last.Prev()
		}
	}
	if a, err := netip.ParseAddr(n.RangeFirst); err == nil {
		first = a
	}
	if a, err := netip.ParseAddr(n.RangeLast); err == nil {
		last = a
	}
	return first, last
}

// Allocatable says whether the leader may hand ip out by itself: in the range, not the gateway.
func (n *NetworkSpec) Allocatable(ip netip.Addr) bool {
	first, last := n.Range()
	return n.Host(ip) && ip.Compare(first) >= 0 && ip.Compare(last) <= 0 && ip.String() != n.Gateway
}

// WithPrefix writes ip with the network's prefix length (10.20.0.17/22), as a guest configures it.
func (n *NetworkSpec) WithPrefix(ip string) string {
	return fmt.Sprintf("%s/%d", ip, n.Prefix().Bits())
}

// lastOf is a prefix's last (broadcast) address.
func lastOf(p netip.Prefix) netip.Addr {
	a := p.Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v |= host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// Validate checks a network record: what is wrong, every field at once, in words that say what to
// write instead.
func (n *NetworkSpec) Validate() error {
	var fe FieldErrors
	if n.VLAN < 0 || n.VLAN > MaxVLAN {
		fe.add("vlan", "must be between 1 and %d (0 or absent: untagged), got %d", MaxVLAN, n.VLAN)
	}
	if n.Bridge != "" {
		if n.VLAN > 0 {
			fe.add("bridge", "a VLAN network's bridge is made by each node (%s): name no bridge", n.HostBridge())
		} else if !labelRE.MatchString(n.Bridge) || len(n.Bridge) > 15 {
			fe.add("bridge", "must name a bridge (letters, digits, '.', '_', '-', at most 15 characters)")
		}
	}
	p, err := netip.ParsePrefix(n.CIDR)
	switch {
	case n.CIDR == "":
		fe.add("cidr", "is required (for example 10.20.0.0/22)")
	case err != nil:
		fe.add("cidr", "%q is not a CIDR (for example 10.20.0.0/22)", n.CIDR)
	case !p.Addr().Is4():
		fe.add("cidr", "only IPv4 networks are supported yet, got %s", n.CIDR)
	case p.Bits() < 8 || p.Bits() > 30:
		fe.add("cidr", "prefix length must be between /8 and /30, got /%d", p.Bits())
	case p.Masked() != p:
		fe.add("cidr", "%s has host bits set: did you mean %s?", n.CIDR, p.Masked())
	}
	valid := len(fe) == 0 || fe[len(fe)-1].Field != "cidr"
	host := func(field, s string) (netip.Addr, bool) {
		a, err := netip.ParseAddr(s)
		if err != nil || !a.Is4() {
			fe.add(field, "%q is not an IPv4 address", s)
			return a, false
		}
		if valid && !n.Host(a) {
			fe.add(field, "%s is not a host address of %s", s, n.CIDR)
			return a, false
		}
		return a, true
	}
	if n.Gateway != "" {
		host("gateway", n.Gateway)
	}
	if len(n.DNS) > maxDNSServers {
		fe.add("dns", "at most %d servers, got %d", maxDNSServers, len(n.DNS))
	}
	for i, d := range n.DNS {
		if a, err := netip.ParseAddr(d); err != nil || !a.Is4() {
			fe.add(fmt.Sprintf("dns[%d]", i), "%q is not an IPv4 address", d)
		}
	}
	okFirst, okLast := true, true
	if n.RangeFirst != "" {
		_, okFirst = host("range_first", n.RangeFirst)
	}
	if n.RangeLast != "" {
		_, okLast = host("range_last", n.RangeLast)
	}
	if valid && okFirst && okLast {
		first, last := n.Range()
		if first.Compare(last) > 0 {
			fe.add("range_first", "the range %s-%s is empty", first, last)
		}
	}
	if n.MTU != 0 && (n.MTU < MinMTU || n.MTU > MaxMTU) {
		fe.add("mtu", "must be between %d and %d, got %d", MinMTU, MaxMTU, n.MTU)
	}
	return fe.err()
}

// validateFixedAddresses refuses one fixed address given to two NICs of a spec.
func validateFixedAddresses(fe *FieldErrors, nics []Network) {
	seen := map[string]int{}
	for i, n := range nics {
		if n.Network == "" || n.Address == "" {
			continue
		}
		k := n.Network + "/" + n.Address
		if j, dup := seen[k]; dup {
			fe.add(fmt.Sprintf("networks[%d].address", i), "%s on %s is networks[%d]'s already", n.Address, n.Network, j)
			continue
		}
		seen[k] = i
	}
}

// validateNIC checks one NIC of a spec.
func validateNIC(fe *FieldErrors, i int, n Network) {
	field := fmt.Sprintf("networks[%d]", i)
	switch {
	case n.Bridge == "" && n.Network == "":
		fe.add(field, "needs a network (a herd network, with an address) or a bridge (a hypervisor bridge as is)")
	case n.Bridge != "" && n.Network != "":
		fe.add(field, "names both network %q and bridge %q: a NIC is on one", n.Network, n.Bridge)
	case n.Bridge != "":
		if !labelRE.MatchString(n.Bridge) || len(n.Bridge) > 15 {
			fe.add(field+".bridge", "must name a bridge (at most 15 characters)")
		}
		if n.Address != "" {
			fe.add(field+".address", "only a NIC on a herd network has an address (herdctl net list)")
		}
	default:
		if err := ValidateName(n.Network); err != nil {
			fe.add(field+".network", "%v", err)
		}
		if n.Address != "" {
			if a, err := netip.ParseAddr(n.Address); err != nil || !a.Is4() || strings.Contains(n.Address, "/") {
				fe.add(field+".address", "%q is not an IPv4 address (no prefix length: the network has it)", n.Address)
			}
		}
	}
	switch n.Model {
	case "", "virtio", "e1000", "e1000e", "rtl8139":
	default:
		fe.add(field+".model", "unknown NIC model %q (virtio, e1000, e1000e, rtl8139)", n.Model)
	}
}

// IP is the NIC's address without its prefix length.
func (n *NIC) IP() string {
	ip, _, _ := strings.Cut(n.Address, "/")
	return ip
}

// Limits on what a spec gives a guest at its first boot: the seed is built on every node that runs
// the VM, and the spec is copied into every assignment.
const (
	MaxSSHKeys     = 32
	MaxSSHKeyBytes = 16 << 10
	MaxUserData    = 64 << 10
)

// validateGuestConfig checks the SSH keys and user data of a spec.
func validateGuestConfig(fe *FieldErrors, s *VMSpec) {
	if len(s.SSHKeys) > MaxSSHKeys {
		fe.add("ssh_keys", "at most %d keys, got %d", MaxSSHKeys, len(s.SSHKeys))
	}
	for i, k := range s.SSHKeys {
		typ, rest, _ := strings.Cut(k, " ")
		switch {
		case len(k) > MaxSSHKeyBytes:
			fe.add(fmt.Sprintf("ssh_keys[%d]", i), "longer than %d bytes", MaxSSHKeyBytes)
		case strings.ContainsAny(k, "\n\r\x00"):
			fe.add(fmt.Sprintf("ssh_keys[%d]", i), "must be one line (one public key, as in authorized_keys)")
		case !(strings.HasPrefix(typ, "ssh-") || strings.HasPrefix(typ, "ecdsa-") || strings.HasPrefix(typ, "sk-")) || strings.TrimSpace(rest) == "":
			fe.add(fmt.Sprintf("ssh_keys[%d]", i), "is not a public key (want \"ssh-ed25519 AAAA... comment\", as in a .pub file)")
		}
	}
	switch u := s.UserData; {
	case u == "":
	case len(u) > MaxUserData:
		fe.add("user_data", "is %d bytes, at most %d", len(u), MaxUserData)
	case strings.ContainsRune(u, 0):
		fe.add("user_data", "must be text")
	case !strings.HasPrefix(u, "#cloud-config") && !strings.HasPrefix(u, "#!") && !strings.HasPrefix(u, "#include") && !strings.HasPrefix(u, "Content-Type: multipart/"):
		fe.add("user_data", "must start with #cloud-config, #! (a script), #include or be a MIME multipart (cloud-init's user-data formats)")
	}
}
