package keys

import (
	"fmt"
	"net"
	"net/url"
	"path"
	"regexp"
	"slices"
	"strings"
	"unicode"
)

// FieldError says which member of a value is wrong and why, in words an operator can act on.
type FieldError struct {
	Field   string `json:"field"`
	Message string `json:"message"`
}

// FieldErrors collects every problem of one value, so a user fixes them all in one go.
type FieldErrors []FieldError

func (fe FieldErrors) Error() string {
	parts := make([]string, len(fe))
	for i, e := range fe {
		parts[i] = e.Field + ": " + e.Message
	}
	return strings.Join(parts, "; ")
}

func (fe *FieldErrors) add(field, format string, args ...any) {
	*fe = append(*fe, FieldError{Field: field, Message: fmt.Sprintf(format, args...)})
}

func (fe FieldErrors) err() error {
	if len(fe) == 0 {
		return nil
	}
	return fe
}

// Limits on a VM, generous enough for any real hypervisor and tight enough to catch typos (a memory
// given in KiB, a disk in bytes).
const (
	MaxVCPUs      = 1024
	MaxMemoryMiB  = 64 << 20 // 64 TiB
	MaxDiskGiB    = 1 << 20  // 1 PiB
	maxNameLength = 63
)

var (
	nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$`)
	// diskNameRE starts with a letter so that a disk's storage name never ends like a uid.
	diskNameRE = regexp.MustCompile(`^[a-z][a-z0-9-]{0,30}$`)
	labelRE    = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?$`)
	hwidRE     = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9._:-]*[A-Za-z0-9])?$`)
)

// ValidateName checks a VM or pool name: lower-case letters, digits, '-' and '.', starting and
// ending with a letter or digit, at most 63 characters (a DNS label, so it can name a guest).
func ValidateName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("name is empty")
	case len(name) > maxNameLength:
		return fmt.Errorf("name %q is longer than %d characters", name, maxNameLength)
	case !nameRE.MatchString(name):
		return fmt.Errorf("name %q may only hold lower-case letters, digits, '-' and '.', and must start and end with a letter or digit", name)
	}
	return nil
}

// NormalizeHWID turns a MAC address in any common spelling into the canonical hwid (lower-case,
// colon-separated); anything else is taken as a serial number (e.g. a Dell service tag) and kept as
// is, after checking it is safe to put in a key.
func NormalizeHWID(s string) (string, error) {
	s = strings.TrimSpace(s)
	if mac, err := net.ParseMAC(s); err == nil && len(mac) == 6 {
		return mac.String(), nil
	}
	if len(s) == 12 && isHex(s) { // bare 525400123456, as some BMCs and iPXE's ${mac:hexraw} print it
		mac, _ := net.ParseMAC(s[0:2] + ":" + s[2:4] + ":" + s[4:6] + ":" + s[6:8] + ":" + s[8:10] + ":" + s[10:12])
		return mac.String(), nil
	}
	if s == "" || len(s) > 128 || !hwidRE.MatchString(s) {
		return "", fmt.Errorf("hardware id %q is neither a MAC address nor a serial number (letters, digits, '.', '_', '-')", s)
	}
	return s, nil
}

func isHex(s string) bool {
	for _, c := range s {
		if !strings.ContainsRune("0123456789abcdefABCDEF", c) {
			return false
		}
	}
	return true
}

// NormalizeMAC accepts any spelling net.ParseMAC does and returns lower-case colon form.
func NormalizeMAC(s string) (string, error) {
	mac, err := net.ParseMAC(strings.TrimSpace(s))
	if err != nil || len(mac) != 6 {
		return "", fmt.Errorf("%q is not an Ethernet MAC address", s)
	}
	return mac.String(), nil
}

func validateLabels(fe *FieldErrors, field string, labels map[string]string) {
	for k, v := range labels {
		if len(k) > 63 || !labelRE.MatchString(k) {
			fe.add(field+"."+k, "label names are letters, digits, '.', '_', '-' and '/', at most 63 characters")
		}
		if len(v) > 63 || (v != "" && !labelRE.MatchString(v)) {
			fe.add(field+"."+k, "label value %q must be letters, digits, '.', '_', '-' and '/', at most 63 characters", v)
		}
	}
}

// Validate checks a spec's contents. pools lists the disk pools the cluster has; nil skips that
// check (for callers that cannot know, e.g. before the cluster record exists).
func (s *VMSpec) Validate(pools []string) error {
	var fe FieldErrors
	if s.VCPUs < 1 || s.VCPUs > MaxVCPUs {
		fe.add("vcpus", "must be between 1 and %d, got %d", MaxVCPUs, s.VCPUs)
	}
	if s.MemoryMiB < 1 || s.MemoryMiB > MaxMemoryMiB {
		fe.add("memory_mib", "must be between 1 and %d MiB, got %d", MaxMemoryMiB, s.MemoryMiB)
	}
	if s.AdoptUID < 0 {
		fe.add("adopt_uid", "must be the uid of an orphan (herdctl vm orphans), got %d", s.AdoptUID)
	}
	validateDisks(&fe, s, pools)
	switch s.Power {
	case "", PowerRunning, PowerStopped:
	default:
		fe.add("power", "must be %q or %q, got %q", PowerRunning, PowerStopped, s.Power)
	}
	validateLabels(&fe, "labels", s.Labels)
	validateLabels(&fe, "node_selector", s.NodeSelector)
	for i, n := range s.Networks {
		validateNIC(&fe, i, n)
	}
	validateFixedAddresses(&fe, s.Networks)
	validateGuestConfig(&fe, s)
	if len(s.Networks) > 8 {
		fe.add("networks", "at most 8 NICs")
	}
	if b := s.Boot; b != nil {
		for field, p := range map[string]string{"boot.kernel": b.Kernel, "boot.initrd": b.Initrd} {
			if p == "" && field == "boot.initrd" {
				continue
			}
			if err := ValidateBootPath(p); err != nil {
				fe.add(field, "%v", err)
			}
		}
		if strings.ContainsAny(b.Cmdline, "\n\x00") {
			fe.add("boot.cmdline", "must be one line")
		}
	}
	switch s.MigrationPolicy {
	case "", MigrateLive, MigrateRestart:
	default:
		fe.add("migration_policy", "must be %q or %q, got %q", MigrateLive, MigrateRestart, s.MigrationPolicy)
	}
	if s.Restarts < 0 {
		fe.add("restarts", "must not be negative")
	}
	if s.AntiAffinity != "" && ValidateName(s.AntiAffinity) != nil {
		fe.add("anti_affinity", "group %q must be a name (lower-case letters, digits, '-', '.')", s.AntiAffinity)
	}
	return fe.err()
}

// ValidateBootPath checks a direct kernel boot path as a spec may name it: absolute, already clean
// (no "..", no "//", no trailing "/"), printable. Which directory it must lie in is each
// hypervisor's to say (its boot directory); this only refuses what no hypervisor should resolve.
func ValidateBootPath(p string) error {
	switch {
	case !strings.HasPrefix(p, "/"):
		return fmt.Errorf("must be an absolute path on the hypervisor (inside its boot directory, e.g. /var/lib/herd/boot/...)")
	case len(p) > 4096:
		return fmt.Errorf("is longer than 4096 bytes")
	case path.Clean(p) != p:
		return fmt.Errorf("%q must be written clean, as %q", p, path.Clean(p))
	}
	for _, r := range p {
		if r < 0x20 || r == 0x7f || !unicode.IsPrint(r) {
			return fmt.Errorf("%q holds a control character", p)
		}
	}
	return nil
}

// InDir reports whether the clean absolute path p lies strictly inside the clean directory dir.
func InDir(p, dir string) bool {
	dir = path.Clean(dir)
	if dir == "/" {
		return p != "/"
	}
	return strings.HasPrefix(p, dir+"/")
}

// WantsRunning says whether the spec asks for a running VM.
func (s *VMSpec) WantsRunning() bool { return s.Power == "" || s.Power == PowerRunning }

// Validate checks a hardware record against the hwid it is stored under.
func (h *Hardware) Validate(hwid string) error {
	var fe FieldErrors
	if h.MAC != "" {
		mac, err := NormalizeMAC(h.MAC)
		if err != nil {
			fe.add("mac", "%v", err)
		} else if mac != h.MAC {
			fe.add("mac", "must be written lower-case with colons: %q", mac)
		}
	}
	if h.StorageIP != "" && net.ParseIP(h.StorageIP) == nil {
		fe.add("storage_ip", "%q is not an IP address", h.StorageIP)
	}
	if h.MigrationIP != "" && net.ParseIP(h.MigrationIP) == nil {
		fe.add("migration_ip", "%q is not an IP address", h.MigrationIP)
	}
	if h.CPUs < 0 {
		fe.add("cpus", "must not be negative")
	}
	if h.MemoryMiB < 0 {
		fe.add("memory_mib", "must not be negative")
	}
	if norm, err := NormalizeHWID(hwid); err != nil {
		fe.add("hwid", "%v", err)
	} else if norm != hwid {
		fe.add("hwid", "must be written %q", norm)
	} else if _, err := NormalizeMAC(hwid); err != nil {
		if why := PlaceholderSerial(hwid); why != "" {
			fe.add("hwid", "%s: enrol this machine by its boot NIC's MAC", why)
		}
	}
	if h.Serial != "" {
		if why := PlaceholderSerial(h.Serial); why != "" {
			fe.add("serial", "%s: leave it out (the MAC identifies the machine)", why)
		}
	}
	validateLabels(&fe, "labels", h.Labels)
	return fe.err()
}

// Validate checks the cluster record.
func (c *Cluster) Validate() error {
	var fe FieldErrors
	if c.ID == "" {
		fe.add("id", "is required")
	}
	for i, p := range c.Pools {
		if err := ValidateName(p); err != nil {
			fe.add(fmt.Sprintf("pools[%d]", i), "%v", err)
		}
	}
	return fe.err()
}

var versionRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._+-]{0,62}$`)

