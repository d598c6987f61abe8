package coordinator

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/herdhq/herd/coordinator/decide"
	"github.com/herdhq/herd/coordinator/fence"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/volume"
	"github.com/herdhq/herd/lib/workqueue"
)

// Side work is what a plan asks for that waits on something slow (a fencer, Ceph): it runs in the
// term's work queues, one at a time per key, and writes its outcome under the term's guard; the
// next round decides from that outcome. Fencing and disks have their own queues, so that slow
// fencers (a BMC that times out) never hold up disks, nor the reverse.
type sideWork struct {
	t      *term
	fenceQ *workqueue.Queue
	diskQ  *workqueue.Queue
	imageQ *workqueue.Queue // imports take minutes: never in the way of disks

	mu    sync.Mutex
	items map[string]decide.Work // the latest work asked for, per key
	ran   map[string]int64       // fence key -> the record revision its fencer last ran for
	busy  map[string]bool
}

const (
	fenceWorkers = 16
	diskWorkers  = 4
	imageWorkers = 2
)

func newSideWork(t *term) *sideWork {
	w := &sideWork{t: t, fenceQ: workqueue.New(), diskQ: workqueue.New(), imageQ: workqueue.New(),
		items: map[string]decide.Work{}, ran: map[string]int64{}, busy: map[string]bool{}}
	for _, q := range []*workqueue.Queue{w.fenceQ, w.diskQ, w.imageQ} {
		q.BaseDelay, q.MaxDelay = time.Second, 30*time.Second
	}
	return w
}

// run starts the queues' workers for the rest of the term.
func (w *sideWork) run() {
	onErr := func(key string, err error, retry time.Duration) {
		w.t.log.Warn("side work failed; retrying", "work", key, "error", err, "retry_in", retry)
	}
	w.t.goroutine(func(ctx context.Context) { w.fenceQ.Run(ctx, fenceWorkers, w.do, onErr) })
	w.t.goroutine(func(ctx context.Context) { w.diskQ.Run(ctx, diskWorkers, w.do, onErr) })
	w.t.goroutine(func(ctx context.Context) { w.imageQ.Run(ctx, imageWorkers, w.do, onErr) })
}

// add queues a plan's work. A fencer runs once per fence record revision: the record changes when
// a run ends, so a round that still sees the old revision does not start the same run again.
func (w *sideWork) add(works []decide.Work) {
	for _, wk := range works {
		if wk.Kind == decide.Renew && !w.renewDue(wk.Fence) {
			continue
		}
		w.mu.Lock()
		if wk.Kind == decide.Fence && w.ran[wk.Key] == wk.Rev {
			w.mu.Unlock()
			continue
		}
		w.items[wk.Key] = wk
		w.mu.Unlock()
		w.queue(wk.Kind).Add(wk.Key)
	}
}

func (w *sideWork) queue(k decide.WorkKind) *workqueue.Queue {
	switch k {
	case decide.Fence, decide.Unfence, decide.Renew:
		return w.fenceQ
	case decide.ImportImage, decide.DeleteImage:
		return w.imageQ
	}
	return w.diskQ
}

func (w *sideWork) renewDue(f *keys.Fence) bool {
	r, ok := w.t.c.cfg.Fencer.(fence.Renewer)
	return ok && r.RenewDue(f.Details)
}

// running counts the work under way.
func (w *sideWork) running() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.busy)
}

// do runs the latest work asked for under key, then asks for a round.
func (w *sideWork) do(ctx context.Context, key string) error {
	w.mu.Lock()
	wk, ok := w.items[key]
	delete(w.items, key)
	if ok && wk.Kind == decide.Fence {
		if w.ran[key] == wk.Rev {
			ok = false
		}
		w.ran[key] = wk.Rev
	}
	if ok {
		w.busy[key] = true
	}
	w.mu.Unlock()
	if !ok {
		return nil
	}
	defer func() {
		w.mu.Lock()
		delete(w.busy, key)
		w.mu.Unlock()
		w.t.c.poke("", nil, nil)
	}()
	t := w.t
	switch wk.Kind {
	case decide.Fence:
		return t.runFencer(ctx, wk)
	case decide.Unfence:
		return t.unfence(ctx, wk)
	case decide.Renew:
		return t.renewFence(ctx, wk)
	case decide.EnsureVolume:
		return t.ensureVolume(ctx, wk)
	case decide.PurgeVolume:
		return t.purgeVolume(ctx, wk)
	case decide.AdoptVolumes:
		return t.adoptVolumes(ctx)
	case decide.ImportImage:
		return t.importImage(ctx, wk)
	case decide.DeleteImage:
		return t.deleteImage(ctx, wk)
	}
	return fmt.Errorf("unknown side work %d", wk.Kind)
}

