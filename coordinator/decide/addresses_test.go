package decide

import (
	"errors"
	"strings"
	"testing"

	"github.com/herdhq/herd/lib/keys"
)

// TestNICsForHandEdits: what only hands in etcd make happen reaches nicsFor as a problem in words,
// never as an address given twice; and a VM whose placement was lost keeps the address it holds.
func TestNICsForHandEdits(t *testing.T) {
	sp := keys.MustSpace("/herd")
	claim := func(vm string, uid int64) *rec[keys.AddressClaim] {
		return &rec[keys.AddressClaim]{Value: &keys.AddressClaim{VM: vm, UID: uid}}
	}
	view1 := func(claims map[string]*rec[keys.AddressClaim]) *view {
		snap := &Snapshot{
			Networks: map[string]*rec[keys.NetworkSpec]{"prod": {Value: &keys.NetworkSpec{CIDR: "10.20.0.0/29", Gateway: "10.20.0.1"}}},
			Claims:   map[string]map[string]*rec[keys.AddressClaim]{"prod": claims},
		}
		return &view{Snapshot: snap, cfg: &Config{Space: sp}, plan: &Plan{}}
	}
	spec := &keys.VMSpec{Networks: []keys.Network{{Network: "prod"}}}
	kept := []*keys.NIC{{Network: "prod", Address: "10.20.0.4/29"}}

	// Its placement says .4; someone deleted its claim and made one for another VM.
	s := view1(map[string]*rec[keys.AddressClaim]{"10.20.0.4": claim("other", 9)})
	if c, p := s.nicsFor("web", 5, spec, kept); !strings.Contains(p, "address 10.20.0.4 on network prod, which this VM holds, is claimed by vm other (uid 9)") || len(c.writes) != 0 {
		t.Fatalf("kept address claimed by another: %q %+v", p, c)
	}
	// An unreadable claim is nobody's to give: the next free address is .3, not .2.
	s = view1(map[string]*rec[keys.AddressClaim]{"10.20.0.2": {Err: errors.New("unreadable")}})
	if c, p := s.nicsFor("web", 5, spec, nil); p != "" || c.nics[0].IP() != "10.20.0.3" {
		t.Fatalf("next to an unreadable claim: %q %+v", p, c.nics[0])
	}
	// The placement lost (restored from a report), the claim still the VM's: the same address, no
	// new claim written.
	s = view1(map[string]*rec[keys.AddressClaim]{"10.20.0.5": claim("web", 5)})
	if c, p := s.nicsFor("web", 5, spec, nil); p != "" || c.nics[0].IP() != "10.20.0.5" || len(c.writes) != 0 {
		t.Fatalf("own claim without a placement: %q %+v %d writes", p, c.nics[0], len(c.writes))
	}
	// A fixed address another VM holds, and a second NIC failing after the first picked: nothing
	// stays booked in the round's book (the round's search for free addresses moves on, though:
	// the next round starts again from the lowest).
	s = view1(map[string]*rec[keys.AddressClaim]{"10.20.0.6": claim("other", 9)})
	two := &keys.VMSpec{Networks: []keys.Network{{Network: "prod"}, {Network: "prod", Address: "10.20.0.6"}}}
	if _, p := s.nicsFor("web", 5, two, nil); !strings.Contains(p, "address 10.20.0.6 on network prod is held by vm other (uid 9)") {
		t.Fatalf("fixed address held: %q", p)
	}
	if h := s.addresses().held["prod"]["10.20.0.2"]; h != "" {
		t.Fatalf("the failed VM's first pick stayed booked for %s", h)
	}
}
