// Package hostnet makes the host side of herd's VLAN networks on a hypervisor: for VLAN id V on
// the uplink, a VLAN link herd-t<V> (tagged V on the uplink) enslaved to a bridge herd-v<V>, both
// up, which the VMs' NICs on that network join. Idempotent, through netlink (no ip(8) to parse);
// a link of either name that is something else is reported, never changed: it is not ours.
package hostnet

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
)

// TaggedName is the VLAN link of id vlan (at most 15 characters, whatever the uplink is called).
func TaggedName(vlan int) string { return fmt.Sprintf("herd-t%d", vlan) }

// EnsureVLAN makes bridge (herd-v<vlan>) carry VLAN vlan of uplink, with mtu (0: leave it).
// ProbeName is the VLAN link ProbeVLAN makes for a moment.
const ProbeName = "herd-probe"

// ProbeVLAN says whether this host can tag VLANs on uplink: an uplink that has a VLAN link
// already can; otherwise it makes one (VLAN 4094, ProbeName) and removes it. A kernel without
// 8021q, or an uplink that refuses, fails here at start instead of at every VM's definition.
func ProbeVLAN(uplink string) error {
	up, err := netlink.LinkByName(uplink)
	if err != nil {
		return fmt.Errorf("uplink %s: %w", uplink, err)
	}
	links, err := netlink.LinkList()
	if err != nil {
		return err
	}
	for _, l := range links {
		if v, ok := l.(*netlink.Vlan); ok && v.Attrs().ParentIndex == up.Attrs().Index && v.Attrs().Name != ProbeName {
			return nil
		}
	}
	if old, err := netlink.LinkByName(ProbeName); err == nil {
		_ = netlink.LinkDel(old) // left by a probe that was killed
	}
	probe := &netlink.Vlan{LinkAttrs: netlink.LinkAttrs{Name: ProbeName, ParentIndex: up.Attrs().Index}, VlanId: 4094}
	if err := netlink.LinkAdd(probe); err != nil {
		return fmt.Errorf("uplink %s cannot carry VLAN links: %w (is the kernel's 8021q module there?)", uplink, err)
	}
	return netlink.LinkDel(probe)
}

func EnsureVLAN(uplink string, vlan int, bridge string, mtu int) error {
	up, err := netlink.LinkByName(uplink)
	if err != nil {
		return fmt.Errorf("uplink %s: %w", uplink, err)
	}
	br, err := EnsureBridge(bridge, mtu)
	if err != nil {
		return err
	}
	tagged := TaggedName(vlan)
	tl, err := ensureLink(tagged, func() netlink.Link {
		return &netlink.Vlan{LinkAttrs: netlink.LinkAttrs{Name: tagged, ParentIndex: up.Attrs().Index, MTU: mtu}, VlanId: vlan}
	}, func(l netlink.Link) error {
		v, ok := l.(*netlink.Vlan)
		if !ok || v.VlanId != vlan || v.Attrs().ParentIndex != up.Attrs().Index {
			return fmt.Errorf("%s exists and is not VLAN %d on %s", tagged, vlan, uplink)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if tl.Attrs().MasterIndex != br.Attrs().Index {
		if err := netlink.LinkSetMaster(tl, br); err != nil {
			return fmt.Errorf("enslave %s to %s: %w", tagged, bridge, err)
		}
	}
	if mtu > 0 {
		for _, l := range []netlink.Link{br, tl} {
			if l.Attrs().MTU != mtu {
				if err := netlink.LinkSetMTU(l, mtu); err != nil {
					return fmt.Errorf("mtu of %s: %w", l.Attrs().Name, err)
				}
			}
		}
	}
	for _, l := range []netlink.Link{up, tl, br} {
		if l.Attrs().Flags&1 == 0 { // net.FlagUp
			if err := netlink.LinkSetUp(l); err != nil {
				return fmt.Errorf("set %s up: %w", l.Attrs().Name, err)
			}
		}
	}
	return nil
}

// EnsureBridge makes a bridge of that name, up, or refuses a link of that name that is not one.
func EnsureBridge(bridge string, mtu int) (netlink.Link, error) {
	br, err := ensureLink(bridge, func() netlink.Link {
		return &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: bridge, MTU: mtu}}
	}, func(l netlink.Link) error {
		if l.Type() != "bridge" {
			return fmt.Errorf("%s exists and is a %s, not a bridge: it is not herd's to change", bridge, l.Type())
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if br.Attrs().Flags&1 == 0 {
		if err := netlink.LinkSetUp(br); err != nil {
			return nil, fmt.Errorf("set %s up: %w", bridge, err)
		}
	}
	return br, nil
}

// ensureLink returns the link of that name, made by mk when absent; check refuses one that is
// not what it should be.
func ensureLink(name string, mk func() netlink.Link, check func(netlink.Link) error) (netlink.Link, error) {
	l, err := netlink.LinkByName(name)
	var nf netlink.LinkNotFoundError
	switch {
	case errors.As(err, &nf):
		if err := netlink.LinkAdd(mk()); err != nil {
			return nil, fmt.Errorf("add %s: %w", name, err)
		}
		if l, err = netlink.LinkByName(name); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		return l, nil
	case err != nil:
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if err := check(l); err != nil {
		return nil, err
	}
	return l, nil
}
