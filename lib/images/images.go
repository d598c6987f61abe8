// Package images serves hypervisor image files from a bootserver's image directory, laid out as
// <dir>/<version>/<file>. A version is served only after its files match the catalogue's sizes and
// sha256: a half-copied or corrupted image never reaches a node.
//
// A file is hashed again whenever it may have changed: its inode, size, modification time or
// change time differs from when it was hashed (the change time moves on any write or attribute
// change, also when someone restores the modification time), and at the latest every Reverify
// period, for what no stamp shows (storage that rots). A file served is the very file verified: it
// is opened, then its stamp compared with the verified one.
package images

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/herdhq/herd/lib/keys"
)

// OK is the verdict of a verified version.
const OK = "ok"

// Store verifies and locates image files. Safe for concurrent use.
type Store struct {
	Dir string

	mu    sync.Mutex
	cache map[string]verdict // version -> last verification
}

type stamp struct {
	dev, ino     uint64
	size         int64
	mtime, ctime time.Time
}

type verdict struct {
	result         string
	kernel, initrd stamp
	kSum, iSum     string
	hashed         time.Time
}

// NewStore serves dir.
func NewStore(dir string) *Store { return &Store{Dir: dir, cache: map[string]verdict{}} }

// ErrNotServed marks a version this bootserver cannot serve.
var ErrNotServed = errors.New("image not served here")

func (s *Store) path(version, name string) (string, error) {
	if err := keys.ValidateImageVersion(version); err != nil {
		return "", err
	}
	if name == "" || name == "." || name == ".." || filepath.Base(name) != name {
		return "", fmt.Errorf("bad image file name %q", name)
	}
	return filepath.Join(s.Dir, version, name), nil
}

func statOf(p string) (stamp, error) {
	st, err := os.Stat(p)
	if err != nil {
		return stamp{}, err
	}
	return stampOf(p, st)
}

func stampOf(p string, st os.FileInfo) (stamp, error) {
	if !st.Mode().IsRegular() {
		return stamp{}, fmt.Errorf("%s is not a regular file", p)
	}
	s := stamp{size: st.Size(), mtime: st.ModTime()}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		s.dev, s.ino = uint64(sys.Dev), sys.Ino
		s.ctime = time.Unix(sys.Ctim.Sec, sys.Ctim.Nsec)
	}
	return s, nil
}

// Check verifies version against its catalogue entry and returns OK or why it cannot be served.
// Hashing happens once per file change (see the package comment), not per request.
func (s *Store) Check(version string, im *keys.Image) string {
	return s.check(version, im, false)
}

// Reverify hashes again every version verified longer than maxAge ago (the caller's goroutine pays,
// not a node's request): what no file stamp shows is found within maxAge.
func (s *Store) Reverify(versions map[string]*keys.Image, maxAge time.Duration) {
	for version, im := range versions {
		s.mu.Lock()
		v, ok := s.cache[version]
		s.mu.Unlock()
		if ok && time.Since(v.hashed) > maxAge {
			s.check(version, im, true)
		}
	}
}

func (s *Store) check(version string, im *keys.Image, force bool) string {
	kp, err := s.path(version, im.Kernel.Name)
	if err != nil {
		return err.Error()
	}
	ip, err := s.path(version, im.Initrd.Name)
	if err != nil {
		return err.Error()
	}
	ks, kerr := statOf(kp)
	is, ierr := statOf(ip)
	if kerr != nil || ierr != nil {
		return fmt.Sprintf("missing files: %v", errors.Join(kerr, ierr))
	}
	s.mu.Lock()
	v, ok := s.cache[version]
	s.mu.Unlock()
	if force || !ok || v.kernel != ks || v.initrd != is || v.kSum != im.Kernel.SHA256 || v.iSum != im.Initrd.SHA256 {
		v = verdict{kernel: ks, initrd: is, kSum: im.Kernel.SHA256, iSum: im.Initrd.SHA256, result: OK, hashed: time.Now()}
		for _, f := range []struct {
			path string
			want keys.ImageFile
			st   stamp
		}{{kp, im.Kernel, ks}, {ip, im.Initrd, is}} {
			if f.st.size != f.want.Size {
				v.result = fmt.Sprintf("%s is %d bytes, catalogue says %d", f.want.Name, f.st.size, f.want.Size)
				break
			}
			sum, err := FileSHA256(f.path)
			if err != nil {
				v.result = err.Error()
				break
			}
			if sum != f.want.SHA256 {
				v.result = fmt.Sprintf("%s sha256 %s, catalogue says %s", f.want.Name, sum, f.want.SHA256)
				break
			}
		}
		// Hashing took a while: the verdict holds only for the files as they were before it.
		if ks2, err := statOf(kp); err != nil || ks2 != ks {
			v.result = "the kernel changed while it was verified; verified again at the next request"
			v.kernel = stamp{}
		}
		if is2, err := statOf(ip); err != nil || is2 != is {
			v.result = "the initrd changed while it was verified; verified again at the next request"
			v.initrd = stamp{}
		}
		s.mu.Lock()
		s.cache[version] = v
		s.mu.Unlock()
	}
	return v.result
}

// Open returns a verified file of version for serving. The caller closes it.
func (s *Store) Open(version, name string, im *keys.Image) (*os.File, error) {
	if name != im.Kernel.Name && name != im.Initrd.Name {
		return nil, fmt.Errorf("%w: %s is not a file of %s", ErrNotServed, name, version)
	}
	if r := s.Check(version, im); r != OK {
		return nil, fmt.Errorf("%w: %s: %s", ErrNotServed, version, r)
	}
	p, err := s.path(version, name)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	// The file opened must be the file verified (not one renamed over it since).
	st, err := f.Stat()
	if err == nil {
		var got stamp
		if got, err = stampOf(p, st); err == nil {
			s.mu.Lock()
			v := s.cache[version]
			s.mu.Unlock()
			want := v.kernel
			if name == im.Initrd.Name {
				want = v.initrd
			}
			if got != want {
				err = fmt.Errorf("%w: %s/%s changed since it was verified; verified again at the next request", ErrNotServed, version, name)
			}
		}
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// FileSHA256 hashes a file.
func FileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// Describe reads a local file into a catalogue entry (herdctl image add).
func Describe(path string) (keys.ImageFile, error) {
	st, err := os.Stat(path)
	if err != nil {
		return keys.ImageFile{}, err
	}
	sum, err := FileSHA256(path)
	if err != nil {
		return keys.ImageFile{}, err
	}
	return keys.ImageFile{Name: filepath.Base(path), Size: st.Size(), SHA256: sum}, nil
}
