package httpboot

import (
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/herdhq/herd/bootserver/ipxe"
)

// FuzzParseMachine: any query iPXE (or anyone) sends is refused or parsed into a machine whose
// retry script has exactly the lines herd writes: a query cannot add iPXE commands.
func FuzzParseMachine(f *testing.F) {
	for _, s := range []string{
		"mac=52-54-00-aa-bb-01&uuid=0000&serial=SVC123&arch=x86_64",
		"mac=52:54:00:aa:bb:01", "mac=zz", "", "mac=52-54-00-aa-bb-01&serial=%0Ashell",
		"mac=52-54-00-aa-bb-01&serial=a%20b&arch=arm64&arch=x", "mac=%ff%fe", "serial=x&mac=525400aabb01",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		q, err := url.ParseQuery(raw)
		if err != nil {
			return
		}
		m, err := ParseMachine(q, "10.0.0.9")
		if err != nil {
			return
		}
		if len(m.MAC) != 17 {
			t.Fatalf("mac %q", m.MAC)
		}
		script := ipxe.Wait("http://10.99.0.1:8080", m.query(), "waiting", time.Second)
		lines := strings.Split(strings.TrimSuffix(script, "\n"), "\n")
		if len(lines) != 4 || !strings.HasPrefix(lines[3], "chain http://10.99.0.1:8080/ipxe?") {
			t.Fatalf("query %q made the script:\n%s", raw, script)
		}
		// The machine's own query survives the round trip (else it would retry as someone else).
		if !strings.Contains(lines[3], "mac="+strings.ReplaceAll(m.MAC, ":", "-")) {
			t.Fatalf("retry lost the mac: %s", lines[3])
		}
	})
}

// FuzzParseReport: what a /report query makes the boot server log is a known problem, a MAC, a
// version safe to print and two bounded numbers, or nothing at all.
func FuzzParseReport(f *testing.F) {
	for _, s := range []string{
		"mac=52-54-00-aa-bb-01&problem=memory&image=v1&have_mib=512&need_mib=1226",
		"mac=52:54:00:aa:bb:01&problem=memory&image=v1%0Aevil&have_mib=1&need_mib=2",
		"mac=52:54:00:aa:bb:01&problem=memory&image=v1&have_mib=99999999999&need_mib=2", "", "problem=memory",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		q, err := url.ParseQuery(raw)
		if err != nil {
			return
		}
		r, err := ParseReport(q)
		if err != nil {
			return
		}
		if len(r.MAC) != 17 || reportProblems[r.Problem] == "" || r.Image == "" || !ipxe.Safe(r.Image) ||
			r.HaveMiB < 0 || r.NeedMiB < 0 || r.HaveMiB > 1<<32 || r.NeedMiB > 1<<32 {
			t.Fatalf("query %q accepted as %+v", raw, r)
		}
	})
}
