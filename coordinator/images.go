package coordinator

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/herdhq/herd/coordinator/decide"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/volume"
)

// An import is side work that may take minutes: fetch the source into a temporary file (hashing
// it), convert a qcow2 to raw with qemu-img, store the raw file through the backend. Each step
// records its progress in the image's status under the guard, at most every progressEvery, so
// that herdctl can draw a bar and a new leader knows where things stood. A term that ends stops
// the import (its context); the next term starts it again: the backend stores idempotently.

const progressEvery = 2 * time.Second

// workPrefix names a replica's temporary import directories: each replica removes only its own
// leftovers (two replicas may share a host, and its work directory).
func workPrefix(replica string) string { return "herd-image-" + replica + "-" }

// sweepImportWork removes the temporary directories an import of this replica left when its
// process died (a term that ends removes its own).
func sweepImportWork(dir, replica string, log hclog.Logger) {
	if dir == "" {
		dir = os.TempDir()
	}
	old, _ := filepath.Glob(filepath.Join(dir, workPrefix(replica)+"*"))
	for _, d := range old {
		if err := os.RemoveAll(d); err != nil {
			log.Warn("could not remove an old import's files", "dir", d, "error", err)
		}
	}
}

// stallTimeout ends a fetch that has received nothing for this long.
const stallTimeout = time.Minute

// importer carries one import's state between its steps. Steps only note their progress (in
// memory, atomically: they run inside bounded storage calls, which must never wait on etcd); the
// reporter goroutine writes it every progressEvery.
type importer struct {
	t   *term
	wk  decide.Work
	wmu sync.Mutex // guards rev, st and lost: the status as written
	rev int64      // the status record as last written by this import (0: none yet)
	st  keys.VMImageStatus

	mu          sync.Mutex
	phase       string
	done, total int64
	changed     bool
	// lost: a status write was refused because the record changed under the import or the term
	// ended; a write that merely failed (etcd slow) is tried again at the next tick.
	lost bool
}

// importImage runs an ImportImage work item.
func (t *term) importImage(ctx context.Context, wk decide.Work) error {
	r := t.c.imgStatusInf.Get(wk.Key)
	if r != nil && r.Value != nil && r.Value.UID == wk.ImageUID && r.Value.State == keys.ImageReady {
		return nil // done meanwhile (the work was asked for again while it ran)
	}
	wk.Rev = 0
	if r != nil {
		wk.Rev = r.ModRevision
		if r.Value != nil && r.Value.UID != wk.ImageUID {
			t.dropEarlierImage(ctx, wk, r.Value)
		}
	}
	pool := ""
	if wk.ImageSpec != nil {
		pool = wk.ImageSpec.Pool
	}
	im := &importer{t: t, wk: wk, rev: wk.Rev, st: keys.VMImageStatus{UID: wk.ImageUID, State: keys.ImageImporting, Pool: pool}}
	if !im.write(keys.ImageImporting, "fetch", 0, 0) {
		return nil // someone else's write came first: the next round decides again
	}
	from, err := im.run(ctx)
	if ctx.Err() != nil {
		return nil // the term ended: the next one starts over
	}
	if err != nil {
		im.st.Error = err.Error()
		phase, done, total := im.progressNow()
		im.write(keys.ImageError, phase, done, total)
		t.log.Warn("image import failed", "image", wk.Image, "source", wk.ImageSpec.Source, "error", err)
		t.c.events.Record("image/"+wk.Image, "import-failed", "%v", err)
		return nil
	}
	im.st.From, im.st.Error = from, ""
	if im.write(keys.ImageReady, "", 0, 0) {
		t.log.Info("image imported", "image", wk.Image, "from", from, "size_bytes", im.st.SizeBytes, "format", im.st.Format)
		t.c.events.Record("image/"+wk.Image, "imported", "%s (%s, %d MiB) stored as %s", wk.ImageSpec.Source, im.st.Format, im.st.SizeBytes>>20, from)
	}
	return nil
}

