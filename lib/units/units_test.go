package units

import "testing"

func TestParseIn(t *testing.T) {
	cases := []struct {
		in   string
		unit int64
		want int64
	}{
		{"512MiB", MiB, 512},
		{"512", MiB, 512},
		{"1GiB", MiB, 1024},
		{"1G", MiB, 1024},
		{"1.5GiB", MiB, 1536},
		{"2Gi", MiB, 2048},
		{"10GiB", GiB, 10},
		{"10", GiB, 10},
		{"1TiB", GiB, 1024},
		{" 64 mib ", MiB, 64},
	}
	for _, c := range cases {
		got, err := ParseIn(c.in, c.unit)
		if err != nil || got != c.want {
			t.Errorf("ParseIn(%q) = %d, %v; want %d", c.in, got, err, c.want)
		}
	}
	for _, bad := range []string{"", "GiB", "1.2.3G", "5 parsecs", "1MB", "1.5MiB", "-1G"} {
		if _, err := ParseIn(bad, MiB); err == nil {
			t.Errorf("ParseIn(%q) accepted", bad)
		}
	}
}

func TestFormat(t *testing.T) {
	for in, want := range map[int64]string{512: "512MiB", 1024: "1GiB", 1536: "1.5GiB", 1 << 20: "1TiB", 0: "0B"} {
		if got := FormatMiB(in); got != want {
			t.Errorf("FormatMiB(%d) = %s, want %s", in, got, want)
		}
	}
}
