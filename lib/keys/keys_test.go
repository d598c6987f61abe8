package keys

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestUnknownFieldsSurviveRoundTrip(t *testing.T) {
	in := `{"v":1,"vcpus":2,"memory_mib":512,"future_thing":{"a":[1,2]},"disk":{"pool":"default","size_gib":3,"iops":900},"zz":"last"}`
	spec, err := Decode[VMSpec]([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	spec.VCPUs = 4 // a rewrite by an older herd changes a known field
	out, err := Encode(spec)
	if err != nil {
		t.Fatal(err)
	}
	var got, want map[string]any
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatal(err)
	}
	_ = json.Unmarshal([]byte(strings.Replace(in, `"vcpus":2`, `"vcpus":4`, 1)), &want)
	gb, _ := json.Marshal(got)
	wb, _ := json.Marshal(want)
	if string(gb) != string(wb) {
		t.Fatalf("round trip lost or changed members:\n got %s\nwant %s", gb, wb)
	}
}

func TestUnknownMembersInsideAssignmentSpec(t *testing.T) {
	a := Assignment{UID: 7, Epoch: 1, Spec: &VMSpec{VCPUs: 1, MemoryMiB: 64, Extra: Extra{"gpu": json.RawMessage(`"a100"`)}}}
	b := MustEncode(&a)
	back, err := Decode[Assignment]([]byte(b))
	if err != nil {
		t.Fatal(err)
	}
	if string(back.Spec.Extra["gpu"]) != `"a100"` {
		t.Fatalf("nested unknown member lost: %s", b)
	}
}

func TestCaseMismatchIsUnknownNotAlias(t *testing.T) {
	spec, err := Decode[VMSpec]([]byte(`{"vcpus":1,"Memory_MiB":512}`))
	if err != nil {
		t.Fatal(err)
	}
	if spec.MemoryMiB != 0 {
		t.Fatalf("Memory_MiB must not fill memory_mib")
	}
	if _, ok := spec.Extra["Memory_MiB"]; !ok {
		t.Fatalf("Memory_MiB must be kept as unknown")
	}
	if err := spec.Validate(nil); err == nil || !strings.Contains(err.Error(), "memory_mib") {
		t.Fatalf("validation must name memory_mib, got %v", err)
	}
}

func TestDecodeErrors(t *testing.T) {
	cases := []struct {
		in   string
		want string
	}{
		{`{"vcpus":`, "invalid JSON"},
		{`null`, "null"},
		{`[1]`, "invalid JSON"},
		{`{"vcpus":"two"}`, "vcpus: must be an integer"},
		{`{"disk":{"size_gib":"x"}}`, "disk.size_gib: must be an integer"},
		{`{"v":2,"vcpus":1}`, "newer herd"},
		{`{"v":-1}`, "v: must be a positive"},
	}
	for _, c := range cases {
		_, err := Decode[VMSpec]([]byte(c.in))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Decode(%s) = %v, want error containing %q", c.in, err, c.want)
		}
	}
	_, err := Decode[VMSpec]([]byte(`{"v":9}`))
	if !errors.Is(err, ErrNewerVersion) {
		t.Errorf("want ErrNewerVersion, got %v", err)
	}
}

func TestMissingVersionReadsAsCurrent(t *testing.T) {
	spec, err := Decode[VMSpec]([]byte(`{"vcpus":1,"memory_mib":5}`))
	if err != nil || spec.V != CurrentVersion {
		t.Fatalf("got %+v, %v", spec, err)
	}
	if !strings.Contains(MustEncode(spec), `"v":1`) {
		t.Fatal("encode must stamp the version")
	}
}

// TestDiskNames: a spec in the old one-disk form reads as disks [root]; each disk's storage name
// parses back to its VM, uid and disk, and a VM image's or a stranger's does not.
func TestDiskNames(t *testing.T) {
	old := VMSpec{Disk: &Disk{Pool: "p", SizeGiB: 3}}
	if l := old.DiskList(); len(l) != 1 || l[0].Name != RootDisk || l[0].SizeGiB != 3 {
		t.Fatalf("%+v", l)
	}
	for _, c := range []struct {
		vm   string
		uid  int64
		disk string
	}{{"web", 7, "root"}, {"web", 7, "data"}, {"a.b", 12, "root"}, {"a.b", 12, "logs-2"}, {"x.5", 9, "root"}} {
		name := DiskImage(c.vm, c.uid, c.disk)
		vm, uid, disk, ok := ParseDiskImage(name)
		if !ok || vm != c.vm || uid != c.uid || disk != c.disk {
			t.Errorf("%s parsed as %q %d %q %v", name, vm, uid, disk, ok)
		}
	}
	for _, name := range []string{ImageVolume("debian-12", 4), "web", "web.x", "web.0", ".5", "Web.5", "web.5.Data"} {
		if vm, uid, disk, ok := ParseDiskImage(name); ok {
			t.Errorf("%s parsed as %q %d %q", name, vm, uid, disk)
		}
	}
}

