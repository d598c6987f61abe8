package rig

import (
	"bytes"
	"fmt"
)

// Record is one "herd-rec <writer> <n>" sector of the split-brain guest's disk.
type Record struct {
	Sector int
	Writer string
	N      int
}

// Records reads them from the start of a disk.
func Records(disk []byte) []Record {
	var out []Record
	for s := 8; (s+1)*512 <= len(disk); s++ {
		line := string(bytes.TrimRight(disk[s*512:(s+1)*512], "\x00\n"))
		var r Record
		if _, err := fmt.Sscanf(line, "herd-rec %s %d", &r.Writer, &r.N); err != nil {
			continue
		}
		r.Sector = s
		out = append(out, r)
	}
	return out
}
