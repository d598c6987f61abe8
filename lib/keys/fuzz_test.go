package keys

import (
	"bytes"
	"encoding/json"
	"path"
	"reflect"
	"strings"
	"testing"
)

// roundTrip decodes data as T; whatever decodes must encode, decode again, and encode to the same
// bytes (so a value read and written back by herd never drifts), and validation must not panic.
type decodable interface {
	json.Marshaler
	json.Unmarshaler
	versioned
}

func roundTrip[T any, P interface {
	*T
	decodable
}](t *testing.T, data []byte, validate func(*T)) {
	v, err := Decode[T, P](data)
	if err != nil {
		return
	}
	if validate != nil {
		validate(v)
	}
	b1, err := Encode(P(v))
	if err != nil {
		t.Fatalf("%T decoded but does not encode: %v", v, err)
	}
	v2, err := Decode[T, P](b1)
	if err != nil {
		t.Fatalf("%T: own encoding %s does not decode: %v", v, b1, err)
	}
	b2, err := Encode(P(v2))
	if err != nil || !bytes.Equal(b1, b2) {
		t.Fatalf("%T: encoding drifts:\n%s\n%s (%v)", v, b1, b2, err)
	}
}

// FuzzDecode feeds the same bytes to the decoder of every keyspace value type: etcd holds whatever
// anyone with write access put there, so no value may crash a daemon that reads it.
func FuzzDecode(f *testing.F) {
	for _, s := range []string{
		`{"v":1,"vcpus":2,"memory_mib":1024,"disk":{"pool":"default","size_gib":10},"labels":{"a":"b"}}`,
		`{"node":"52:54:00:00:00:01","epoch":3,"uid":7,"spec_rev":9,"migration":{"to":"x","phase":"open"}}`,
		`{"mac":"52:54:00:00:00:01","labels":{"rack":"r1"},"storage_ip":"10.0.0.1","x":[1,2,{"y":null}]}`,
		`{"v":99}`, `{"v":-1}`, `[]`, `null`, `{"vcpus":"two"}`, `{"memory_mib":1e400}`, "{\"\xff\":1}",
		`{"hwid":"52:54:00:00:00:01","expires":"2026-01-01T00:00:00Z","issued_by":"bootserver/a"}`,
		`{"v":1,"vlan":120,"cidr":"10.20.0.0/30","gateway":"10.20.0.1","range_first":"10.20.0.2","range_last":"10.20.0.2"}`,
		`{"v":1,"cidr":"10.20.0.0/22","range_first":"10.20.3.1","range_last":"10.20.0.9","dns":["1.1.1.1"]}`,
		`{"v":1,"vcpus":1,"memory_mib":64,"disks":[{"pool":"p","size_gib":2,"image":"deb"},{"name":"data","pool":"p","size_gib":1}]}`,
		`{"v":1,"source":"file:///srv/a.qcow2","pool":"rbd","format":"qcow2","sha256":"00"}`,
		`{"v":1,"uid":5,"state":"importing","phase":"store","bytes":10,"total":0,"size_bytes":1073741825}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		roundTrip[Cluster](t, data, func(v *Cluster) { _ = v.Validate() })
		roundTrip[Hardware](t, data, func(v *Hardware) { _ = v.Validate("52:54:00:00:00:01") })
		roundTrip[Node](t, data, nil)
		roundTrip[NodeState](t, data, nil)
		roundTrip[VMSpec](t, data, func(v *VMSpec) {
			if v.Validate([]string{"default"}) == nil {
				// A valid spec's disks have names that make storage names parsing back to them.
				for _, d := range v.DiskList() {
					if _, uid, disk, ok := ParseDiskImage(DiskImage("vm", 7, d.Name)); !ok || uid != 7 || disk != d.Name {
						t.Fatalf("disk %q: storage name %s", d.Name, DiskImage("vm", 7, d.Name))
					}
				}
			}
			_ = v.WantsRunning()
		})
		roundTrip[Placement](t, data, nil)
		roundTrip[Assignment](t, data, nil)
		roundTrip[VMStatus](t, data, nil)
		roundTrip[Fence](t, data, nil)
		roundTrip[LossGuard](t, data, nil)
		roundTrip[Problem](t, data, nil)
		roundTrip[Event](t, data, nil)
		roundTrip[Discovered](t, data, nil)
		roundTrip[Image](t, data, func(v *Image) { _ = v.Validate() })
		roundTrip[ImageCurrent](t, data, nil)
		roundTrip[Bootserver](t, data, nil)
		roundTrip[DHCPLease](t, data, nil)
		roundTrip[VolumeRecord](t, data, nil)
		roundTrip[NetworkSpec](t, data, func(v *NetworkSpec) {
			if v.Validate() == nil {
				// A valid network has a range to allocate from, inside its CIDR.
				first, last := v.Range()
				if !v.Host(first) || !v.Host(last) || first.Compare(last) > 0 {
					t.Fatalf("valid network %+v has range %s-%s", v, first, last)
				}
			}
		})
		roundTrip[AddressClaim](t, data, nil)
		roundTrip[VMImage](t, data, func(v *VMImage) { _ = v.Validate() })
		roundTrip[VMImageStatus](t, data, func(v *VMImageStatus) { _, _ = v.Progress(), v.MinDiskGiB() })
		roundTrip[JoinToken](t, data, nil)
		roundTrip[Rollout](t, data, func(v *Rollout) { _ = v.Validate() })
		roundTrip[NodeCommand](t, data, nil)
		roundTrip[NodeSpec](t, data, nil)
		roundTrip[RolloutStatus](t, data, nil)
		roundTrip[Request](t, data, nil)
	})
}

// FuzzHWID: whatever NormalizeHWID accepts is a fixed point and safe as one path segment of a key.
func FuzzHWID(f *testing.F) {
	for _, s := range []string{"52:54:00:00:00:01", "52-54-00-AA-BB-01", "525400aabb01", "7XK2QF2", "../x", "a/b", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := NormalizeHWID(s)
		if err != nil {
			return
		}
		again, err := NormalizeHWID(id)
		if err != nil || again != id {
			t.Fatalf("NormalizeHWID(%q) = %q, then %q, %v", s, id, again, err)
		}
		for _, c := range id {
			if c == '/' || c < 0x21 || c > 0x7e {
				t.Fatalf("hwid %q has %q", id, c)
			}
		}
		if id == "." || id == ".." {
			t.Fatalf("hwid %q", id)
		}
	})
}

// FuzzBootPath: whatever ValidateBootPath accepts is absolute, already clean (no "..", no "//"),
// free of control characters, and InDir never lets such a path out of a directory by a prefix
// trick (/var/lib/herd/bootX is not inside /var/lib/herd/boot).
func FuzzBootPath(f *testing.F) {
	for _, s := range []string{"/var/lib/herd/boot/vmlinuz", "/run/herd/credentials/node.key", "/var/lib/herd/boot/../../../etc/shadow",
		"/var/lib/herd/boot//vmlinuz", "/var/lib/herd/boot/", "/var/lib/herd/bootX/vmlinuz", "relative/vmlinuz", "/var/lib/herd/boot/a\x00b",
		"/var/lib/herd/boot/\x1b[2J", "/var/lib/herd/boot/.", "/", "/proc/self/root/etc/shadow", "/var/lib/herd/boot/\u202ekernel"} {
		f.Add(s)
	}
	const dir = "/var/lib/herd/boot"
	f.Fuzz(func(t *testing.T, p string) {
		if ValidateBootPath(p) != nil {
			return
		}
		if !strings.HasPrefix(p, "/") || path.Clean(p) != p {
			t.Fatalf("accepted %q, which is not absolute and clean", p)
		}
		for _, r := range p {
			if r < 0x20 || r == 0x7f {
				t.Fatalf("accepted %q with a control character", p)
			}
		}
		if InDir(p, dir) && !strings.HasPrefix(p, dir+"/") {
			t.Fatalf("%q counted inside %s", p, dir)
		}
		if InDir(p, dir) && strings.Contains(p, "/../") {
			t.Fatalf("%q escapes %s", p, dir)
		}
	})
}

// sameBothWays decodes data as T with the one-pass decode allowed and with the member-by-member one
// only: both must agree on success, value and unknown members.
func sameBothWays[T any, P interface {
	*T
	decodable
}](t *testing.T, data []byte) {
	defer func() { fastDecode = true }()
	fastDecode = true
	fast, ferr := Decode[T, P](data)
	fastDecode = false
	slow, serr := Decode[T, P](data)
	if (ferr == nil) != (serr == nil) || (ferr != nil && ferr.Error() != serr.Error()) {
		t.Fatalf("%T from %q: one pass %v, member by member %v", fast, data, ferr, serr)
	}
	if ferr == nil && !reflect.DeepEqual(fast, slow) {
		t.Fatalf("%T from %q:\none pass        %+v\nmember by member %+v", fast, data, fast, slow)
	}
}

// FuzzFastDecodeSame: the one-pass decode taken when every member is known means exactly what the
// member-by-member decode means, for every keyspace type.
func FuzzFastDecodeSame(f *testing.F) {
	for _, s := range []string{
		`{"v":1,"vcpus":2,"memory_mib":1024,"disk":{"pool":"default","size_gib":10},"labels":{"a":"b"}}`,
		`{"node":"52:54:00:00:00:01","epoch":3,"uid":7,"spec_rev":9,"migration":{"to":"x","phase":"open"}}`,
		`{"uid":1,"UID":2}`, `{"uid":1,"uid":2}`, `{"u\u0069d":3}`, `{"node":"a","node":"b"}`, `{"disk":{"pool":"a"},"disk":{"size_gib":1}}`,
		`{"uid":1} x`, `{"uid":"1"}`, `{"spec":{"vcpus":1,"x":2},"uid":4}`, ` {"epoch":1e3}`, `{"labels":{"a":"b","a":"c"}}`,
		`{"v":1,"uid":7,"epoch":2,"state":"running","since":"2026-12-03T00:00:00Z"}`, `{"since":"yesterday"}`, `{"since":null,"uid":null}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		sameBothWays[Node](t, data)
		sameBothWays[NodeState](t, data)
		sameBothWays[VMSpec](t, data)
		sameBothWays[Placement](t, data)
		sameBothWays[Assignment](t, data)
		sameBothWays[VMStatus](t, data)
		sameBothWays[Fence](t, data)
		sameBothWays[LossGuard](t, data)
		sameBothWays[Problem](t, data)
		sameBothWays[Hardware](t, data)
		sameBothWays[DHCPLease](t, data)
		sameBothWays[Request](t, data)
		sameBothWays[Rollout](t, data)
		sameBothWays[NodeSpec](t, data)
		sameBothWays[Cluster](t, data)
	})
}