func TestSpecValidation(t *testing.T) {
	pools := []string{"default"}
	good := VMSpec{VCPUs: 1, MemoryMiB: 512, Disk: &Disk{Pool: "default", SizeGiB: 10}}
	if err := good.Validate(pools); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		mut  func(*VMSpec)
		want string
	}{
		{func(s *VMSpec) { s.MemoryMiB = 0 }, "memory_mib: must be between 1"},
		{func(s *VMSpec) { s.VCPUs = 0 }, "vcpus: must be between"},
		{func(s *VMSpec) { s.Disk.Pool = "fast" }, `disk.pool: unknown pool "fast" (this cluster has: default)`},
		{func(s *VMSpec) { s.Disk.SizeGiB = 0 }, "disk.size_gib"},
		{func(s *VMSpec) { s.Power = "on" }, "power: must be"},
		{func(s *VMSpec) { s.NodeSelector = map[string]string{"rack": "a b"} }, "node_selector.rack"},
		{func(s *VMSpec) { s.AntiAffinity = "Web Tier" }, "anti_affinity"},
		{func(s *VMSpec) { s.Networks = []Network{{}} }, "networks[0]: needs a network"},
		{func(s *VMSpec) { s.Networks = []Network{{Network: "prod", Bridge: "br0"}} }, "names both network"},
		{func(s *VMSpec) { s.Networks = []Network{{Bridge: "br0", Address: "10.0.0.1"}} }, "only a NIC on a herd network has an address"},
		{func(s *VMSpec) { s.Networks = []Network{{Network: "prod", Address: "10.0.0.1/24"}} }, "no prefix length"},
		{func(s *VMSpec) {
			s.Networks = []Network{{Network: "prod", Address: "10.0.0.5"}, {Network: "prod", Address: "10.0.0.5"}}
		}, "networks[1].address: 10.0.0.5 on prod is networks[0]'s already"},
		{func(s *VMSpec) { s.SSHKeys = []string{"AAAA me@x"} }, "ssh_keys[0]: is not a public key"},
		{func(s *VMSpec) { s.SSHKeys = []string{"ssh-ed25519 AAAA\nssh-rsa BBBB"} }, "must be one line"},
		{func(s *VMSpec) { s.UserData = "runcmd: []" }, "user_data: must start with #cloud-config"},
		{func(s *VMSpec) { s.UserData = "#cloud-config\n" + strings.Repeat("x", MaxUserData) }, "user_data: is"},
		{func(s *VMSpec) { s.Disks = []Disk{{Pool: "default", SizeGiB: 1}} }, "disks or the old disk, not both"},
		{func(s *VMSpec) {
			s.Disk, s.Disks = nil, []Disk{{Pool: "default", SizeGiB: 1}, {Pool: "default", SizeGiB: 1}}
		}, "disks[1].name: is required for every disk but the first"},
		{func(s *VMSpec) {
			s.Disk, s.Disks = nil, []Disk{{Pool: "default", SizeGiB: 1}, {Name: "root", Pool: "default", SizeGiB: 1}}
		}, `disks[1].name: "root" names two disks`},
		{func(s *VMSpec) { s.Disk, s.Disks = nil, []Disk{{Name: "9lives", Pool: "default", SizeGiB: 1}} }, "disks[0].name"},
		{func(s *VMSpec) { s.Disk.Image, s.Disk.From = "deb", "rbd/x@y" }, "disk.image: clone an image or a source"},
		{func(s *VMSpec) { s.Disk.Image = "Debian 12" }, "disk.image"},
	}
	for _, c := range cases {
		s := good
		d := *good.Disk
		s.Disk = &d
		c.mut(&s)
		err := s.Validate(pools)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("got %v, want %q", err, c.want)
		}
	}
	// Several problems are reported together.
	bad := VMSpec{}
	var fe FieldErrors
	if !errors.As(bad.Validate(nil), &fe) || len(fe) != 2 {
		t.Fatalf("want two field errors, got %v", fe)
	}
}

