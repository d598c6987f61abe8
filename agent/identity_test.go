package agent

import (
	"os"
	"path/filepath"
	"testing"
)

func fakeSys(t *testing.T, nics map[string]string, physical []string, serial string) string {
	root := t.TempDir()
	for name, mac := range nics {
		d := filepath.Join(root, "class/net", name)
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		_ = os.WriteFile(filepath.Join(d, "address"), []byte(mac+"\n"), 0o644)
	}
	for _, name := range physical {
		_ = os.MkdirAll(filepath.Join(root, "class/net", name, "device"), 0o755)
	}
	if serial != "" {
		_ = os.MkdirAll(filepath.Join(root, "class/dmi/id"), 0o755)
		_ = os.WriteFile(filepath.Join(root, "class/dmi/id/product_serial"), []byte(serial+"\n"), 0o644)
	}
	return root
}

func TestHWIDSources(t *testing.T) {
	sys := fakeSys(t, map[string]string{"lo": "00:00:00:00:00:00", "br0": "aa:aa:aa:aa:aa:aa", "eno2": "52:54:00:00:00:02", "eno1": "52:54:00:00:00:01"}, []string{"eno1", "eno2"}, "7XK2QF2")
	cases := []struct {
		cmdline, want, source string
	}{
		{"quiet herd.hwid=ABC123 x", "ABC123", "kernel command line herd.hwid"},
		{"BOOTIF=01-52-54-00-AA-BB-CC", "52:54:00:aa:bb:cc", "kernel command line BOOTIF"},
		{"quiet", "52:54:00:00:00:01", "first physical NIC"},
	}
	for _, c := range cases {
		id, src, err := Host{Cmdline: c.cmdline, SysRoot: sys}.HWID()
		if err != nil || id != c.want || src != c.source {
			t.Errorf("%q: got %q from %q (%v), want %q from %q", c.cmdline, id, src, err, c.want, c.source)
		}
	}
	noNIC := fakeSys(t, map[string]string{"lo": "00:00:00:00:00:00"}, nil, "7XK2QF2")
	if id, src, err := (Host{SysRoot: noNIC}).HWID(); err != nil || id != "7XK2QF2" || src != "DMI serial number" {
		t.Errorf("serial fallback: %q %q %v", id, src, err)
	}
	if _, _, err := (Host{SysRoot: t.TempDir()}).HWID(); err == nil {
		t.Error("no source at all must be an error that says to pass --hwid")
	}
}
