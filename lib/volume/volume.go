// Package volume owns VM disks on shared storage: the Backend interface and its implementations.
// A disk is named by the VM's uid, never by its name alone, so a VM deleted and created again under
// the same name never gets the old disk by accident.
package volume

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/herdhq/herd/lib/keys"
)

// Volume identifies one VM's disk and what it should look like.
type Volume struct {
	Pool    string
	VM      string
	UID     int64
	SizeGiB int64
	// Disk is the name of the VM's disk ("" or "root" for the first).
	Disk string
	// From is a backend-specific source to clone, e.g. pool/image@snap for RBD.
	From string
}

// ID is the backend-independent name of the disk: the VM name for humans, the uid for uniqueness,
// the disk's name for every disk but the root one (keys.DiskImage).
func (v Volume) ID() string { return keys.DiskImage(v.VM, v.UID, v.Disk) }

// Attachment tells the hypervisor how to reach a disk.
type Attachment struct {
	// Kind is "file" (a path on a shared filesystem) or "rbd" (a Ceph image).
	Kind string
	// Path is the file for Kind "file".
	Path string
	// Pool, Image, Monitors (host:port) and User (cephx id) reach an RBD image; the key is in a
	// libvirt secret of usage "ceph" that the agent defines once.
	Pool, Image string
	Monitors    []string
	User        string
}

// Info describes a disk that exists.
type Info struct {
	Pool    string
	ID      string
	VM      string
	UID     int64
	Disk    string
	SizeGiB int64
}

// ErrShrink refuses to make a disk smaller: the guest's filesystem would be cut.
var ErrShrink = errors.New("volume: refusing to shrink a disk")

// Backend is shared storage for VM disks. Implementations must be safe for concurrent use and
// idempotent: Ensure on an existing disk of the right size does nothing.
type Backend interface {
	// Ensure creates the disk if missing (cloning v.From if set) and grows it to v.SizeGiB if
	// smaller; it refuses to shrink (ErrShrink). The leader calls it before placing a VM.
	Ensure(ctx context.Context, v Volume) (Attachment, error)
	// Attach returns how to reach an existing disk; an agent calls it before defining a domain.
	// Backends whose disks the leader creates never create here.
	Attach(ctx context.Context, v Volume) (Attachment, error)
	// Delete removes the disk; a missing disk is not an error.
	Delete(ctx context.Context, v Volume) error
	// List returns every disk herd made in the pools the backend serves.
	List(ctx context.Context) ([]Info, error)
}

// Images is what a backend that VMs can clone images from does besides: it stores a raw file as
// image id of pool, frozen (a protected snapshot for RBD), and deletes it again.
type Images interface {
	// ImportImage stores the raw file src of size bytes and returns the clone source a disk's
	// From names. Idempotent: an image already stored whole is not written again; one left half
	// written (a crash, a lost term) is written anew. progress is called with the bytes done.
	ImportImage(ctx context.Context, pool, id string, src io.ReaderAt, size int64, progress func(done int64)) (from string, err error)
	// DeleteImage removes a stored image; it fails while disks still clone from it. A missing
	// image is not an error.
	DeleteImage(ctx context.Context, pool, id string) error
}

// ImageSnapshot is the snapshot an image's clones are made from.
const ImageSnapshot = "herd"

// ChunkSize is the unit of an image copy: RBD's default object size, so that a chunk that is all
// zeros is an object never written (images are sparse in storage as in their files).
const ChunkSize = 4 << 20

// CopySparse copies size bytes of src to dst in chunks, skipping chunks of zeros (dst reads zeros
// there already: a new file or image), calling progress after each chunk.
func CopySparse(ctx context.Context, dst io.WriterAt, src io.ReaderAt, size int64, progress func(done int64)) error {
	buf := make([]byte, ChunkSize)
	for off := int64(0); off < size; off += ChunkSize {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := int(min(ChunkSize, size-off))
		if got, err := src.ReadAt(buf[:n], off); err != nil && !(errors.Is(err, io.EOF) && got == n) {
			return fmt.Errorf("read at %d: %w", off, err)
		}
		if !allZero(buf[:n]) {
			if _, err := dst.WriteAt(buf[:n], off); err != nil {
				return fmt.Errorf("write at %d: %w", off, err)
			}
		}
		if progress != nil {
			progress(off + int64(n))
		}
	}
	return nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// ParseFrom reads a clone source: pool/image@snap.
func ParseFrom(from string) (pool, image, snap string, err error) {
	rest, snap, ok := strings.Cut(from, "@")
	if !ok || snap == "" {
		return "", "", "", fmt.Errorf("clone source %q: want pool/image@snapshot", from)
	}
	pool, image, ok = strings.Cut(rest, "/")
	if !ok || pool == "" || image == "" {
		return "", "", "", fmt.Errorf("clone source %q: want pool/image@snapshot", from)
	}
	return pool, image, snap, nil
}
