package volume

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/herdhq/herd/lib/keys"
)

// Dir keeps disks as sparse raw files under Root/<pool>/<vm>.<uid>.raw. With Root on a shared
// filesystem every node sees every disk; `herd dev` points all its agents at one directory, which
// makes the simulated nodes as anonymous as real ones on Ceph.
type Dir struct {
	Root string
}

const dirSuffix = ".raw"

func (d Dir) path(v Volume) (string, error) {
	if err := keys.ValidateName(v.Pool); err != nil {
		return "", fmt.Errorf("volume pool: %w", err)
	}
	if err := keys.ValidateName(v.VM); err != nil {
		return "", fmt.Errorf("volume vm: %w", err)
	}
	return filepath.Join(d.Root, v.Pool, v.ID()+dirSuffix), nil
}

// Ensure implements Backend.
func (d Dir) Ensure(ctx context.Context, v Volume) (Attachment, error) {
	p, err := d.path(v)
	if err != nil {
		return Attachment{}, err
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return Attachment{}, fmt.Errorf("volume %s: %w", v.ID(), err)
	}
	if v.From != "" {
		if err := d.clone(ctx, v.From, p); err != nil {
			return Attachment{}, fmt.Errorf("volume %s: %w", v.ID(), err)
		}
	}
	want := v.SizeGiB << 30
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return Attachment{}, fmt.Errorf("volume %s: %w", v.ID(), err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return Attachment{}, fmt.Errorf("volume %s: %w", v.ID(), err)
	}
	switch {
	case st.Size() > want:
		return Attachment{}, fmt.Errorf("volume %s is %d GiB, spec asks %d GiB: %w", v.ID(), st.Size()>>30, v.SizeGiB, ErrShrink)
	case st.Size() < want:
		// Truncate to a larger size makes a sparse file: no blocks are written.
		if err := f.Truncate(want); err != nil {
			return Attachment{}, fmt.Errorf("volume %s: grow to %d GiB: %w", v.ID(), v.SizeGiB, err)
		}
	}
	return Attachment{Kind: "file", Path: p}, nil
}

// clone makes the disk at p a copy of the image from names (pool/image@herd), unless p exists.
// A directory has no copy-on-write: the copy is whole (sparse), made aside and renamed, so a
// crash never leaves a half copy where a disk should be.
func (d Dir) clone(ctx context.Context, from, p string) error {
	if _, err := os.Stat(p); err == nil {
		return nil
	}
	pool, image, snap, err := ParseFrom(from)
	if err != nil {
		return err
	}
	if snap != ImageSnapshot {
		return fmt.Errorf("clone %s: a directory image has only the snapshot %q", from, ImageSnapshot)
	}
	if keys.ValidateName(pool) != nil || strings.ContainsAny(image, "/\\") || image == "." || image == ".." {
		return fmt.Errorf("clone %s: not an image of this directory", from)
	}
	src, err := os.Open(filepath.Join(d.Root, pool, image+dirSuffix))
	if err != nil {
		return fmt.Errorf("clone %s: %w", from, err)
	}
	defer src.Close()
	st, err := src.Stat()
	if err != nil {
		return err
	}
	return writeWhole(ctx, p, src, st.Size(), nil)
}

// writeWhole writes size bytes of src to p through a temporary file renamed into place.
func writeWhole(ctx context.Context, p string, src io.ReaderAt, size int64, progress func(int64)) error {
	tmp := p + ".part"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer os.Remove(tmp) // after the rename: nothing
	err = CopySparse(ctx, f, src, size, progress)
	if err == nil {
		err = f.Truncate(size)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return os.Rename(tmp, p)
}

// ImportImage implements Images: the image is a file Root/<pool>/<id>.raw, cloned by copying.
func (d Dir) ImportImage(ctx context.Context, pool, id string, src io.ReaderAt, size int64, progress func(int64)) (string, error) {
	if err := keys.ValidateName(pool); err != nil {
		return "", fmt.Errorf("image pool: %w", err)
	}
	dir := filepath.Join(d.Root, pool)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	from := pool + "/" + id + "@" + ImageSnapshot
	p := filepath.Join(dir, id+dirSuffix)
	if st, err := os.Stat(p); err == nil && st.Size() == size {
		return from, nil // stored whole before: written through a rename
	}
	if err := writeWhole(ctx, p, src, size, progress); err != nil {
		return "", fmt.Errorf("import image %s/%s: %w", pool, id, err)
	}
	return from, nil
}

// DeleteImage implements Images. Clones are whole copies here, so nothing depends on the file.
func (d Dir) DeleteImage(ctx context.Context, pool, id string) error {
	if err := keys.ValidateName(pool); err != nil {
		return fmt.Errorf("image pool: %w", err)
	}
	err := os.Remove(filepath.Join(d.Root, pool, id+dirSuffix))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// Attach implements Backend. A directory disk is created on first use by whichever side gets there
// first, so that `herd dev` and labs need no coordinator-side volume configuration.
func (d Dir) Attach(ctx context.Context, v Volume) (Attachment, error) { return d.Ensure(ctx, v) }

// Delete implements Backend.
func (d Dir) Delete(ctx context.Context, v Volume) error {
	p, err := d.path(v)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("volume %s: %w", v.ID(), err)
	}
	return nil
}

// List implements Backend.
func (d Dir) List(ctx context.Context) ([]Info, error) {
	pools, err := os.ReadDir(d.Root)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Info
	for _, p := range pools {
		if !p.IsDir() {
			continue
		}
		files, err := os.ReadDir(filepath.Join(d.Root, p.Name()))
		if err != nil {
			return nil, err
		}
		for _, f := range files {
			id, ok := strings.CutSuffix(f.Name(), dirSuffix)
			if !ok {
				continue
			}
			vm, uid, disk, ok := keys.ParseDiskImage(id)
			if !ok {
				continue // an image VMs clone, or not herd's
			}
			st, err := f.Info()
			if err != nil {
				continue
			}
			out = append(out, Info{Pool: p.Name(), ID: id, VM: vm, UID: uid, Disk: disk, SizeGiB: st.Size() >> 30})
		}
	}
	return out, nil
}
