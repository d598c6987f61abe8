package etcdutil

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// Watermark keeps, in a small file, the newest etcd revision a daemon saw, with the herd cluster
// and the restore recovery generation it saw it in: evidence of etcd's past that outlives the
// daemon. A daemon that was restarted while etcd was restored from a backup has no cache to
// compare etcd's revision with; its watermark does (docs/architecture.md, "etcd restored from a
// backup"). A lost or unreadable file only loses that evidence, never blocks the daemon.
type Watermark struct {
	path string
	// every bounds how often the file is written: the revision is a lower bound of what the
	// daemon saw, so a few seconds of lag cost nothing.
	every time.Duration

	mu      sync.Mutex
	cur     Mark
	saved   Mark
	savedAt time.Time
	err     error // the last write's, reported once per change
}

// Mark is what a watermark holds.
type Mark struct {
	Cluster    string    `json:"cluster"`
	Generation int       `json:"restore_generation"`
	Revision   int64     `json:"revision"`
	Saved      time.Time `json:"saved"`
}

// OpenWatermark reads path if it exists. An empty path is a watermark that keeps nothing.
func OpenWatermark(path string) (*Watermark, error) {
	w := &Watermark{path: path, every: 5 * time.Second}
	if path == "" {
		return w, nil
	}
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return w, nil
	case err != nil:
		return w, fmt.Errorf("read revision watermark: %w", err)
	}
	if err := json.Unmarshal(b, &w.cur); err != nil {
		w.cur = Mark{}
		return w, fmt.Errorf("revision watermark %s is unreadable (ignored): %w", path, err)
	}
	w.saved = w.cur
	return w, nil
}

// Loaded is what the file said when it was opened (zero if nothing).
func (w *Watermark) Loaded() Mark {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.saved
}

// WentBack says whether etcd, answering at rev with cluster's record at restore generation gen,
// is behind what the watermark saw: the same herd cluster (a wiped etcd is a new one, handled
// apart) at an older revision and no restore recovery since, or at an older recovery generation.
func (m Mark) WentBack(cluster string, gen int, rev int64) bool {
	if m.Cluster == "" || m.Cluster != cluster {
		return false
	}
	return gen < m.Generation || (gen == m.Generation && rev < m.Revision)
}

// Note records that etcd answered at rev, with the cluster record at generation gen. Within one
// generation the watermark only rises; a higher generation (a restore recovery finished: the
// history starts over) replaces it. It writes the file at most every few seconds.
func (w *Watermark) Note(cluster string, gen int, rev int64) error {
	if cluster == "" || rev <= 0 {
		return nil
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	switch {
	case cluster != w.cur.Cluster || gen > w.cur.Generation:
		w.cur = Mark{Cluster: cluster, Generation: gen, Revision: rev}
	case gen == w.cur.Generation && rev > w.cur.Revision:
		w.cur.Revision = rev
	}
	if w.path == "" || w.cur == w.saved || time.Since(w.savedAt) < w.every {
		return nil
	}
	return w.flush()
}

// Flush writes what was noted since the last write (on a clean stop).
func (w *Watermark) Flush() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.path == "" || w.cur == w.saved {
		return nil
	}
	return w.flush()
}

// flush must hold w.mu. It reports a write error once, until a write succeeds again.
func (w *Watermark) flush() error {
	w.savedAt = time.Now()
	m := w.cur
	m.Saved = time.Now().UTC()
	err := writeFileAtomic(w.path, m)
	if err == nil {
		w.saved, w.err = w.cur, nil
		return nil
	}
	first := w.err == nil
	w.err = err
	if first {
		return fmt.Errorf("write revision watermark: %w", err)
	}
	return nil
}

func writeFileAtomic(path string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
