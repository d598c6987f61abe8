// Package units parses and prints the sizes operators type: 512MiB, 2GiB, 1.5G.
//
// Binary suffixes (Ki, Mi, Gi, Ti, with or without a trailing B) and the bare letters K, M, G, T mean
// powers of 1024, as in QEMU and libvirt; KB, MB, GB and TB mean powers of 1000. A bare number is in
// the unit the caller names (MiB for memory, GiB for disks).
package units

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

const (
	KiB int64 = 1 << 10
	MiB int64 = 1 << 20
	GiB int64 = 1 << 30
	TiB int64 = 1 << 40
)

var suffixes = map[string]float64{
	"b": 1,
	"k": float64(KiB), "ki": float64(KiB), "kib": float64(KiB),
	"m": float64(MiB), "mi": float64(MiB), "mib": float64(MiB),
	"g": float64(GiB), "gi": float64(GiB), "gib": float64(GiB),
	"t": float64(TiB), "ti": float64(TiB), "tib": float64(TiB),
	"kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
}

// ParseBytes parses s into bytes; a bare number is multiplied by bareUnit.
func ParseBytes(s string, bareUnit int64) (int64, error) {
	t := strings.TrimSpace(s)
	i := strings.IndexFunc(t, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	num, suffix := t, ""
	if i >= 0 {
		num, suffix = t[:i], strings.ToLower(strings.TrimSpace(t[i:]))
	}
	if num == "" {
		return 0, fmt.Errorf("size %q: want a number with an optional unit, e.g. 512MiB or 2GiB", s)
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: %q is not a number", s, num)
	}
	mult := float64(bareUnit)
	if suffix != "" {
		m, ok := suffixes[suffix]
		if !ok {
			return 0, fmt.Errorf("size %q: unknown unit %q (use B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB)", s, t[i:])
		}
		mult = m
	}
	v := f * mult
	if v > math.MaxInt64/2 {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	return int64(math.Round(v)), nil
}

// ParseIn parses s and expresses it as a whole number of unit (MiB, GiB); a size that is not a whole
// number of units is refused rather than silently rounded.
func ParseIn(s string, unit int64) (int64, error) {
	b, err := ParseBytes(s, unit)
	if err != nil {
		return 0, err
	}
	if b%unit != 0 {
		return 0, fmt.Errorf("size %q is not a whole number of %s", s, Name(unit))
	}
	return b / unit, nil
}

// Name is the suffix of a binary unit.
func Name(unit int64) string {
	switch unit {
	case KiB:
		return "KiB"
	case MiB:
		return "MiB"
	case GiB:
		return "GiB"
	case TiB:
		return "TiB"
	}
	return strconv.FormatInt(unit, 10) + " bytes"
}

// FormatMiB prints a MiB count the way an operator would write it: 512MiB, 2GiB, 1.5GiB.
func FormatMiB(mib int64) string {
	return FormatBytes(mib * MiB)
}

// FormatBytes prints bytes with the largest binary unit that keeps at most one decimal.
func FormatBytes(b int64) string {
	for _, u := range []int64{TiB, GiB, MiB, KiB} {
		if b >= u {
			v := float64(b) / float64(u)
			if b%u == 0 {
				return fmt.Sprintf("%d%s", b/u, Name(u))
			}
			return strconv.FormatFloat(math.Round(v*10)/10, 'f', -1, 64) + Name(u)
		}
	}
	return fmt.Sprintf("%dB", b)
}
