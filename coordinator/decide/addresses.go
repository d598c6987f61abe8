package decide

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/herdhq/herd/lib/keys"
)

// Addresses. A NIC on a herd network holds one address of it for the VM's life: the leader picks
// it (the spec's fixed address, or the lowest free one of the network's range) when it first
// places the VM, and writes the address's claim (/herd/addresses/<network>/<ip>) in the same
// transaction, conditioned on the claim's absence. One key per address is what keeps two VMs from
// ever holding one address, whoever else writes to etcd: a claim written meanwhile by anyone makes
// the placement fail, and the next round picks again. The placement keeps the NICs (address and
// the network's settings), so moves, migrations and failovers carry them as they carry the MACs.
// Claims are deleted with the VM, and a full round releases any claim no placement, spec or
// assignment of its VM accounts for (addressBookkeeping).

// addressBook is what a round knows of the addresses held: the snapshot's claims and what the
// round itself allocates.
type addressBook struct {
	held map[string]map[string]string // network -> ip -> "vm/uid" holding it
	next map[string]netip.Addr        // network -> where the next search for a free address starts
}

func holder(vm string, uid int64) string { return fmt.Sprintf("%s/%d", vm, uid) }

func (s *view) addresses() *addressBook {
	if s.book == nil {
		s.book = &addressBook{held: map[string]map[string]string{}, next: map[string]netip.Addr{}}
		for net, byIP := range s.Claims {
			m := map[string]string{}
			for ip, r := range byIP {
				m[ip] = "?" // unreadable: held by someone unknown, never handed out
				if r.OK() {
					m[ip] = holder(r.Value.VM, r.Value.UID)
				}
			}
			s.book.held[net] = m
		}
	}
	return s.book
}

func (b *addressBook) hold(net, ip, who string) {
	if b.held[net] == nil {
		b.held[net] = map[string]string{}
	}
	b.held[net][ip] = who
}

// pick is an address a round handed a NIC.
type pick struct{ net, ip string }

// nicClaims are the NICs a VM's placement is to hold, and the claims to write for those it did not
// hold yet.
type nicClaims struct {
	nics   []*keys.NIC
	conds  []Cond
	writes []Write
}