// record writes a side work's outcome: it holds only if the record is still as the plan read it.
// A conflict or a lost term is no failure of the work: the next round (or term) decides again.
func (t *term) record(what string, conds []decide.Cond, writes ...decide.Write) bool {
	_, err := t.txn(conds, writes)
	switch {
	case err == nil:
		return true
	case errors.Is(err, etcdutil.ErrConflict), errors.Is(err, etcdutil.ErrNotLeader), t.ctx.Err() != nil:
	default:
		t.log.Warn("could not record "+what, "error", err)
	}
	return false
}

// runFencer runs the fencer for a fence record and records the outcome.
func (t *term) runFencer(ctx context.Context, wk decide.Work) error {
	f := wk.Fence
	details, err := t.c.cfg.Fencer.Fence(ctx, wk.Target)
	if ctx.Err() != nil {
		return nil // the term ended: the next term runs it again
	}
	nf := *f
	nf.Attempts++
	nf.Updated = time.Now().UTC()
	nf.By = t.c.cfg.Name
	if err != nil {
		nf.Phase, nf.Error = keys.FenceFailed, err.Error()
		t.log.Error("fencing failed; the node's VMs stay placed", "node", f.HWID, "boot_id", f.BootID, "attempt", nf.Attempts, "error", err)
		t.c.events.Record("node/"+f.HWID, "fence-failed", "attempt %d: %v", nf.Attempts, err)
		t.c.m.fenceFailures.Inc()
	} else {
		nf.Phase, nf.Error, nf.Details = keys.FenceFenced, "", details
		t.log.Warn("node fenced: moving its VMs", "node", f.HWID, "boot_id", f.BootID, "method", f.Method)
		t.c.events.Record("node/"+f.HWID, "fenced", "boot %s fenced with %s; %d VMs to move", f.BootID, f.Method, len(wk.Target.VMs))
	}
	t.record("the fence outcome", []decide.Cond{decide.ModRev(wk.Key, wk.Rev)}, decide.Put(wk.Key, keys.MustEncode(&nf)))
	return nil
}

// fenceKey is the fence record a fence work item is about (Unfence and Renew keys carry a suffix).
func fenceKey(wk decide.Work, space keys.Space) string {
	return space.Fence(wk.Fence.HWID, wk.Fence.BootID)
}

// unfence undoes a fence (Ceph blocklist entries) and deletes its record.
func (t *term) unfence(ctx context.Context, wk decide.Work) error {
	f := wk.Fence
	if u, ok := t.c.cfg.Fencer.(fence.Unfencer); ok && len(f.Details) > 0 {
		if err := u.Unfence(ctx, f.Details); err != nil {
			return fmt.Errorf("undo the fence of %s boot %s: %w", f.HWID, f.BootID, err)
		}
	}
	if t.record("the cleared fence", []decide.Cond{decide.ModRev(fenceKey(wk, t.c.space), wk.Rev)}, decide.Del(fenceKey(wk, t.c.space))) {
		t.log.Info("fence cleared", "node", f.HWID, "boot_id", f.BootID)
		t.c.events.Record("node/"+f.HWID, "fence-cleared", "fence of boot %s (%s) undone and dropped", f.BootID, f.Phase)
	}
	return nil
}

