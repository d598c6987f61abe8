// Package cloudinit builds a VM's NoCloud seed: the ISO 9660 image labelled "cidata" that
// cloud-init (and anything else that reads the format) finds at a guest's first boot, with its
// instance id, hostname, SSH keys, network configuration (version 2) and user data.
//
// meta-data and network-config are written as JSON, which is YAML: nothing an operator writes can
// break out of a value. user-data is the spec's, as it is.
package cloudinit

import (
	"bytes"
	"encoding/json"
	"fmt"

	"github.com/kdomanski/iso9660"

	"github.com/herdhq/herd/lib/keys"
)

// Label is the volume label NoCloud looks for.
const Label = "cidata"

// Seed is what a guest is told at its first boot.
type Seed struct {
	// InstanceID changes when the guest must be configured anew: herd uses the VM's name and uid,
	// so a re-created VM of the same name is a new instance, a migrated one is not.
	InstanceID string
	Hostname   string
	SSHKeys    []string
	UserData   string
	// NICs are the VM's NICs on herd networks, by MAC (a NIC on a bare bridge is left to DHCP or
	// to the user data).
	NICs []NIC
}

// NIC is one NIC to configure.
type NIC struct {
	MAC string
	*keys.NIC
}

// For builds the seed of a VM from its assignment.
func For(name string, asg *keys.Assignment) Seed {
	s := Seed{InstanceID: fmt.Sprintf("%s-%d", name, asg.UID), Hostname: name}
	if sp := asg.Spec; sp != nil {
		s.SSHKeys, s.UserData = sp.SSHKeys, sp.UserData
	}
	for i, nic := range asg.NICs {
		if nic != nil && i < len(asg.MACs) {
			s.NICs = append(s.NICs, NIC{MAC: asg.MACs[i], NIC: nic})
		}
	}
	return s
}

// MetaData is the seed's meta-data file.
func (s Seed) MetaData() []byte {
	m := map[string]any{"instance-id": s.InstanceID, "local-hostname": s.Hostname}
	if len(s.SSHKeys) > 0 {
		m["public-keys"] = s.SSHKeys
	}
	return mustJSON(m)
}

// NetworkConfig is the seed's network-config file (netplan-style version 2): each NIC matched by
// its MAC, with its static address, the default route through its network's gateway (the first
// NIC's only, so a guest has one default route), its DNS servers and MTU.
func (s Seed) NetworkConfig() []byte {
	eths := map[string]any{}
	routed := false
	for i, n := range s.NICs {
		e := map[string]any{
			"match":     map[string]any{"macaddress": n.MAC},
			"set-name":  fmt.Sprintf("eth%d", i),
			"addresses": []string{n.Address},
		}
		if n.Gateway != "" && !routed {
			e["routes"] = []map[string]string{{"to": "0.0.0.0/0", "via": n.Gateway}}
			routed = true
		}
		if len(n.DNS) > 0 {
			e["nameservers"] = map[string]any{"addresses": n.DNS}
		}
		if n.MTU > 0 {
			e["mtu"] = n.MTU
		}
		eths[fmt.Sprintf("eth%d", i)] = e
	}
	return mustJSON(map[string]any{"version": 2, "ethernets": eths})
}

// UserDataFile is the seed's user-data file: the spec's, or an empty cloud-config.
func (s Seed) UserDataFile() []byte {
	if s.UserData == "" {
		return []byte("#cloud-config\n{}\n")
	}
	return []byte(s.UserData)
}

// ISO renders the seed as an ISO 9660 image labelled cidata.
func (s Seed) ISO() ([]byte, error) {
	w, err := iso9660.NewWriter()
	if err != nil {
		return nil, fmt.Errorf("seed %s: %w", s.InstanceID, err)
	}
	defer func() { _ = w.Cleanup() }()
	for name, data := range map[string][]byte{"meta-data": s.MetaData(), "network-config": s.NetworkConfig(), "user-data": s.UserDataFile()} {
		if err := w.AddFile(bytes.NewReader(data), name); err != nil {
			return nil, fmt.Errorf("seed %s: %s: %w", s.InstanceID, name, err)
		}
	}
	var out bytes.Buffer
	if err := w.WriteTo(&out, Label); err != nil {
		return nil, fmt.Errorf("seed %s: %w", s.InstanceID, err)
	}
	return out.Bytes(), nil
}

func mustJSON(v any) []byte {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		panic(err) // maps of strings and numbers always encode
	}
	return append(b, '\n')
}
