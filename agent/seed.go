package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/herdhq/herd/agent/hostnet"
	"github.com/herdhq/herd/agent/hypervisor"
	"github.com/herdhq/herd/lib/cloudinit"
	"github.com/herdhq/herd/lib/keys"
)

// Guest configuration. A VM with NICs on herd networks, SSH keys or user data gets a NoCloud seed
// (lib/cloudinit) as a read-only CD-ROM, built here from its assignment: <SeedDir>/<name>-<uid>.iso.
// Built before the domain is defined and, on a migration target, before the domain arrives (QEMU
// there opens the same path); rewritten when what it says changes (a spec update), by rename, so a
// running guest's open image is never half-written. Swept once no domain or assignment of that
// incarnation is left on this node.

// ensureNetworks makes the bridges of the VM's NICs on VLAN networks (an untagged network's bridge
// is the host's own, as a bare bridge is).
func (a *Agent) ensureNetworks(asg *keys.Assignment) error {
	for _, n := range asg.NICs {
		switch {
		case n == nil || n.VLAN == 0:
		case a.cfg.Uplink == "":
			return fmt.Errorf("network %s is VLAN %d and this node has no uplink for VLANs (herd agent --uplink)", n.Network, n.VLAN)
		case a.hv.DomainType() == "test":
			// libvirt's test driver runs no guest: there is nothing to bridge.
		default:
			if err := hostnet.EnsureVLAN(a.cfg.Uplink, n.VLAN, n.Bridge, n.MTU); err != nil {
				return fmt.Errorf("network %s: %w", n.Network, err)
			}
		}
	}
	return nil
}

// guard makes the anti-spoofing rules (hostnet) hold exactly the NICs on herd networks of every VM
// assigned here, incoming migrations included: called before a domain is defined or expected, so
// that its taps are guarded before they exist, and with always on every resync (someone may have
// flushed the table). A node that never had such a NIC makes no table.
func (a *Agent) guard(ctx context.Context, always bool) error {
	if a.hv.DomainType() == "test" {
		return nil // no taps, and nftables here would be the developer's own machine's
	}
	var ports []hostnet.Port
	for _, r := range a.assigns.List() {
		if !r.OK() || r.Value.Withdraw {
			continue
		}
		asg := r.Value
		for i, n := range asg.NICs {
			if n != nil && i < len(asg.MACs) {
				ports = append(ports, hostnet.Port{Tap: hostnet.TapName(asg.UID, i), MAC: asg.MACs[i], IP: n.IP()})
			}
		}
	}
	script, err := hostnet.GuardRules(ports)
	if err != nil {
		return err
	}
	a.mu.Lock()
	same, never := a.guarded == script, a.guarded == ""
	a.mu.Unlock()
	if (same && !always) || (never && len(ports) == 0) {
		return nil
	}
	if err := hostnet.ApplyGuard(ctx, ports); err != nil {
		return err
	}
	a.mu.Lock()
	a.guarded = script
	a.mu.Unlock()
	return nil
}

// wantsSeed says whether a VM is given a seed.
func wantsSeed(asg *keys.Assignment) bool {
	if sp := asg.Spec; sp != nil && (len(sp.SSHKeys) > 0 || sp.UserData != "") {
		return true
	}
	for _, n := range asg.NICs {
		if n != nil {
			return true
		}
	}
	return false
}

func (a *Agent) seedPath(name string, uid int64) string {
	return filepath.Join(a.cfg.SeedDir, fmt.Sprintf("%s-%d.iso", name, uid))
}

// ensureSeed writes the VM's seed if it has one and it changed, and returns its path ("" for none).
func (a *Agent) ensureSeed(name string, asg *keys.Assignment) (string, error) {
	if !wantsSeed(asg) {
		return "", nil
	}
	if a.cfg.SeedDir == "" {
		return "", fmt.Errorf("the VM has NICs on herd networks, SSH keys or user data, and this node builds no seeds (herd agent --seed-dir)")
	}
	seed := cloudinit.For(name, asg)
	sum := sha256.New()
	for _, b := range [][]byte{seed.MetaData(), seed.NetworkConfig(), seed.UserDataFile()} {
		sum.Write(b)
		sum.Write([]byte{0})
	}
	hash := sum.Sum(nil)
	path := a.seedPath(name, asg.UID)
	a.mu.Lock()
	same := bytes.Equal(a.seeds[path], hash)
	a.mu.Unlock()
	if same {
		if _, err := os.Stat(path); err == nil {
			return path, nil
		}
	}
	iso, err := seed.ISO()
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(a.cfg.SeedDir, 0o700); err != nil {
		return "", fmt.Errorf("seed directory: %w", err)
	}
	tmp := path + ".new"
	if err := os.WriteFile(tmp, iso, 0o600); err != nil {
		return "", fmt.Errorf("write seed: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return "", fmt.Errorf("write seed: %w", err)
	}
	a.mu.Lock()
	a.seeds[path] = hash
	a.mu.Unlock()
	return path, nil
}

// sweepSeeds removes the seeds of incarnations with neither a domain nor an assignment here.
func (a *Agent) sweepSeeds(doms []hypervisor.Domain) {
	if a.cfg.SeedDir == "" {
		return
	}
	entries, err := os.ReadDir(a.cfg.SeedDir)
	if err != nil {
		return // none made yet
	}
	keep := map[string]bool{}
	for _, d := range doms {
		if d.Managed {
			keep[filepath.Base(a.seedPath(d.Name, d.UID))] = true
		}
	}
	for _, r := range a.assigns.List() {
		if _, name, ok := keys.ParseNodeScoped(a.space.AssignRoot(), r.Key); ok && r.OK() {
			keep[filepath.Base(a.seedPath(name, r.Value.UID))] = true
		}
	}
	for _, e := range entries {
		base := e.Name()
		stem, ok := strings.CutSuffix(base, ".iso")
		if !ok || keep[base] {
			continue
		}
		if i := strings.LastIndexByte(stem, '-'); i < 0 {
			continue
		} else if _, err := strconv.ParseInt(stem[i+1:], 10, 64); err != nil {
			continue // not a seed of ours
		}
		path := filepath.Join(a.cfg.SeedDir, base)
		if err := os.Remove(path); err == nil {
			a.mu.Lock()
			delete(a.seeds, path)
			a.mu.Unlock()
			a.log.Debug("seed removed: no domain or assignment of its VM here", "path", path)
		}
	}
}
