// Package rbd keeps VM disks as Ceph RBD images (go-ceph): shared storage that makes every
// hypervisor able to run every VM. Images are named <vm>.<uid>, created with exclusive-lock, cloned
// copy-on-write from a golden snapshot when the spec says so, grown but never shrunk.
//
// Every Ceph call is bounded twice: by librados' own op timeouts (so the C call returns) and by the
// caller's context (so a reconcile loop never waits longer than it chose to).
package rbd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"

	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/volume"
)

// Config reaches a cluster as one cephx user.
type Config struct {
	ConfFile string // ceph.conf
	User     string // cephx id without "client."
	Keyring  string // optional; ceph.conf's keyring otherwise
	// Timeout bounds every Ceph operation. Default 10 s.
	Timeout time.Duration
	// Pools are listed by List; Ensure and Attach use the pool the volume names.
	Pools []string
}

// Backend is the rbd volume backend. Safe for concurrent use; it connects on first use and again
// after a failure.
type Backend struct {
	cfg  Config
	mu   sync.Mutex
	conn *rados.Conn
	mons []string
}

// New prepares a backend; it does not connect yet.
func New(cfg Config) (*Backend, error) {
	if cfg.ConfFile == "" || cfg.User == "" {
		return nil, errors.New("rbd: a ceph.conf and a cephx user are required")
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 10 * time.Second
	}
	return &Backend{cfg: cfg}, nil
}

// ErrTimeout marks a Ceph call that did not return in time.
var ErrTimeout = errors.New("rbd: ceph call timed out")

// call runs fn in a goroutine bounded by ctx and the configured timeout.
func (b *Backend) call(ctx context.Context, op string, fn func(*rados.Conn) error) error {
	ctx, cancel := context.WithTimeout(ctx, b.cfg.Timeout+2*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		conn, err := b.connect()
		if err != nil {
			done <- err
			return
		}
		done <- fn(conn)
	}()
	select {
	case err := <-done:
		if err != nil && isConnError(err) {
			b.reset()
			return fmt.Errorf("%s: %w (is the Ceph cluster of %s reachable?)", op, err, b.cfg.ConfFile)
		}
		return err
	case <-ctx.Done():
		b.reset()
		return fmt.Errorf("%s: %w (is the Ceph cluster reachable? %v)", op, ErrTimeout, ctx.Err())
	}
}

func isConnError(err error) bool {
	msg := err.Error()
	return errors.Is(err, rados.ErrNotConnected) || strings.Contains(msg, "ret=-110") || strings.Contains(msg, "timed out")
}

func (b *Backend) reset() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.conn != nil {
		go b.conn.Shutdown() // may block on a dead cluster; never in the caller's path
		b.conn = nil
	}
}

func (b *Backend) connect() (*rados.Conn, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.conn != nil {
		return b.conn, nil
	}
	conn, err := rados.NewConnWithUser(b.cfg.User)
	if err != nil {
		return nil, fmt.Errorf("rbd: %w", err)
	}
	if err := conn.ReadConfigFile(b.cfg.ConfFile); err != nil {
		return nil, fmt.Errorf("rbd: read %s: %w", b.cfg.ConfFile, err)
	}
	secs := strconv.Itoa(int(b.cfg.Timeout / time.Second))
	for k, v := range map[string]string{
		"rados_osd_op_timeout": secs, "rados_mon_op_timeout": secs, "client_mount_timeout": secs,
		"admin_socket": "", "log_file": "",
	} {
		if err := conn.SetConfigOption(k, v); err != nil {
			return nil, fmt.Errorf("rbd: set %s: %w", k, err)
		}
	}
	if b.cfg.Keyring != "" {
		if err := conn.SetConfigOption("keyring", b.cfg.Keyring); err != nil {
			return nil, fmt.Errorf("rbd: keyring: %w", err)
		}
	}
	if err := conn.Connect(); err != nil {
		return nil, fmt.Errorf("rbd: connect to the Ceph cluster of %s as client.%s: %w", b.cfg.ConfFile, b.cfg.User, err)
	}
	host, err := conn.GetConfigOption("mon_host")
	if err != nil {
		conn.Shutdown()
		return nil, fmt.Errorf("rbd: mon_host: %w", err)
	}
	b.mons = parseMonHost(host)
	b.conn = conn
	return conn, nil
}

