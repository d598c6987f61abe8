// Package tftp serves the iPXE binaries, and nothing else, over TFTP (blksize, tsize, timeout and
// windowsize negotiated; see server.go). Bigger files go over HTTP once iPXE runs.
//
// A file may be asked for as "<mac>/<file>" (12 hex digits): the bootserver hands out such names when
// it wants a machine to chainload its own iPXE, and remembers that the machine did, so that the iPXE
// then asking again gets the boot script instead of the same binary in a loop.
package tftp

import (
	"fmt"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/herdhq/herd/lib/keys"
)

var (
	nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
	macRE  = regexp.MustCompile(`^[0-9a-f]{12}$`)
)

// ParsePath splits a requested file name into the optional MAC prefix and the file, refusing
// anything that is not a plain file name (no directories, no "..").
func ParsePath(p string) (mac, name string, err error) {
	p = strings.TrimPrefix(p, "/")
	if dir, file, ok := strings.Cut(p, "/"); ok {
		if !macRE.MatchString(strings.ToLower(dir)) {
			return "", "", fmt.Errorf("bad path %q", p)
		}
		m, _ := keys.NormalizeHWID(dir)
		mac, p = m, file
	}
	if !nameRE.MatchString(p) || strings.Contains(p, "..") {
		return "", "", fmt.Errorf("bad file name %q", p)
	}
	return mac, p, nil
}

// MACPath is the per-machine name of file for mac (as ParsePath reads it).
func MACPath(mac, file string) string {
	return strings.ReplaceAll(mac, ":", "") + "/" + file
}

// Fetched remembers which machines recently loaded the bootserver's iPXE over TFTP.
type Fetched struct {
	TTL time.Duration
	mu  sync.Mutex
	at  map[string]time.Time
}

// NewFetched remembers fetches for ttl.
func NewFetched(ttl time.Duration) *Fetched { return &Fetched{TTL: ttl, at: map[string]time.Time{}} }

// Mark records that mac loaded the binary now.
func (f *Fetched) Mark(mac string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := time.Now()
	for k, t := range f.at { // keep the map small without a janitor
		if now.Sub(t) > f.TTL {
			delete(f.at, k)
		}
	}
	f.at[mac] = now
}

// Recent reports whether mac loaded the binary within the TTL.
func (f *Fetched) Recent(mac string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	t, ok := f.at[mac]
	return ok && time.Since(t) <= f.TTL
}