// dropEarlierImage removes from storage the image an earlier record of the same name stored (it
// was deleted and made again before the leader deleted the first): its status is about to be
// overwritten, and with it the last trace of it. Clones keep it in place (RBD refuses): then it
// stays, and an event says so.
func (t *term) dropEarlierImage(ctx context.Context, wk decide.Work, old *keys.VMImageStatus) {
	store, ok := t.c.cfg.Volumes.(volume.Images)
	if !ok {
		return
	}
	pool := imagePool(old, wk.ImageSpec.Pool)
	id := keys.ImageVolume(wk.Image, old.UID)
	if err := store.DeleteImage(ctx, pool, id); err != nil {
		t.log.Warn("an earlier image of the same name stays in storage", "image", wk.Image, "stored", pool+"/"+id, "error", err)
		t.c.events.Record("image/"+wk.Image, "earlier-kept", "%s/%s stays in storage: %v", pool, id, err)
	}
}

// imagePool is the pool an image's status says it was stored in (fallback when it does not: a
// status written before statuses named their pool, and no From either).
func imagePool(st *keys.VMImageStatus, fallback string) string {
	if st.Pool != "" {
		return st.Pool
	}
	if p, _, _, err := volume.ParseFrom(st.From); err == nil {
		return p
	}
	return fallback
}

// write records the import's status, conditioned on the record as this import last wrote it.
// The reporter and the steps both write: one at a time.
func (im *importer) write(state, phase string, done, total int64) bool {
	im.wmu.Lock()
	defer im.wmu.Unlock()
	im.st.State, im.st.Phase, im.st.Bytes, im.st.Total, im.st.Updated = state, phase, done, total, time.Now().UTC()
	key := im.wk.Key
	var cond decide.Cond
	if im.rev == 0 {
		cond = decide.CreateRev(key, 0)
	} else {
		cond = decide.ModRev(key, im.rev)
	}
	rev, err := im.t.txn([]decide.Cond{cond}, []decide.Write{decide.Put(key, keys.MustEncode(&im.st))})
	if err != nil {
		if !errors.Is(err, context.Canceled) && im.t.ctx.Err() == nil {
			im.t.log.Debug("image status not recorded", "image", im.wk.Image, "error", err)
		}
		im.lost = errors.Is(err, etcdutil.ErrConflict) || errors.Is(err, etcdutil.ErrNotLeader)
		return false
	}
	im.rev = rev
	return true
}

// step begins a step: its progress starts at 0 of total, and is written now.
func (im *importer) step(phase string, total int64) {
	im.mu.Lock()
	im.phase, im.done, im.total, im.changed = phase, 0, total, true
	im.mu.Unlock()
	im.flush()
}

// progress is a step's callback: done bytes so far. It only notes them.
func (im *importer) progress(done int64) {
	im.mu.Lock()
	im.done, im.changed = done, true
	im.mu.Unlock()
}

// setTotal is what a fetch learns of the size once the source answers.
func (im *importer) setTotal(total int64) {
	im.mu.Lock()
	im.total, im.changed = total, true
	im.mu.Unlock()
}

func (im *importer) progressNow() (string, int64, int64) {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.phase, im.done, im.total
}

// flush writes the progress if it changed; false when the status was changed under the import
// (another term took it over) or this term ended.
func (im *importer) flush() bool {
	im.mu.Lock()
	changed := im.changed
	im.changed = false
	im.mu.Unlock()
	if !changed {
		return true
	}
	phase, done, total := im.progressNow()
	if !im.write(keys.ImageImporting, phase, done, total) {
		im.mu.Lock()
		im.changed = true // tried again at the next tick
		im.mu.Unlock()
		im.wmu.Lock()
		defer im.wmu.Unlock()
		return !im.lost
	}
	return true
}

// note changes what the next status write records.
func (im *importer) note(fn func(*keys.VMImageStatus)) {
	im.wmu.Lock()
	fn(&im.st)
	im.wmu.Unlock()
}

// report writes the progress every progressEvery until ctx ends, and cancels the import if its
// status was changed under it or its record was deleted or made again (another uid): whether
// bytes are flowing or not.
func (im *importer) report(ctx context.Context, cancel context.CancelFunc) {
	tick := time.NewTicker(progressEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			r := im.t.c.imgInf.Get(im.t.c.space.VMImage(im.wk.Image))
			if r == nil || r.CreateRevision != im.wk.ImageUID || !im.flush() {
				cancel()
				return
			}
		}
	}
}