var v1AddrRE = regexp.MustCompile(`v1:([0-9a-fA-F.:\[\]]+?):(\d+)`)

// parseMonHost turns mon_host ("[v2:10.0.0.1:3300,v1:10.0.0.1:6789] ..." or "10.0.0.1,10.0.0.2") into
// host:port pairs QEMU's rbd driver reaches (the v1 ports when given, else 6789).
func parseMonHost(s string) []string {
	var out []string
	if m := v1AddrRE.FindAllStringSubmatch(s, -1); len(m) > 0 {
		for _, x := range m {
			out = append(out, net.JoinHostPort(strings.Trim(x[1], "[]"), x[2]))
		}
		return out
	}
	for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' || r == ';' }) {
		f = strings.Trim(f, "[]")
		if _, _, err := net.SplitHostPort(f); err == nil {
			out = append(out, f)
		} else {
			out = append(out, net.JoinHostPort(f, "6789"))
		}
	}
	return out
}

// features: exclusive-lock lets librbd fence a dead writer's lock; object-map and fast-diff make
// resizes and deletes of sparse images cheap; layering for clones.
const features = rbd.FeatureLayering | rbd.FeatureExclusiveLock | rbd.FeatureObjectMap | rbd.FeatureFastDiff | rbd.FeatureDeepFlatten

// Ensure implements volume.Backend.
func (b *Backend) Ensure(ctx context.Context, v volume.Volume) (volume.Attachment, error) {
	name := v.ID()
	want := uint64(v.SizeGiB) << 30
	err := b.call(ctx, "ensure "+v.Pool+"/"+name, func(conn *rados.Conn) error {
		io, err := conn.OpenIOContext(v.Pool)
		if err != nil {
			return fmt.Errorf("pool %s: %w", v.Pool, err)
		}
		defer io.Destroy()
		img, err := rbd.OpenImage(io, name, rbd.NoSnapshot)
		if errors.Is(err, rbd.ErrNotFound) {
			if err := b.create(conn, io, v, name, want); err != nil {
				return err
			}
			img, err = rbd.OpenImage(io, name, rbd.NoSnapshot)
		}
		if err != nil {
			return fmt.Errorf("open image %s/%s: %w", v.Pool, name, err)
		}
		defer img.Close()
		size, err := img.GetSize()
		if err != nil {
			return err
		}
		switch {
		case size > want:
			return fmt.Errorf("image %s/%s is %d GiB, spec asks %d GiB: %w", v.Pool, name, size>>30, v.SizeGiB, volume.ErrShrink)
		case size < want:
			if err := img.Resize(want); err != nil {
				return fmt.Errorf("grow %s/%s to %d GiB: %w", v.Pool, name, v.SizeGiB, err)
			}
		}
		return nil
	})
	if err != nil {
		return volume.Attachment{}, err
	}
	return b.attachment(v), nil
}

func (b *Backend) create(conn *rados.Conn, io *rados.IOContext, v volume.Volume, name string, size uint64) error {
	opts := rbd.NewRbdImageOptions()
	defer opts.Destroy()
	if err := opts.SetUint64(rbd.ImageOptionFeatures, features); err != nil {
		return err
	}
	if v.From == "" {
		if err := rbd.CreateImage(io, name, size, opts); err != nil {
			return fmt.Errorf("create image %s/%s: %w", v.Pool, name, err)
		}
	} else {
		pool, parent, snap, err := volume.ParseFrom(v.From)
		if err != nil {
			return err
		}
		pio, err := conn.OpenIOContext(pool)
		if err != nil {
			return fmt.Errorf("clone source pool %s: %w", pool, err)
		}
		defer pio.Destroy()
		if err := rbd.CloneImage(pio, parent, snap, io, name, opts); err != nil {
			return fmt.Errorf("clone %s to %s/%s: %w", v.From, v.Pool, name, err)
		}
	}
	img, err := rbd.OpenImage(io, name, rbd.NoSnapshot)
	if err != nil {
		return err
	}
	defer img.Close()
	// The owner, for listings and for humans running `rbd info`.
	if err := img.SetMetadata("herd.vm", v.VM); err != nil {
		return err
	}
	return img.SetMetadata("herd.uid", strconv.FormatInt(v.UID, 10))
}