// renewFence renews a standing fence (Ceph blocklist entries) before it expires.
func (t *term) renewFence(ctx context.Context, wk decide.Work) error {
	r, ok := t.c.cfg.Fencer.(fence.Renewer)
	if !ok {
		return nil
	}
	d, err := r.Renew(ctx, wk.Fence.Details)
	if err != nil {
		return fmt.Errorf("renew the fence of %s: %w", wk.Fence.HWID, err)
	}
	nf := *wk.Fence
	nf.Details, nf.Updated = d, time.Now().UTC()
	key := fenceKey(wk, t.c.space)
	t.record("the renewed fence", []decide.Cond{decide.ModRev(key, wk.Rev)}, decide.Put(key, keys.MustEncode(&nf)))
	return nil
}

// ensureVolume creates, clones or grows a disk and records the outcome, failure included: the
// record is what the VM's problem text shows, and the next round retries after decide.VolumeRetry.
func (t *term) ensureVolume(ctx context.Context, wk decide.Work) error {
	v := wk.Volume
	start := time.Now()
	_, err := t.c.cfg.Volumes.Ensure(ctx, v)
	if ctx.Err() != nil {
		return nil
	}
	rec := keys.VolumeRecord{VM: v.VM, UID: v.UID, SizeGiB: v.SizeGiB, Disk: v.Disk, From: v.From, State: keys.VolumeReady, Updated: time.Now().UTC()}
	if err != nil {
		rec.State, rec.Error = keys.VolumeError, err.Error()
		if errors.Is(err, volume.ErrShrink) {
			rec.Error = "refusing to shrink: " + err.Error()
		}
		t.log.Warn("disk not ready", "vm", v.VM, "image", v.Pool+"/"+v.ID(), "error", err)
		t.c.events.Record("vm/"+v.VM, "disk-failed", "%s/%s: %v", v.Pool, v.ID(), err)
	} else {
		t.c.m.volumeSeconds.Observe(time.Since(start).Seconds())
		t.log.Info("disk ready", "vm", v.VM, "image", v.Pool+"/"+v.ID(), "size_gib", v.SizeGiB, "took", time.Since(start).Round(time.Millisecond))
	}
	t.record("the disk", []decide.Cond{decide.ModRev(wk.Key, wk.Rev)}, decide.Put(wk.Key, keys.MustEncode(&rec)))
	return nil
}

// purgeVolume deletes a disk an operator asked to purge, then its record and the request.
func (t *term) purgeVolume(ctx context.Context, wk decide.Work) error {
	v := wk.Volume
	if err := t.c.cfg.Volumes.Delete(ctx, v); err != nil {
		t.c.events.Record("vm/"+v.VM, "purge-failed", "%s/%s: %v", v.Pool, v.ID(), err)
		return fmt.Errorf("purge %s/%s: %w", v.Pool, v.ID(), err)
	}
	if t.record("the purge", []decide.Cond{decide.ModRev(wk.Key, wk.Rev), decide.ModRev(wk.Request, wk.RequestRev)},
		decide.Del(wk.Key), decide.Del(wk.Request)) {
		t.log.Info("disk purged", "image", v.Pool+"/"+v.ID())
		t.c.events.Record("vm/"+v.VM, "purged", "%s/%s deleted", v.Pool, v.ID())
	}
	return nil
}

// adoptVolumes records disks found in storage that no record names (made before herd kept
// records, or records lost with an etcd restore), so `herdctl volume list` shows every disk.
func (t *term) adoptVolumes(ctx context.Context) error {
	infos, err := t.c.cfg.Volumes.List(ctx)
	if err != nil {
		return fmt.Errorf("list disks: %w", err)
	}
	for _, in := range infos {
		key := t.c.space.Volume(in.Pool, in.ID)
		if t.c.volInf.Get(key) != nil {
			continue
		}
		rec := keys.VolumeRecord{VM: in.VM, UID: in.UID, SizeGiB: in.SizeGiB, Disk: in.Disk, State: keys.VolumeReady, Updated: time.Now().UTC()}
		if !t.record("an adopted disk", []decide.Cond{decide.CreateRev(key, 0)}, decide.Put(key, keys.MustEncode(&rec))) && t.ctx.Err() != nil {
			return nil
		}
	}
	return nil
}