func (im *importer) run(ctx context.Context) (string, error) {
	spec := im.wk.ImageSpec
	if spec == nil {
		return "", errors.New("the image record cannot be read")
	}
	if err := spec.Validate(); err != nil {
		return "", err
	}
	store, ok := im.t.c.cfg.Volumes.(volume.Images)
	if !ok {
		return "", errors.New("this coordinator's volume backend cannot store images")
	}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); im.report(ctx, cancel) }()
	defer wg.Wait() // the reporter writes nothing after the import's own last word
	defer cancel()
	dir, err := os.MkdirTemp(im.t.c.cfg.ImportWorkDir, workPrefix(im.t.c.cfg.Name))
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(dir)
	file := filepath.Join(dir, "source")
	sum, err := fetch(ctx, spec.Source, im.t.c.cfg.ImportDir, file, im.progress, im.setTotal)
	if err != nil {
		return "", fmt.Errorf("fetch %s: %w", spec.Source, err)
	}
	if spec.SHA256 != "" && sum != spec.SHA256 {
		return "", fmt.Errorf("fetch %s: sha256 is %s, the record says %s", spec.Source, sum, spec.SHA256)
	}
	im.note(func(st *keys.VMImageStatus) { st.SHA256 = sum })
	format, err := sniffFormat(file)
	if err != nil {
		return "", err
	}
	if spec.Format != "" && spec.Format != format {
		return "", fmt.Errorf("the record says %s, the file is %s", spec.Format, format)
	}
	im.note(func(st *keys.VMImageStatus) { st.Format = format })
	raw := file
	if format == "qcow2" {
		im.step("convert", 0)
		raw = filepath.Join(dir, "raw")
		if err := convertQcow2(ctx, file, raw); err != nil {
			return "", err
		}
		_ = os.Remove(file) // the space, for a large image
	}
	f, err := os.Open(raw)
	if err != nil {
		return "", err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", err
	}
	im.note(func(st *keys.VMImageStatus) { st.SizeBytes = fi.Size() })
	im.step("store", fi.Size())
	return store.ImportImage(ctx, spec.Pool, keys.ImageVolume(im.wk.Image, im.wk.ImageUID), f, fi.Size(), im.progress)
}

// fetch copies source (http, https or file URL) to path and returns its sha256; total learns the
// size when the source says it. A file:// source must lie in importDir: whoever may write an image
// record must not make the leader copy its own host's files (its keys) into a disk a VM reads.
func fetch(ctx context.Context, source, importDir, path string, progress func(int64), total func(int64)) (string, error) {
	u, err := url.Parse(source)
	if err != nil {
		return "", err
	}
	var body io.ReadCloser
	switch u.Scheme {
	case "file":
		f, err := openInside(importDir, u.Path)
		if err != nil {
			return "", err
		}
		if fi, err := f.Stat(); err == nil {
			total(fi.Size())
		}
		body = f
	case "http", "https":
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, source, nil)
		if err != nil {
			return "", err
		}
		resp, err := (&http.Client{Transport: &http.Transport{Proxy: http.ProxyFromEnvironment, ResponseHeaderTimeout: stallTimeout}}).Do(req)
		if err != nil {
			return "", err
		}
		if resp.StatusCode != http.StatusOK {
			resp.Body.Close()
			return "", fmt.Errorf("%s", resp.Status)
		}
		if resp.ContentLength > 0 {
			total(resp.ContentLength)
		}
		// A transfer that stops sending ends after stallTimeout instead of holding the worker.
		stall := time.AfterFunc(stallTimeout, cancel)
		defer stall.Stop()
		body = readCloser{Reader: &onRead{r: resp.Body, fn: func() { stall.Reset(stallTimeout) }}, Closer: resp.Body}
	default:
		return "", fmt.Errorf("unsupported source scheme %q", u.Scheme)
	}
	defer body.Close()
	out, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	var done int64
	buf := make([]byte, 1<<20)
	for {
		n, rerr := body.Read(buf)
		if n > 0 {
			if _, err := out.Write(buf[:n]); err != nil {
				out.Close()
				return "", err
			}
			h.Write(buf[:n])
			done += int64(n)
			progress(done)
		}
		if errors.Is(rerr, io.EOF) {
			break
		}
		if rerr != nil {
			out.Close()
			if ctx.Err() != nil {
				return "", fmt.Errorf("%w (nothing received for %s, or the import was stopped)", rerr, stallTimeout)
			}
			return "", rerr
		}
	}
	if err := out.Close(); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// openInside opens path if it lies in dir once symbolic links are resolved.