// Attach implements volume.Backend: the image must exist (the leader creates it).
func (b *Backend) Attach(ctx context.Context, v volume.Volume) (volume.Attachment, error) {
	name := v.ID()
	err := b.call(ctx, "attach "+v.Pool+"/"+name, func(conn *rados.Conn) error {
		io, err := conn.OpenIOContext(v.Pool)
		if err != nil {
			return fmt.Errorf("pool %s: %w", v.Pool, err)
		}
		defer io.Destroy()
		img, err := rbd.OpenImageReadOnly(io, name, rbd.NoSnapshot)
		if err != nil {
			return fmt.Errorf("image %s/%s: %w", v.Pool, name, err)
		}
		return img.Close()
	})
	if err != nil {
		return volume.Attachment{}, err
	}
	return b.attachment(v), nil
}

func (b *Backend) attachment(v volume.Volume) volume.Attachment {
	b.mu.Lock()
	defer b.mu.Unlock()
	return volume.Attachment{Kind: "rbd", Pool: v.Pool, Image: v.ID(), Monitors: append([]string(nil), b.mons...), User: b.cfg.User}
}

// Delete implements volume.Backend; a missing image is not an error.
func (b *Backend) Delete(ctx context.Context, v volume.Volume) error {
	name := v.ID()
	return b.call(ctx, "delete "+v.Pool+"/"+name, func(conn *rados.Conn) error {
		io, err := conn.OpenIOContext(v.Pool)
		if err != nil {
			return fmt.Errorf("pool %s: %w", v.Pool, err)
		}
		defer io.Destroy()
		if err := rbd.RemoveImage(io, name); err != nil && !errors.Is(err, rbd.ErrNotFound) {
			return fmt.Errorf("remove %s/%s (still open by a VM?): %w", v.Pool, name, err)
		}
		return nil
	})
}

// List implements volume.Backend: every image named like herd's in the configured pools.
func (b *Backend) List(ctx context.Context) ([]volume.Info, error) {
	var out []volume.Info
	err := b.call(ctx, "list", func(conn *rados.Conn) error {
		for _, pool := range b.cfg.Pools {
			io, err := conn.OpenIOContext(pool)
			if err != nil {
				return fmt.Errorf("pool %s: %w", pool, err)
			}
			names, err := rbd.GetImageNames(io)
			if err != nil {
				io.Destroy()
				return err
			}
			for _, n := range names {
				vm, uid, disk, ok := keys.ParseDiskImage(n)
				if !ok {
					continue // an image VMs clone, or not herd's
				}
				info := volume.Info{Pool: pool, ID: n, VM: vm, UID: uid, Disk: disk}
				if img, err := rbd.OpenImageReadOnly(io, n, rbd.NoSnapshot); err == nil {
					if size, err := img.GetSize(); err == nil {
						info.SizeGiB = int64(size >> 30)
					}
					img.Close()
				}
				out = append(out, info)
			}
			io.Destroy()
		}
		return nil
	})
	return out, err
}

// importBatch is how much of an image one bounded call writes: enough to amortise opening the
// image, little enough to finish well within the call's timeout.
const importBatch = 16 * volume.ChunkSize

