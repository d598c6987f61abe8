// Package volume owns VM disks on shared storage: the Backend interface and its implementations.
// A disk is named by the VM's uid, never by its name alone, so a VM deleted and created again under
// the same name never gets the old disk by accident.
package volume

import (
	"context"
	"errors"

	"github.com/herdhq/herd/lib/keys"
)

// Volume identifies one VM's disk and what it should look like.
type Volume struct {
	Pool    string
	VM      string
	UID     int64
	SizeGiB int64
	// From is a backend-specific source to clone, e.g. pool/image@snap for RBD.
	From string
}

// ID is the backend-independent name of the disk: the VM name for humans, the uid for uniqueness.
func (v Volume) ID() string { return keys.VolumeImage(v.VM, v.UID) }

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
