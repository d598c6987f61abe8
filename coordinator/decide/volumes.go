package decide

import (
	"fmt"
	"time"

	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/volume"
)

// Volumes: when the coordinator has a volume backend, the leader creates (or clones) and grows each
// VM's disk before placing it, so that storage errors surface early, as problem records, and never
// as a node failing to start a VM. A round only decides: the work queue does the Ceph calls and
// records the outcome in /herd/volumes/<pool>/<image>.

// VolumeRetry is how long a failed disk waits before it is tried again.
const VolumeRetry = 10 * time.Second

// AdoptEvery is how often the disks in storage are compared with the records.
const AdoptEvery = time.Minute

// volumeReady reports whether every disk of a VM exists at the size its spec asks, and asks for
// the work that makes it so if not. It returns the problem to show meanwhile ("" when there is
// none): the first disk's that has one.
func (s *view) volumeReady(name string, uid int64, spec *keys.VMSpec) (bool, string) {
	disks := spec.DiskList()
	if len(disks) == 0 {
		return true, ""
	}
	if !s.cfg.ManagedDisks {
		for _, d := range disks {
			if d.Image != "" {
				return false, fmt.Sprintf("disk %s: cloning image %s needs a coordinator with a volume backend (--volumes-dir or Ceph)", d.Name, d.Image)
			}
		}
		return true, ""
	}
	ready, problem := true, ""
	for _, d := range disks {
		ok, p := s.diskReady(name, uid, d)
		ready = ready && ok
		if problem == "" && p != "" {
			problem = "disk " + d.Name + ": " + p
		}
	}
	return ready, problem
}

// diskReady is volumeReady for one disk.
func (s *view) diskReady(name string, uid int64, d keys.Disk) (bool, string) {
	image := keys.DiskImage(name, uid, d.Name)
	r := s.Volumes[d.Pool+"/"+image]
	var vr *keys.VolumeRecord
	if r.OK() {
		vr = r.Value
	}
	switch {
	case vr != nil && vr.State == keys.VolumeReady && vr.SizeGiB >= d.SizeGiB && vr.UID == uid:
		return true, ""
	case vr != nil && vr.State == keys.VolumeError && vr.SizeGiB == d.SizeGiB && s.Now.Sub(vr.Updated) < VolumeRetry:
		s.after(VolumeRetry - s.Now.Sub(vr.Updated))
		return false, vr.Error
	}
	from := d.From
	if vr != nil {
		from = vr.From // made already: what it was cloned from stays on its record
	} else if d.Image != "" {
		// Only a disk that does not exist yet clones: one that does keeps its bytes.
		f, problem := s.imageSource(d)
		if problem != "" {
			return false, problem
		}
		from = f
	}
	s.plan.Work = append(s.plan.Work, Work{Kind: EnsureVolume, Key: s.cfg.Space.Volume(d.Pool, image), Rev: modRev(r),
		Volume: volume.Volume{Pool: d.Pool, VM: name, UID: uid, Disk: d.Name, SizeGiB: d.SizeGiB, From: from}})
	if vr != nil && vr.State == keys.VolumeError {
		return false, vr.Error
	}
	return false, ""
}

// purgeVolumes asks for the disks operators asked to purge to be deleted, once no VM of that uid
// exists.
func (s *view) purgeVolumes() {
	if !s.cfg.ManagedDisks {
		return
	}
	for _, id := range sortedNames(s.Volumes) {
		r := s.Volumes[id]
		if !r.OK() {
			continue
		}
		pool, image, ok := keys.ParseNodeScoped(s.cfg.Space.VolumeRoot(), r.Key)
		if !ok {
			continue
		}
		req := s.purgeRequested(pool, image, r)
		if req == nil {
			continue
		}
		// The storage name says whose disk it is; the record's own fields could have been edited.
		vm, uid, disk, ok := keys.ParseDiskImage(image)
		if !ok {
			continue
		}
		if v, ok := s.VMs[vm]; ok && v.Spec != nil && keys.SpecUID(v.Spec) == uid {
			continue // still in use: purge waits for the VM to go
		}
		s.plan.Work = append(s.plan.Work, Work{Kind: PurgeVolume, Key: r.Key, Rev: r.ModRevision,
			Volume: volume.Volume{Pool: pool, VM: vm, UID: uid, Disk: disk}, Request: req.Key, RequestRev: req.ModRevision})
	}
}

// adoptVolumes asks, once every AdoptEvery, for the disks in storage that no record names to be
// recorded (made before herd kept records, or records lost with an etcd restore), so that
// `herdctl volume list` shows every disk.
func (s *view) adoptVolumes() {
	if !s.cfg.ManagedDisks {
		return
	}
	if due := s.st.LastAdopt.Add(AdoptEvery); s.Now.Before(due) {
		s.after(due.Sub(s.Now))
		return
	}
	s.st.LastAdopt = s.Now
	s.plan.Work = append(s.plan.Work, Work{Kind: AdoptVolumes, Key: "adopt-volumes"})
	s.after(AdoptEvery)
}