// nicsFor gives each NIC of spec on a herd network its address: the one the placement holds on
// that network already (have), the spec's fixed address, or the lowest free one of the network's
// range. problem says, in words an operator acts on, why one cannot be had; nothing is allocated
// then.
func (s *view) nicsFor(name string, uid int64, spec *keys.VMSpec, have []*keys.NIC) (c nicClaims, problem string) {
	if !slices.ContainsFunc(spec.Networks, func(n keys.Network) bool { return n.Network != "" }) {
		return nicClaims{}, ""
	}
	b, who := s.addresses(), holder(name, uid)
	var picked []pick
	undo := func() {
		for _, p := range picked {
			delete(b.held[p.net], p.ip)
		}
	}
	c.nics = make([]*keys.NIC, len(spec.Networks))
	for i, n := range spec.Networks {
		if n.Network == "" {
			continue
		}
		r := s.Networks[n.Network]
		if !r.OK() {
			undo()
			if r != nil {
				return nicClaims{}, fmt.Sprintf("network %s has an unreadable record: fix it (herdctl net get %s)", n.Network, n.Network)
			}
			return nicClaims{}, fmt.Sprintf("network %s does not exist: create it (herdctl net create %s --cidr ...) or name another (herdctl net list)", n.Network, n.Network)
		}
		net := r.Value
		ip := ""
		if i < len(have) && have[i] != nil && have[i].Network == n.Network && (n.Address == "" || n.Address == have[i].IP()) {
			ip = have[i].IP() // kept for the VM's life
			if h := b.held[n.Network][ip]; h != "" && h != who {
				// Only hands in etcd get here (a claim deleted, then made for another VM).
				undo()
				return nicClaims{}, fmt.Sprintf("address %s on network %s, which this VM holds, is claimed by %s: change one of them", ip, n.Network, describeHolder(h))
			}
		} else if n.Address != "" {
			a, _ := netip.ParseAddr(n.Address)
			switch h := b.held[n.Network][n.Address]; {
			case !net.Host(a):
				undo()
				return nicClaims{}, fmt.Sprintf("address %s of NIC %d is not a host address of network %s (%s)", n.Address, i, n.Network, net.CIDR)
			case n.Address == net.Gateway:
				undo()
				return nicClaims{}, fmt.Sprintf("address %s of NIC %d is network %s's gateway", n.Address, i, n.Network)
			case h != "" && h != who:
				undo()
				return nicClaims{}, fmt.Sprintf("address %s on network %s is held by %s", n.Address, n.Network, describeHolder(h))
			}
			ip = n.Address
		} else if ip = b.heldBy(n.Network, who, picked, have); ip != "" {
			// The VM's own claim, its placement lost (restored from a report, say): kept.
		} else if ip = b.free(n.Network, net); ip == "" {
			undo()
			first, last := net.Range()
			return nicClaims{}, fmt.Sprintf("network %s has no free address in its range %s-%s (%d held): widen the range or delete VMs on it", n.Network, first, last, len(b.held[n.Network]))
		}
		if b.held[n.Network][ip] != who {
			key := s.cfg.Space.Address(n.Network, ip)
			cond := CreateRev(key, 0)
			if cr := s.Claims[n.Network][ip]; cr.OK() && holder(cr.Value.VM, cr.Value.UID) == who {
				cond = ModRev(key, cr.ModRevision) // held already (a claim kept from an earlier try)
			}
			claim := keys.AddressClaim{VM: name, UID: uid, NIC: i, Since: s.Now.UTC()}
			c.conds = append(c.conds, cond)
			c.writes = append(c.writes, Put(key, keys.MustEncode(&claim)))
			b.hold(n.Network, ip, who)
			picked = append(picked, pick{n.Network, ip})
		}
		c.nics[i] = &keys.NIC{Network: n.Network, Bridge: net.HostBridge(), VLAN: net.VLAN, Address: net.WithPrefix(ip),
			Gateway: net.Gateway, DNS: net.DNS, MTU: net.MTU}
	}
	return c, ""
}

// heldBy is an address of the network claimed for who that none of its NICs uses ("": none).
func (b *addressBook) heldBy(net, who string, picked []pick, have []*keys.NIC) string {
	var mine []string
	for ip, h := range b.held[net] {
		used := slices.ContainsFunc(picked, func(p pick) bool { return p.net == net && p.ip == ip }) ||
			slices.ContainsFunc(have, func(n *keys.NIC) bool { return n != nil && n.Network == net && n.IP() == ip })
		if h == who && !used {
			mine = append(mine, ip)
		}
	}
	slices.Sort(mine)
	if len(mine) == 0 {
		return ""
	}
	return mine[0]
}

// free is the lowest address of the network's range no one holds, searching on from the last one
// this round handed out ("" when the range is full).
func (b *addressBook) free(name string, net *keys.NetworkSpec) string {
	first, last := net.Range()
	start := first
	if n, ok := b.next[name]; ok && n.Compare(first) > 0 && n.Compare(last) <= 0 {
		start = n
	}
	try := func(from, to netip.Addr) string {
		for a := from; a.IsValid() && a.Compare(to) <= 0; a = a.Next() {
			if ip := a.String(); b.held[name][ip] == "" && net.Allocatable(a) {
				b.next[name] = a.Next()
				return ip
			}
		}
		return ""
	}
	if ip := try(start, last); ip != "" || start == first {
		return ip
	}
	return try(first, start.Prev())
}

func describeHolder(h string) string {
	if h == "?" {
		return "an unreadable claim"
	}
	name, uid, _ := strings.Cut(h, "/") // a VM name has no '/'
	return fmt.Sprintf("vm %s (uid %s)", name, uid)
}

// releaseAddresses deletes the claims of a placement's NICs that are still its VM's.
func (s *view) releaseAddresses(name string, pl *keys.Placement) (conds []Cond, writes []Write) {
	for _, nic := range pl.NICs {
		if nic == nil {
			continue
		}
		if r := s.Claims[nic.Network][nic.IP()]; r.OK() && r.Value.VM == name && r.Value.UID == pl.UID {
			conds = append(conds, ModRev(r.Key, r.ModRevision))
			writes = append(writes, Del(r.Key))
		}
	}
	return conds, writes
}

