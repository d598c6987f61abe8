package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/herdhq/herd/lib/cloudinit"
	"github.com/herdhq/herd/lib/keys"
)

// TestSeedFollowsTheAssignment: a VM with a NIC on a herd network gets its seed, built from the
// assignment, before its domain is defined; a spec update rewrites it; once the VM is gone from
// the node the seed goes too. A VM with nothing to tell its guest gets none.
func TestSeedFollowsTheAssignment(t *testing.T) {
	dir := t.TempDir()
	h := startWith(t, nil, func(c *Config) { c.SeedDir = dir })
	spec := keys.VMSpec{VCPUs: 1, MemoryMiB: 64, Networks: []keys.Network{{Network: "prod"}}, SSHKeys: []string{"ssh-ed25519 AAAA k1"}}
	uid := put(t, h.c, space.VMSpec("web1"), keys.MustEncode(&spec))
	nic := &keys.NIC{Network: "prod", Bridge: "br0", Address: "10.20.0.17/22", Gateway: "10.20.0.1"}
	pl := keys.Placement{UID: uid, Node: hwid, Epoch: 1, UUID: fmt.Sprintf("00000000-0000-4000-8000-%012d", uid), SpecRev: uid,
		MACs: []string{"52:54:00:00:00:09"}, NICs: []*keys.NIC{nic}}
	asg := keys.Assignment{UID: uid, Epoch: 1, UUID: pl.UUID, SpecRev: uid, Spec: &spec, MACs: pl.MACs, NICs: pl.NICs}
	put(t, h.c, space.Placement("web1"), keys.MustEncode(&pl))
	put(t, h.c, space.Assign(hwid, "web1"), keys.MustEncode(&asg))
	path := filepath.Join(dir, fmt.Sprintf("web1-%d.iso", uid))
	h.eventually("web1 runs with its seed", func() error {
		if d := h.domain("web1"); d == nil || d.State != "running" {
			return fmt.Errorf("domain %+v", d)
		}
		if _, err := os.Stat(path); err != nil {
			return err
		}
		return nil
	})
	xml, err := h.hv.DefinedXML(context.Background(), "web1")
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf(`<source file='%s'/>`, path); !strings.Contains(xml, want) {
		t.Fatalf("domain XML lacks the seed %s:\n%s", want, xml)
	}
	first, _ := os.ReadFile(path)
	if !strings.Contains(string(first), `"10.20.0.17/22"`) || !strings.Contains(string(first), "ssh-ed25519 AAAA k1") {
		t.Fatalf("seed lacks the address or key")
	}

	// A spec update (a new key) rewrites it.
	spec.SSHKeys = append(spec.SSHKeys, "ssh-ed25519 BBBB k2")
	rev := put(t, h.c, space.VMSpec("web1"), keys.MustEncode(&spec))
	asg.Spec, asg.SpecRev = &spec, rev
	put(t, h.c, space.Assign(hwid, "web1"), keys.MustEncode(&asg))
	h.eventually("the seed rewritten", func() error {
		b, err := os.ReadFile(path)
		if err != nil || !strings.Contains(string(b), "BBBB k2") {
			return fmt.Errorf("seed without the new key (%v)", err)
		}
		return nil
	})
	if got := cloudinit.For("web1", &asg).InstanceID; got != fmt.Sprintf("web1-%d", uid) {
		t.Fatalf("instance id %s", got)
	}

	// A VM with nothing for its guest: no seed.
	h.place("plain", 1, hwid)
	h.eventually("plain runs", func() error {
		if d := h.domain("plain"); d == nil || d.State != "running" {
			return fmt.Errorf("domain %+v", d)
		}
		return nil
	})

	// Gone from the node: the seed is swept.
	del(t, h.c, space.VMSpec("web1"))
	del(t, h.c, space.Placement("web1"))
	del(t, h.c, space.Assign(hwid, "web1"))
	h.eventually("the seed swept", func() error {
		if h.domain("web1") != nil {
			return fmt.Errorf("domain still here")
		}
		entries, _ := os.ReadDir(dir)
		if len(entries) != 0 {
			return fmt.Errorf("seed dir holds %v", entries)
		}
		return nil
	})
}
