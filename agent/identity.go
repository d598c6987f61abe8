package agent

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/herdhq/herd/lib/keys"
)

// Host describes where identity facts are read from; tests point it at a fake root.
type Host struct {
	Cmdline string // contents of /proc/cmdline
	SysRoot string // usually "/sys"
}

// LocalHost reads the running machine.
func LocalHost() Host {
	b, _ := os.ReadFile("/proc/cmdline")
	return Host{Cmdline: string(b), SysRoot: "/sys"}
}

// CmdlineParam returns the value of name=value on the kernel command line.
func (h Host) CmdlineParam(name string) (string, bool) {
	for _, f := range strings.Fields(h.Cmdline) {
		if k, v, ok := strings.Cut(f, "="); ok && k == name {
			return v, true
		}
	}
	return "", false
}

// HWID finds this machine's hardware id, the name the operator enrolled it under, in the order of
// how deliberate the source is: herd.hwid= on the kernel command line (the boot server puts it
// there), the MAC of the NIC that PXE-booted (BOOTIF=, as pxelinux and iPXE write it), the MAC of the
// first physical NIC, and finally the DMI serial number (a Dell service tag).
func (h Host) HWID() (string, string, error) {
	if v, ok := h.CmdlineParam("herd.hwid"); ok {
		id, err := keys.NormalizeHWID(v)
		return id, "kernel command line herd.hwid", err
	}
	if v, ok := h.CmdlineParam("BOOTIF"); ok {
		// pxelinux form: 01-52-54-00-12-34-56 (the 01 is the ARP hardware type).
		v = strings.TrimPrefix(v, "01-")
		if id, err := keys.NormalizeMAC(v); err == nil {
			return id, "kernel command line BOOTIF", nil
		}
	}
	if mac := h.firstPhysicalMAC(); mac != "" {
		return mac, "first physical NIC", nil
	}
	b, err := os.ReadFile(filepath.Join(h.SysRoot, "class/dmi/id/product_serial"))
	if err == nil {
		if s := strings.TrimSpace(string(b)); s != "" {
			id, err := keys.NormalizeHWID(s)
			return id, "DMI serial number", err
		}
	}
	return "", "", fmt.Errorf("no hardware id: no herd.hwid= or BOOTIF= on the kernel command line, no physical NIC, no DMI serial; pass --hwid")
}

// BootMAC is the MAC of the NIC this machine booted from, as the kernel command line says
// (herd.mac=, which herd's boot script writes, else BOOTIF=); "" when it does not say.
func (h Host) BootMAC() string {
	for _, p := range []string{"herd.mac", "BOOTIF"} {
		if v, ok := h.CmdlineParam(p); ok {
			if mac, err := keys.NormalizeMAC(strings.TrimPrefix(v, "01-")); err == nil {
				return mac
			}
		}
	}
	return ""
}

func (h Host) firstPhysicalMAC() string {
	entries, err := os.ReadDir(filepath.Join(h.SysRoot, "class/net"))
	if err != nil {
		return ""
	}
	names := make([]string, 0, len(entries))
	for _, e := range entries {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	for _, n := range names {
		// Physical NICs have a device link; bridges, veths and loopback don't.
		if _, err := os.Stat(filepath.Join(h.SysRoot, "class/net", n, "device")); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(h.SysRoot, "class/net", n, "address"))
		if err != nil {
			continue
		}
		if mac, err := keys.NormalizeMAC(strings.TrimSpace(string(b))); err == nil && mac != "00:00:00:00:00:00" {
			return mac
		}
	}
	return ""
}

// BootID is the kernel's id of this boot: a new one after every reboot, which is how herd tells a
// node that came back from one that never left.
func BootID() (string, error) {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "", fmt.Errorf("read boot id: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}
