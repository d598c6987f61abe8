package tftp

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/herdhq/herd/lib/keys"
)

// FuzzParsePath: no requested name, however odd, leads out of the served directory.
func FuzzParsePath(f *testing.F) {
	for _, s := range []string{"undionly.kpxe", "/ipxe.efi", "525400aabb01/undionly.kpxe", "../etc/passwd",
		"525400aabb01/../../x", "a/b/c", "..", ".", "/", "525400AABB01/snp.efi", "x\x00y", "%2e%2e/x"} {
		f.Add(s)
	}
	dir := "/srv/ipxe"
	f.Fuzz(func(t *testing.T, p string) {
		mac, name, err := ParsePath(p)
		if err != nil {
			return
		}
		full := filepath.Join(dir, name)
		rel, rerr := filepath.Rel(dir, full)
		if rerr != nil || strings.HasPrefix(rel, "..") || strings.ContainsRune(rel, filepath.Separator) || rel == "." {
			t.Fatalf("ParsePath(%q) = %q: serves %s, outside %s", p, name, full, dir)
		}
		if mac != "" {
			if m, err := keys.NormalizeMAC(mac); err != nil || m != mac {
				t.Fatalf("ParsePath(%q) mac %q", p, mac)
			}
		}
	})
}
