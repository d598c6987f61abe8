package decide

import (
	"fmt"
	"time"

	"github.com/herdhq/herd/lib/keys"
)

// VM images: an operator writes /herd/vmimages/<name> (herdctl volume import); the leader's side
// work fetches the source, converts it to raw and stores it as a protected snapshot, recording
// each step in /herd/vmimagestatus/<name>; a disk whose spec names the image is cloned from it
// when the disk is made. An image deleted goes from storage once no disk clones it (the backend
// refuses before that); its status stays, with the reason, until it has.

// ImageRetry is how long a failed import or delete waits before it is tried again.
const ImageRetry = time.Minute

// imageSource is the clone source of the image a disk names, or the problem that stops the disk
// from being made yet.
func (s *view) imageSource(d keys.Disk) (string, string) {
	spec, st := s.Images[d.Image], s.ImageStatus[d.Image]
	if !spec.OK() {
		return "", fmt.Sprintf("no image %s (herdctl volume import %s --from FILE)", d.Image, d.Image)
	}
	if !st.OK() || st.Value.UID != spec.CreateRevision {
		return "", fmt.Sprintf("image %s is not imported yet", d.Image)
	}
	switch v := st.Value; v.State {
	case keys.ImageReady:
		if d.SizeGiB < v.MinDiskGiB() {
			return "", fmt.Sprintf("%d GiB is smaller than image %s (%d GiB at least)", d.SizeGiB, d.Image, v.MinDiskGiB())
		}
		return v.From, ""
	case keys.ImageError:
		return "", fmt.Sprintf("image %s failed to import: %s", d.Image, v.Error)
	default:
		return "", fmt.Sprintf("image %s is importing (%s)", d.Image, v.Progress())
	}
}

// images asks for the imports that are due and for the deletion of images no longer wanted.
func (s *view) images() {
	if !s.cfg.ManagedDisks {
		return
	}
	sp := s.cfg.Space
	for _, name := range sortedNames(s.Images) {
		r, st := s.Images[name], s.ImageStatus[name]
		if r.Err != nil {
			continue // unreadable: herdctl volume images shows it; nothing to import
		}
		if st.OK() && st.Value.UID == r.CreateRevision {
			switch st.Value.State {
			case keys.ImageReady:
				continue
			case keys.ImageError:
				if wait := ImageRetry - s.Now.Sub(st.Value.Updated); wait > 0 {
					s.after(wait)
					continue
				}
			}
		}
		// Also when an import is under way: the work queue runs one per key, and a new term
		// must take up the import its predecessor left.
		s.plan.Work = append(s.plan.Work, Work{Kind: ImportImage, Key: sp.VMImageStatus(name), Rev: modRev(st),
			Image: name, ImageSpec: r.Value, ImageUID: r.CreateRevision})
	}
	for _, name := range sortedNames(s.ImageStatus) {
		st := s.ImageStatus[name]
		if s.Images[name] != nil || !st.OK() {
			continue
		}
		if st.Value.Error != "" {
			if wait := ImageRetry - s.Now.Sub(st.Value.Updated); wait > 0 {
				s.after(wait)
				continue
			}
		}
		s.plan.Work = append(s.plan.Work, Work{Kind: DeleteImage, Key: st.Key, Rev: st.ModRevision, Image: name, ImageUID: st.Value.UID})
	}
}