// addressBookkeeping, in a full round, makes the claims agree with the placements: a claim whose
// VM incarnation is gone (no spec, placement or assignment of that uid) or whose placement no
// longer lists it (a NIC changed network) is released; a placed NIC whose claim is missing (deleted
// by hand, or lost to a restore) is claimed again when the address is free, and reported when
// another VM holds it.
func (s *view) addressBookkeeping() []Action {
	sp := s.cfg.Space
	var acts []Action
	for _, net := range sortedNames(s.Claims) {
		for _, ip := range sortedNames(s.Claims[net]) {
			r := s.Claims[net][ip]
			if !r.OK() {
				s.log(Error, "unreadable address claim; remove it by hand once no VM uses the address", "key", r.Key, "error", r.Err)
				continue
			}
			cl := r.Value
			v := s.VMs[cl.VM]
			var pl *rec[keys.Placement]
			var spec *rec[keys.VMSpec]
			if v != nil {
				pl, spec = v.Placement, v.Spec
			}
			if !pl.OK() && pl != nil {
				continue // unreadable: nothing is known of what it holds
			}
			switch {
			case pl.OK() && pl.Value.UID == cl.UID && slices.ContainsFunc(pl.Value.NICs, func(n *keys.NIC) bool { return n != nil && n.Network == net && n.IP() == ip }):
				continue
			case pl == nil && spec != nil && keys.SpecUID(spec) == cl.UID:
				continue // not placed yet, or its placement is being restored
			case slices.ContainsFunc(slices.Collect(maps.Values(s.Assigns[cl.VM])), func(a *rec[keys.Assignment]) bool { return a.OK() && a.Value.UID == cl.UID }):
				continue // an assignment of the incarnation is still out
			}
			conds := []Cond{ModRev(r.Key, r.ModRevision), ModRev(sp.Placement(cl.VM), modRev(pl))}
			if spec != nil {
				conds = append(conds, ModRev(sp.VMSpec(cl.VM), spec.ModRevision))
			} else {
				conds = append(conds, ModRev(sp.VMSpec(cl.VM), 0))
			}
			acts = append(acts, Action{Object: "vm/" + cl.VM, What: "release address", Conds: conds, Writes: []Write{Del(r.Key)},
				Notes: []Note{event("vm/"+cl.VM, "address-released", fmt.Sprintf("%s on %s (uid %d): no longer the VM's", ip, net, cl.UID))}})
		}
	}
	for _, name := range sortedNames(s.VMs) {
		pl := s.VMs[name].Placement
		if !pl.OK() {
			continue
		}
		for i, nic := range pl.Value.NICs {
			if nic == nil || s.Claims[nic.Network][nic.IP()] != nil {
				continue
			}
			if h := s.addresses().held[nic.Network][nic.IP()]; h != "" && h != holder(name, pl.Value.UID) {
				s.log(Error, "a VM's address is held by another: one of them must change it", "vm", name, "address", nic.IP(), "network", nic.Network, "held_by", h)
				continue
			}
			key := sp.Address(nic.Network, nic.IP())
			claim := keys.AddressClaim{VM: name, UID: pl.Value.UID, NIC: i, Since: s.Now.UTC()}
			s.addresses().hold(nic.Network, nic.IP(), holder(name, pl.Value.UID))
			acts = append(acts, Action{Object: "vm/" + name, What: "claim address again",
				Conds:  []Cond{CreateRev(key, 0), ModRev(sp.Placement(name), pl.ModRevision)},
				Writes: []Write{Put(key, keys.MustEncode(&claim))},
				Notes: []Note{{Level: Warn, Log: "a placed VM's address claim was missing: claimed again", Args: []any{"vm", name, "address", nic.IP(), "network", nic.Network},
					Object: "vm/" + name, Event: "address-reclaimed", Message: fmt.Sprintf("%s on %s: its claim was missing", nic.IP(), nic.Network)}}})
		}
	}
	return acts
}