func TestNames(t *testing.T) {
	for _, ok := range []string{"web1", "a", "db-1.eu", "0x"} {
		if err := ValidateName(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "a/b", "Web", "-a", "a-", strings.Repeat("a", 64), "a b", "a_b"} {
		if err := ValidateName(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestHWID(t *testing.T) {
	cases := map[string]string{
		"52:54:00:AB:cd:01": "52:54:00:ab:cd:01",
		"52-54-00-ab-cd-01": "52:54:00:ab:cd:01",
		"525400abcd01":      "52:54:00:ab:cd:01",
		"5254.00ab.cd01":    "52:54:00:ab:cd:01",
		"ABC1234":           "ABC1234",
	}
	for in, want := range cases {
		got, err := NormalizeHWID(in)
		if err != nil || got != want {
			t.Errorf("NormalizeHWID(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "a/b", "x y", "../etc"} {
		if _, err := NormalizeHWID(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	h := Hardware{MAC: "52:54:00:AB:CD:01"}
	if err := h.Validate("52:54:00:ab:cd:01"); err == nil || !strings.Contains(err.Error(), "mac:") {
		t.Errorf("upper-case mac accepted: %v", err)
	}
}

func TestKeys(t *testing.T) {
	s := MustSpace("/herd")
	if got := s.VMSpec("web1"); got != "/herd/vms/web1/spec" {
		t.Fatal(got)
	}
	for key, want := range map[string]struct {
		name string
		part VMPart
		ok   bool
	}{
		"/herd/vms/web1/spec":      {"web1", VMPartSpec, true},
		"/herd/vms/web1/migrate":   {"web1", VMPartMigrate, true},
		"/herd/vms/web1/placement": {"web1", VMPartUnknown, false},
		"/herd/vms/a/b/spec":       {"a/b", VMPartSpec, true},
		"/herd/vms/web1/other":     {"web1", VMPartUnknown, false},
		"/herd/vms/web1":           {"", VMPartUnknown, false},
		"/herdx/vms/web1/spec":     {"", VMPartUnknown, false},
	} {
		name, part, ok := s.ParseVM(key)
		if name != want.name || part != want.part || ok != want.ok {
			t.Errorf("ParseVM(%q) = %q %v %v", key, name, part, ok)
		}
	}
	hw, vm, ok := ParseNodeScoped(s.AssignRoot(), s.Assign("52:54:00:00:00:01", "web1"))
	if !ok || hw != "52:54:00:00:00:01" || vm != "web1" {
		t.Fatal(hw, vm, ok)
	}
	if leaf, ok := ParseLeaf(s.NodePrefix(), "/herd/nodes/x/y"); ok {
		t.Fatal(leaf)
	}
	t1 := time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC)
	if a, b := s.Event(EventsByCoordinator, t1, "a"), s.Event(EventsByCoordinator, t1.Add(time.Nanosecond), "a"); a >= b {
		t.Fatalf("event keys must sort by time: %s %s", a, b)
	}
	for _, w := range []EventWriter{EventsByCoordinator, EventsByOperator, EventsByBootserver, EventsByNode("52:54:00:00:00:01")} {
		key := s.Event(w, t1, "ab12")
		got, at, ok := s.ParseEvent(key)
		if !ok || got != w || !at.Equal(t1) {
			t.Errorf("ParseEvent(%q) = %q %v %v", key, got, at, ok)
		}
	}
	for _, bad := range []string{"/herd/events/20260102T030405.000000006Z-ab12", "/herd/events/someone/20260102T030405.000000006Z-ab12",
		"/herd/events/node/a/b/20260102T030405.000000006Z-x", "/herd/events/coordinator/notatime-x", "/herd/events/node//20260102T030405.000000006Z-x"} {
		if w, _, ok := s.ParseEvent(bad); ok {
			t.Errorf("ParseEvent(%q) accepted as %q", bad, w)
		}
	}
	for _, bad := range []string{"", "herd", "/", "/herd/"} {
		if _, err := NewSpace(bad); err == nil {
			t.Errorf("prefix %q accepted", bad)
		}
	}
}
