package volume

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
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
	if v.From != "" {
		return Attachment{}, fmt.Errorf("volume %s: the dir backend cannot clone %q", v.ID(), v.From)
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return Attachment{}, fmt.Errorf("volume %s: %w", v.ID(), err)
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
			i := strings.LastIndexByte(id, '.')
			if i < 0 {
				continue
			}
			uid, err := strconv.ParseInt(id[i+1:], 10, 64)
			if err != nil {
				continue
			}
			st, err := f.Info()
			if err != nil {
				continue
			}
			out = append(out, Info{Pool: p.Name(), ID: id, VM: id[:i], UID: uid, SizeGiB: st.Size() >> 30})
		}
	}
	return out, nil
}
