package keys

import "testing"

// BenchmarkDecodeAssignment: a whole assignment (as agents read it) and its head (as the leader
// reads every assignment every round).
func BenchmarkDecodeAssignment(b *testing.B) {
	a := Assignment{UID: 7, Epoch: 1, UUID: "6f1b8d4e-3c2a-4b5d-9e8f-0a1b2c3d4e5f", SpecRev: 9, Spec: &VMSpec{VCPUs: 1, MemoryMiB: 512, Disk: &Disk{Pool: "default", SizeGiB: 10}, Labels: map[string]string{"app": "web"}}}
	v := []byte(MustEncode(&a))
	for _, fast := range []bool{true, false} {
		name := "whole"
		if !fast {
			name = "whole-member-by-member"
		}
		b.Run(name, func(b *testing.B) {
			defer func() { fastDecode = true }()
			fastDecode = fast
			b.ReportAllocs()
			for range b.N {
				if _, err := Decode[Assignment](v); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run("head", func(b *testing.B) {
		b.ReportAllocs()
		for range b.N {
			if _, err := DecodeAssignmentHead(v); err != nil {
				b.Fatal(err)
			}
		}
	})
}