// ValidateImageVersion checks an image version: letters, digits, '.', '_', '+', '-', at most 63
// characters, and not the reserved word "current".
func ValidateImageVersion(v string) error {
	if !versionRE.MatchString(v) {
		return fmt.Errorf("image version %q: use letters, digits, '.', '_', '+', '-' (at most 63)", v)
	}
	if v == ImageCurrentName {
		return fmt.Errorf("image version %q is reserved", v)
	}
	return nil
}

var fileNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$`)

// Validate checks a catalogue entry.
func (im *Image) Validate() error {
	var fe FieldErrors
	for _, f := range []struct {
		field string
		file  ImageFile
	}{{"kernel", im.Kernel}, {"initrd", im.Initrd}} {
		if !fileNameRE.MatchString(f.file.Name) {
			fe.add(f.field+".name", "%q must be a plain file name", f.file.Name)
		}
		if f.file.Size <= 0 {
			fe.add(f.field+".size", "must be positive")
		}
		if len(f.file.SHA256) != 64 || !isHex(f.file.SHA256) {
			fe.add(f.field+".sha256", "must be 64 hex digits")
		}
	}
	return fe.err()
}

// Validate checks a rollout an operator wrote.
func (r *Rollout) Validate() error {
	var fe FieldErrors
	if err := ValidateImageVersion(r.Image); err != nil {
		fe.add("image", "%v", err)
	}
	if r.MaxUnavailable < 1 {
		fe.add("max_unavailable", "must be at least 1")
	}
	if len(r.Nodes) == 0 {
		fe.add("nodes", "no node to upgrade")
	}
	seen := map[string]bool{}
	for _, n := range r.Nodes {
		if id, err := NormalizeHWID(n); err != nil || id != n {
			fe.add("nodes", "%q is not a normalised hardware id", n)
		}
		if seen[n] {
			fe.add("nodes", "%s is listed twice", n)
		}
		seen[n] = true
	}
	if _, err := ParseNodeSelector(r.Selector); err != nil {
		fe.add("selector", "%v", err)
	}
	if r.NodeTimeoutSeconds < 1 {
		fe.add("node_timeout_seconds", "must be positive")
	}
	switch r.State {
	case RolloutRunning, RolloutPaused, RolloutAborting:
	default:
		fe.add("state", "must be running, paused or aborting")
	}
	if r.Resumes < 0 {
		fe.add("resumes", "must not be negative")
	}
	return fe.err()
}

// Validate checks a node spec an operator wrote.
func (n *NodeSpec) Validate() error {
	var fe FieldErrors
	if n.Image != "" {
		if err := ValidateImageVersion(n.Image); err != nil {
			fe.add("image", "%v", err)
		}
	}
	if len(n.Reason) > 256 {
		fe.add("reason", "at most 256 characters")
	}
	return fe.err()
}

// MaxDisks bounds a VM's disks (virtio-blk vda..vdp).
const MaxDisks = 16

func validateDisks(fe *FieldErrors, s *VMSpec, pools []string) {
	field := "disks"
	if s.Disk != nil {
		if len(s.Disks) > 0 {
			fe.add("disk", "a spec has disks or the old disk, not both: move it into disks")
			return
		}
		field = "disk"
	}
	disks := s.DiskList()
	if len(disks) > MaxDisks {
		fe.add("disks", "at most %d disks, got %d", MaxDisks, len(disks))
	}
	seen := map[string]bool{}
	for i, d := range disks {
		f := fmt.Sprintf("%s[%d]", field, i)
		if field == "disk" {
			f = field
		}
		switch {
		case i > 0 && d.Name == "":
			fe.add(f+".name", "is required for every disk but the first")
		case !diskNameRE.MatchString(d.Name):
			fe.add(f+".name", "%q: a letter, then up to 30 lower-case letters, digits and '-'", d.Name)
		case seen[d.Name]:
			fe.add(f+".name", "%q names two disks", d.Name)
		}
		seen[d.Name] = true
		if d.Pool == "" {
			fe.add(f+".pool", "is required")
		} else if pools != nil && !slices.Contains(pools, d.Pool) {
			fe.add(f+".pool", "unknown pool %q (this cluster has: %s)", d.Pool, strings.Join(pools, ", "))
		}
		if d.SizeGiB < 1 || d.SizeGiB > MaxDiskGiB {
			fe.add(f+".size_gib", "must be between 1 and %d GiB, got %d", MaxDiskGiB, d.SizeGiB)
		}
		if d.Image != "" && d.From != "" {
			fe.add(f+".image", "clone an image or a source (from), not both")
		}
		if d.Image != "" {
			if err := ValidateName(d.Image); err != nil {
				fe.add(f+".image", "%v", err)
			}
		}
	}
}

// Validate checks a VM image record.
func (m *VMImage) Validate() error {
	var fe FieldErrors
	u, err := url.Parse(m.Source)
	switch {
	case m.Source == "":
		fe.add("source", "is required: an http://, https:// or file:// URL the coordinators can read")
	case err != nil:
		fe.add("source", "%v", err)
	case u.Scheme == "file" && (u.Path == "" || !strings.HasPrefix(u.Path, "/")):
		fe.add("source", "a file:// source names an absolute path on the coordinators' hosts, got %q", m.Source)
	case u.Scheme != "http" && u.Scheme != "https" && u.Scheme != "file":
		fe.add("source", "must be an http://, https:// or file:// URL, got %q", m.Source)
	}
	switch m.Format {
	case "", "raw", "qcow2":
	default:
		fe.add("format", "must be raw or qcow2 (or empty: found out from the file), got %q", m.Format)
	}
	if err := ValidateName(m.Pool); err != nil {
		fe.add("pool", "%v", err)
	}
	if m.SHA256 != "" && !sha256RE.MatchString(m.SHA256) {
		fe.add("sha256", "must be 64 lower-case hex digits")
	}
	return fe.err()
}

var sha256RE = regexp.MustCompile(`^[0-9a-f]{64}$`)
