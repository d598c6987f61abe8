package coordinator

import (
	"context"
	"errors"
	"time"

	"github.com/herdhq/herd/lib/volume"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

// Volumes: when the coordinator has a volume backend, the leader creates (or clones) and grows each
// VM's disk before placing it, so that storage errors surface early, as problem records, and never
// as a node failing to start a VM. Disk I/O never runs inside a round: a round only decides, workers
// do the Ceph calls and record the outcome in /herd/volumes/<pool>/<image>.

const volumeRetry = 10 * time.Second

// volumeFor returns the cached record of a VM's disk, or nil.
func (s *snapshotView) volumeFor(pool, image string) *etcdutil.KV {
	return s.volumes[pool+"/"+image]
}

// volumeReady reports whether a VM's disk exists at the size its spec asks, and starts the work
// that makes it so if not. It returns the problem to show meanwhile ("" when ready).
func (c *Coordinator) volumeReady(ctx context.Context, g etcdutil.Guard, s *snapshotView, name string, uid int64, spec *keys.VMSpec) (bool, string) {
	if c.cfg.Volumes == nil || spec.Disk == nil {
		return true, ""
	}
	d := spec.Disk
	image := keys.VolumeImage(name, uid)
	kv := s.volumeFor(d.Pool, image)
	var rec *keys.VolumeRecord
	if kv != nil && kv.Err == nil {
		rec = kv.Obj.(*keys.VolumeRecord)
	}
	switch {
	case rec != nil && rec.State == keys.VolumeReady && rec.SizeGiB >= d.SizeGiB && rec.UID == uid:
		return true, ""
	case rec != nil && rec.State == keys.VolumeError && time.Since(rec.Updated) < volumeRetry && rec.SizeGiB == d.SizeGiB:
		c.pokeAfter(volumeRetry - time.Since(rec.Updated))
		return false, "disk: " + rec.Error
	}
	v := volume.Volume{Pool: d.Pool, VM: name, UID: uid, SizeGiB: d.SizeGiB, From: d.From}
	c.ensureVolume(ctx, g, v, kv)
	if rec != nil && rec.State == keys.VolumeError {
		return false, "disk: " + rec.Error
	}
	return false, ""
}

// ensureVolume runs the backend's Ensure in the background, once per disk at a time, and records
// the outcome under the leader guard.
func (c *Coordinator) ensureVolume(ctx context.Context, g etcdutil.Guard, v volume.Volume, kv *etcdutil.KV) {
	key := c.space.Volume(v.Pool, v.ID())
	c.mu.Lock()
	if c.volumeWork[key] {
		c.mu.Unlock()
		return
	}
	c.volumeWork[key] = true
	c.mu.Unlock()
	var rev int64
	if kv != nil {
		rev = kv.ModRevision
	}
	go func() {
		defer func() {
			c.mu.Lock()
			delete(c.volumeWork, key)
			c.mu.Unlock()
			c.poke("", nil, nil)
		}()
		c.volumeSem <- struct{}{}
		defer func() { <-c.volumeSem }()
		start := time.Now()
		_, err := c.cfg.Volumes.Ensure(ctx, v)
		if ctx.Err() != nil {
			return
		}
		rec := keys.VolumeRecord{VM: v.VM, UID: v.UID, SizeGiB: v.SizeGiB, From: v.From, State: keys.VolumeReady, Updated: time.Now().UTC()}
		if err != nil {
			rec.State, rec.Error = keys.VolumeError, err.Error()
			if errors.Is(err, volume.ErrShrink) {
				rec.Error = "refusing to shrink: " + err.Error()
			}
			c.log.Warn("disk not ready", "vm", v.VM, "image", v.Pool+"/"+v.ID(), "error", err)
			c.events.Record("vm/"+v.VM, "disk-failed", "%s/%s: %v", v.Pool, v.ID(), err)
		} else {
			c.m.volumeSeconds.Observe(time.Since(start).Seconds())
			c.log.Info("disk ready", "vm", v.VM, "image", v.Pool+"/"+v.ID(), "size_gib", v.SizeGiB, "took", time.Since(start).Round(time.Millisecond))
		}
		if _, err := etcdutil.GuardedTxn(ctx, c.cfg.Client, g,
			[]etcdutil.Cmp{etcdutil.ModRev(key, rev)},
			[]etcdutil.Op{etcdutil.OpPut(key, keys.MustEncode(&rec))}); err != nil && !errors.Is(err, etcdutil.ErrConflict) {
			c.log.Warn("could not record the disk", "image", key, "error", err)
		}
	}()
}

// purgeVolumes deletes disks an operator asked to purge, once no live VM of that uid exists.
func (c *Coordinator) purgeVolumes(ctx context.Context, g etcdutil.Guard, s *snapshotView) {
	if c.cfg.Volumes == nil {
		return
	}
	for _, kv := range s.volumes {
		if kv.Err != nil {
			continue
		}
		rec := kv.Obj.(*keys.VolumeRecord)
		pool, image, ok := keys.ParseNodeScoped(c.space.VolumeRoot(), kv.Key)
		if !ok {
			continue
		}
		req := s.purgeRequested(c.space, pool, image, kv)
		if req == nil {
			continue
		}
		if v, ok := s.vms[rec.VM]; ok && v.spec != nil && v.spec.CreateRevision == rec.UID {
			continue // still in use: purge waits for the VM to go
		}
		c.mu.Lock()
		busy := c.volumeWork[kv.Key]
		if !busy {
			c.volumeWork[kv.Key] = true
		}
		c.mu.Unlock()
		if busy {
			continue
		}
		vol := volume.Volume{Pool: pool, VM: rec.VM, UID: rec.UID}
		key, rev, reqKey, reqRev := kv.Key, kv.ModRevision, req.Key, req.ModRevision
		go func() {
			defer func() {
				c.mu.Lock()
				delete(c.volumeWork, key)
				c.mu.Unlock()
			}()
			if err := c.cfg.Volumes.Delete(ctx, vol); err != nil {
				c.log.Warn("purge failed; retrying later", "image", pool+"/"+image, "error", err)
				c.events.Record("vm/"+rec.VM, "purge-failed", "%s/%s: %v", pool, image, err)
				c.pokeAfter(volumeRetry)
				return
			}
			if _, err := etcdutil.GuardedTxn(ctx, c.cfg.Client, g,
				[]etcdutil.Cmp{etcdutil.ModRev(key, rev), etcdutil.ModRev(reqKey, reqRev)},
				[]etcdutil.Op{etcdutil.OpDelete(key), etcdutil.OpDelete(reqKey)}); err == nil {
				c.log.Info("disk purged", "image", pool+"/"+image)
				c.events.Record("vm/"+rec.VM, "purged", "%s/%s deleted", pool, image)
			}
		}()
	}
}

// adoptVolumes records disks found in the backend that no record names (made before herd kept
// records, or records lost with an etcd restore), so `herdctl volume list` shows every disk.
func (c *Coordinator) adoptVolumes(ctx context.Context, g etcdutil.Guard) {
	if c.cfg.Volumes == nil {
		return
	}
	c.mu.Lock()
	due := time.Since(c.lastAdopt) > time.Minute
	if due {
		c.lastAdopt = time.Now()
	}
	c.mu.Unlock()
	if !due {
		return
	}
	go func() {
		infos, err := c.cfg.Volumes.List(ctx)
		if err != nil {
			c.log.Warn("listing disks failed", "error", err)
			return
		}
		for _, in := range infos {
			key := c.space.Volume(in.Pool, in.ID)
			if c.volInf.Get(key) != nil {
				continue
			}
			rec := keys.VolumeRecord{VM: in.VM, UID: in.UID, SizeGiB: in.SizeGiB, State: keys.VolumeReady, Updated: time.Now().UTC()}
			if _, err := etcdutil.GuardedTxn(ctx, c.cfg.Client, g,
				[]etcdutil.Cmp{etcdutil.CreateRev(key, 0)}, []etcdutil.Op{etcdutil.OpPut(key, keys.MustEncode(&rec))}); err != nil {
				return
			}
		}
	}()
}