func openInside(dir, path string) (*os.File, error) {
	if dir == "" {
		return nil, errors.New("file:// sources are off on this coordinator (no --import-dir): use an http:// or https:// URL")
	}
	root, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return nil, fmt.Errorf("--import-dir: %w", err)
	}
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return nil, err
	}
	if !keys.InDir(real, root) {
		return nil, fmt.Errorf("%s is not in the coordinators' --import-dir %s: file:// sources must be", path, dir)
	}
	return os.Open(real)
}

type onRead struct {
	r  io.Reader
	fn func()
}

func (o *onRead) Read(p []byte) (int, error) {
	n, err := o.r.Read(p)
	if n > 0 {
		o.fn()
	}
	return n, err
}

type readCloser struct {
	io.Reader
	io.Closer
}

// sniffFormat tells a qcow2 file (its magic) from anything else, which is taken as raw. Other
// formats qemu-img knows (vmdk, vhdx, ...) have magics of their own: they are refused, not
// stored as if they were disks.
func sniffFormat(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	head := make([]byte, 8)
	n, _ := io.ReadFull(f, head)
	head = head[:n]
	switch {
	case bytes.HasPrefix(head, []byte("QFI\xfb")):
		return "qcow2", nil
	case bytes.HasPrefix(head, []byte("KDMV")), bytes.HasPrefix(head, []byte("vhdxfile")), bytes.HasPrefix(head, []byte("conectix")):
		return "", fmt.Errorf("the file is a VMDK, VHDX or VHD image: convert it to raw or qcow2 first (qemu-img convert -O qcow2)")
	}
	return "raw", nil
}

// convertQcow2 writes src (qcow2) as the raw file dst. A qcow2 naming a backing file or an
// external data file is refused: converting it would read a file of the coordinator's host.
func convertQcow2(ctx context.Context, src, dst string) error {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		return errors.New("qemu-img is needed to import a qcow2 image: install qemu-utils on the coordinators' hosts")
	}
	out, err := exec.CommandContext(ctx, "qemu-img", "info", "--output=json", "-f", "qcow2", src).Output()
	if err != nil {
		return fmt.Errorf("qemu-img info: %w: %s", err, stderrOf(err))
	}
	var info struct {
		BackingFilename string `json:"backing-filename"`
		FormatSpecific  struct {
			Data struct {
				DataFile string `json:"data-file"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		return fmt.Errorf("qemu-img info: %w", err)
	}
	if info.BackingFilename != "" || info.FormatSpecific.Data.DataFile != "" {
		return fmt.Errorf("the qcow2 file names a backing or data file (%s%s): flatten it first (qemu-img convert -O qcow2)", info.BackingFilename, info.FormatSpecific.Data.DataFile)
	}
	if out, err := exec.CommandContext(ctx, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", src, dst).CombinedOutput(); err != nil {
		return fmt.Errorf("qemu-img convert: %w: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

func stderrOf(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return strings.TrimSpace(string(ee.Stderr))
	}
	return ""
}

// deleteImage removes an image whose record is gone from storage, then its status. While disks
// clone it the backend refuses: the status says so, and the next try is after decide.ImageRetry.
func (t *term) deleteImage(ctx context.Context, wk decide.Work) error {
	store, ok := t.c.cfg.Volumes.(volume.Images)
	st := t.c.imgStatusInf.Get(wk.Key)
	if st == nil || st.Value == nil || st.ModRevision != wk.Rev {
		return nil // changed meanwhile: the next round decides again
	}
	pool := imagePool(st.Value, "")
	var err error
	switch {
	case !ok:
		err = errors.New("this coordinator's volume backend cannot store images")
	case pool != "":
		err = store.DeleteImage(ctx, pool, keys.ImageVolume(wk.Image, wk.ImageUID))
	}
	if ctx.Err() != nil {
		return nil
	}
	if err != nil {
		ns := *st.Value
		ns.Error, ns.Updated = "deleted, but not from storage yet: "+err.Error(), time.Now().UTC()
		t.record("the image's status", []decide.Cond{decide.ModRev(wk.Key, wk.Rev)}, decide.Put(wk.Key, keys.MustEncode(&ns)))
		t.c.events.Record("image/"+wk.Image, "delete-failed", "%v", err)
		return nil
	}
	if t.record("the deleted image", []decide.Cond{decide.ModRev(wk.Key, wk.Rev)}, decide.Del(wk.Key)) {
		t.log.Info("image deleted", "image", wk.Image, "from", st.Value.From)
		t.c.events.Record("image/"+wk.Image, "deleted", "%s removed from storage", st.Value.From)
	}
	return nil
}