// ImportImage implements volume.Images: a new image, written in batches of chunks (those of zeros
// skipped: the image stays thin), then snapshot "herd", protected so that clones can hang off it.
func (b *Backend) ImportImage(ctx context.Context, pool, id string, src io.ReaderAt, size int64, progress func(int64)) (string, error) {
	from := pool + "/" + id + "@" + volume.ImageSnapshot
	whole := false
	err := b.withIO(ctx, "prepare image "+pool+"/"+id, pool, func(ioc *rados.IOContext) error {
		img, err := rbd.OpenImage(ioc, id, rbd.NoSnapshot)
		if err == nil {
			whole, err = protectedSnap(img)
			img.Close()
			if err != nil || whole {
				return err
			}
			// Half written by an import that did not finish: start again.
			if err := rbd.RemoveImage(ioc, id); err != nil {
				return fmt.Errorf("remove the unfinished image %s/%s (still open?): %w", pool, id, err)
			}
		} else if !errors.Is(err, rbd.ErrNotFound) {
			return fmt.Errorf("open image %s/%s: %w", pool, id, err)
		}
		opts := rbd.NewRbdImageOptions()
		defer opts.Destroy()
		if err := opts.SetUint64(rbd.ImageOptionFeatures, features); err != nil {
			return err
		}
		if err := rbd.CreateImage(ioc, id, uint64(size), opts); err != nil {
			return fmt.Errorf("create image %s/%s: %w", pool, id, err)
		}
		return nil
	})
	if err != nil || whole {
		return from, err
	}
	for off := int64(0); off < size; off += importBatch {
		n := min(importBatch, size-off)
		err := b.withIO(ctx, fmt.Sprintf("write image %s/%s at %d", pool, id, off), pool, func(ioc *rados.IOContext) error {
			img, err := rbd.OpenImage(ioc, id, rbd.NoSnapshot)
			if err != nil {
				return err
			}
			defer img.Close()
			if err := volume.CopySparse(ctx, io.NewOffsetWriter(img, off), io.NewSectionReader(src, off, n), n, func(done int64) {
				if progress != nil {
					progress(off + done)
				}
			}); err != nil {
				return err
			}
			return img.Flush()
		})
		if err != nil {
			return "", err
		}
	}
	err = b.withIO(ctx, "snapshot image "+pool+"/"+id, pool, func(ioc *rados.IOContext) error {
		img, err := rbd.OpenImage(ioc, id, rbd.NoSnapshot)
		if err != nil {
			return err
		}
		defer img.Close()
		snap, err := img.CreateSnapshot(volume.ImageSnapshot)
		if err != nil && !errors.Is(err, rbd.ErrExist) {
			return fmt.Errorf("snapshot %s: %w", from, err)
		}
		if snap == nil {
			snap = img.GetSnapshot(volume.ImageSnapshot)
		}
		if ok, err := snap.IsProtected(); err == nil && ok {
			return nil
		}
		if err := snap.Protect(); err != nil {
			return fmt.Errorf("protect %s: %w", from, err)
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	return from, nil
}

// protectedSnap says whether img has herd's snapshot, protected: an import that finished.
func protectedSnap(img *rbd.Image) (bool, error) {
	snaps, err := img.GetSnapshotNames()
	if err != nil {
		return false, err
	}
	for _, s := range snaps {
		if s.Name == volume.ImageSnapshot {
			return img.GetSnapshot(s.Name).IsProtected()
		}
	}
	return false, nil
}

// DeleteImage implements volume.Images: unprotect (refused by Ceph while clones exist), remove
// the snapshot, remove the image.
func (b *Backend) DeleteImage(ctx context.Context, pool, id string) error {
	return b.withIO(ctx, "delete image "+pool+"/"+id, pool, func(ioc *rados.IOContext) error {
		img, err := rbd.OpenImage(ioc, id, rbd.NoSnapshot)
		if errors.Is(err, rbd.ErrNotFound) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("open image %s/%s: %w", pool, id, err)
		}
		snaps, err := img.GetSnapshotNames()
		if err != nil {
			img.Close()
			return err
		}
		for _, s := range snaps {
			snap := img.GetSnapshot(s.Name)
			if ok, _ := snap.IsProtected(); ok {
				if err := snap.Unprotect(); err != nil {
					img.Close()
					return fmt.Errorf("image %s/%s is still cloned by disks (delete them first): %w", pool, id, err)
				}
			}
			if err := snap.Remove(); err != nil {
				img.Close()
				return fmt.Errorf("remove snapshot %s/%s@%s: %w", pool, id, s.Name, err)
			}
		}
		img.Close()
		if err := rbd.RemoveImage(ioc, id); err != nil && !errors.Is(err, rbd.ErrNotFound) {
			return fmt.Errorf("remove image %s/%s: %w", pool, id, err)
		}
		return nil
	})
}

// withIO is call with an IO context on pool.
func (b *Backend) withIO(ctx context.Context, op, pool string, fn func(*rados.IOContext) error) error {
	return b.call(ctx, op, func(conn *rados.Conn) error {
		ioc, err := conn.OpenIOContext(pool)
		if err != nil {
			return fmt.Errorf("pool %s: %w", pool, err)
		}
		defer ioc.Destroy()
		return fn(ioc)
	})
}

// Close drops the connection.
func (b *Backend) Close() { b.reset() }
