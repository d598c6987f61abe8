package cloudinit

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/herdhq/herd/lib/keys"
)

func sample() Seed {
	asg := &keys.Assignment{UID: 42, MACs: []string{"52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:00:00:00:03"},
		Spec: &keys.VMSpec{SSHKeys: []string{"ssh-ed25519 AAAAC3Nza me@laptop"}, UserData: "#cloud-config\nruncmd: [\"echo 'hi: there'\"]\n"},
		NICs: []*keys.NIC{
			{Network: "prod", Bridge: "herd-v120", VLAN: 120, Address: "10.20.0.17/22", Gateway: "10.20.0.1", DNS: []string{"10.20.0.2"}, MTU: 1450},
			nil, // a NIC on a bare bridge
			{Network: "back", Bridge: "herd-v121", VLAN: 121, Address: "10.21.0.5/24", Gateway: "10.21.0.1"},
		}}
	return For("web1", asg)
}

// TestSeedFiles: the instance id names the incarnation, keys go in meta-data, each NIC on a herd
// network is matched by its MAC with its address, and only the first gateway becomes the default
// route.
func TestSeedFiles(t *testing.T) {
	s := sample()
	var md map[string]any
	if err := json.Unmarshal(s.MetaData(), &md); err != nil {
		t.Fatal(err)
	}
	if md["instance-id"] != "web1-42" || md["local-hostname"] != "web1" || len(md["public-keys"].([]any)) != 1 {
		t.Fatalf("meta-data %v", md)
	}
	var nc struct {
		Version   int `json:"version"`
		Ethernets map[string]struct {
			Match     map[string]string   `json:"match"`
			Addresses []string            `json:"addresses"`
			Routes    []map[string]string `json:"routes"`
			MTU       int                 `json:"mtu"`
		} `json:"ethernets"`
	}
	if err := json.Unmarshal(s.NetworkConfig(), &nc); err != nil {
		t.Fatal(err)
	}
	e0, e1 := nc.Ethernets["eth0"], nc.Ethernets["eth1"]
	if nc.Version != 2 || len(nc.Ethernets) != 2 || e0.Match["macaddress"] != "52:54:00:00:00:01" || e0.Addresses[0] != "10.20.0.17/22" ||
		len(e0.Routes) != 1 || e0.Routes[0]["via"] != "10.20.0.1" || e0.MTU != 1450 {
		t.Fatalf("network-config %s", s.NetworkConfig())
	}
	if e1.Match["macaddress"] != "52:54:00:00:00:03" || len(e1.Routes) != 0 {
		t.Fatalf("the second NIC on a network: %+v (one default route only)", e1)
	}
	if string(s.UserDataFile()) != s.UserData {
		t.Fatalf("user-data changed on the way: %q", s.UserDataFile())
	}
	if got := string(For("x", &keys.Assignment{UID: 1}).UserDataFile()); !strings.HasPrefix(got, "#cloud-config") {
		t.Fatalf("empty user-data: %q", got)
	}
}

// TestSeedISOReadByOthers: the image is what other ISO 9660 readers read: util-linux's blkid finds
// the cidata label, and cdrkit's isoinfo lists exactly the three files under the names cloud-init
// opens (Linux drops the ";1" version) and reads back the bytes written. (This machine's kernel has
// no iso9660 driver; the e2e guests read the seed with theirs.)
func TestSeedISOReadByOthers(t *testing.T) {
	for _, tool := range []string{"blkid", "isoinfo"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") != "" {
				t.Fatalf("%s is missing: scripts/deps.sh installs it", tool)
			}
			t.Skipf("%s is missing: run scripts/deps.sh", tool)
		}
	}
	s := sample()
	iso, err := s.ISO()
	if err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(t.TempDir(), "seed.iso")
	if err := os.WriteFile(f, iso, 0o600); err != nil {
		t.Fatal(err)
	}
	label, err := exec.Command("blkid", "-o", "value", "-s", "LABEL", f).CombinedOutput()
	if err != nil || strings.TrimSpace(string(label)) != Label {
		t.Fatalf("blkid: %q %v", label, err)
	}
	list, err := exec.Command("isoinfo", "-i", f, "-f").CombinedOutput()
	if err != nil {
		t.Fatalf("isoinfo -f: %v: %s", err, list)
	}
	names := strings.Fields(string(list))
	sort.Strings(names)
	if strings.Join(names, " ") != "/meta-data;1 /network-config;1 /user-data;1" {
		t.Fatalf("files in the seed: %q", list)
	}
	for name, want := range map[string][]byte{"meta-data": s.MetaData(), "network-config": s.NetworkConfig(), "user-data": s.UserDataFile()} {
		got, err := exec.Command("isoinfo", "-i", f, "-x", "/"+name+";1").Output()
		if err != nil || string(got) != string(want) {
			t.Fatalf("%s as isoinfo reads it: %q (%v), want %q", name, got, err, want)
		}
	}
}
