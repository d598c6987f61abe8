package decide

import (
	"fmt"
	"strings"

	"github.com/herdhq/herd/lib/keys"
)

// Operators' one-shot requests (/herd/requests/): operators may write them, never the records they
// concern. Each names the record it is about by that record's CreateRevision ("of"), so a request
// can never apply to a later record at the same key. The leader acts by writing its own record, and
// deletes the request in the same transaction; a request about a record that is gone, or about
// another incarnation of it, is deleted with an event saying it was ignored.

// handleRequests turns confirm-loss and fence-clear requests into the leader's records. Purge
// requests are acted on by purgeVolumes, once the disk is unused; here only stale ones go.
func (s *view) handleRequests() []Action {
	sp := s.cfg.Space
	var acts []Action
	for _, key := range sortedNames(s.Requests) {
		r := s.Requests[key]
		if r.Err != nil {
			acts = append(acts, s.dropRequest(r, "unreadable: "+r.Err.Error()))
			continue
		}
		req := r.Value
		switch {
		case key == sp.ConfirmLossRequest():
			g := s.Guard
			if !g.OK() || g.CreateRevision != req.Of {
				acts = append(acts, s.dropRequest(r, "no such loss guard (it was released, or this confirms an earlier one)"))
				continue
			}
			if req.Listed > 0 && req.Listed != len(g.Value.Nodes) {
				acts = append(acts, s.dropRequest(r, fmt.Sprintf("the loss guard lists %d nodes now, %d when this was confirmed: look again (herdctl cluster show) and confirm again", len(g.Value.Nodes), req.Listed)))
				continue
			}
			gd := *g.Value
			gd.Confirmed, gd.By = true, req.By
			nodes := strings.Join(gd.Nodes, ", ")
			acts = append(acts, Action{Object: "cluster", What: "confirm loss",
				Conds:  []Cond{ModRev(g.Key, g.ModRevision), ModRev(r.Key, r.ModRevision)},
				Writes: []Write{Put(g.Key, keys.MustEncode(&gd)), Del(r.Key)},
				Notes: []Note{{Level: Warn, Log: "mass loss confirmed by an operator: fencing and rescheduling proceed", Args: []any{"by", req.By, "nodes", nodes},
					Object: "cluster", Event: "loss-confirmed", Message: fmt.Sprintf("by %s: %s", req.By, nodes)}}})
		case strings.HasPrefix(key, sp.FenceClearPrefix()):
			hwid, boot, ok := keys.ParseNodeScoped(sp.FenceClearPrefix(), key)
			var f *rec[keys.Fence]
			if ok {
				for _, fr := range s.Fences[hwid] {
					if fr.Key == sp.Fence(hwid, boot) {
						f = fr
					}
				}
			}
			if !f.OK() || f.CreateRevision != req.Of {
				acts = append(acts, s.dropRequest(r, "no such fence record (cleared already, or this names an earlier one)"))
				continue
			}
			nf := *f.Value
			nf.Phase, nf.Updated, nf.By = keys.FenceClearing, s.Now.UTC(), s.cfg.Name
			acts = append(acts, Action{Object: "node/" + hwid, What: "clear fence",
				Conds:  []Cond{ModRev(f.Key, f.ModRevision), ModRev(r.Key, r.ModRevision)},
				Writes: []Write{Put(f.Key, keys.MustEncode(&nf)), Del(r.Key)},
				Notes: []Note{{Level: Warn, Log: "fence clear requested by an operator", Args: []any{"node", hwid, "boot_id", boot, "by", req.By},
					Object: "node/" + hwid, Event: "fence-clearing", Message: fmt.Sprintf("fence of boot %s cleared by %s: undoing it", boot, req.By)}}})
		case strings.HasPrefix(key, sp.PurgeRequestPrefix()):
			pool, image, ok := keys.ParseNodeScoped(sp.PurgeRequestPrefix(), key)
			vol := s.Volumes[pool+"/"+image]
			if !ok || vol == nil || vol.CreateRevision != req.Of {
				acts = append(acts, s.dropRequest(r, "no such disk record (purged already, or this names an earlier one)"))
			}
		case strings.HasPrefix(key, sp.ForgetRequestPrefix()):
			name := strings.TrimPrefix(key, sp.ForgetRequestPrefix())
			var pl *rec[keys.Placement]
			if v := s.VMs[name]; v != nil {
				pl = v.Placement
			}
			if !pl.OK() || !pl.Value.Orphan || pl.CreateRevision != req.Of {
				acts = append(acts, s.dropRequest(r, "no such orphan (forgotten already, or this names an earlier one)"))
				continue
			}
			// Without the orphan placement, its node has the evidence it waited for (no spec, no
			// placement) and removes the domain.
			acts = append(acts, Action{Object: "vm/" + name, What: "forget orphan",
				Conds:  []Cond{ModRev(pl.Key, pl.ModRevision), ModRev(r.Key, r.ModRevision)},
				Writes: []Write{Del(pl.Key), Del(r.Key)},
				Notes: []Note{{Level: Warn, Log: "orphan forgotten by an operator: its node removes the domain", Args: []any{"vm", name, "node", pl.Value.Node, "by", req.By},
					Object: "vm/" + name, Event: "orphan-forgotten", Message: fmt.Sprintf("by %s: the domain on %s is removed", req.By, pl.Value.Node)}}})
		}
	}
	return acts
}

// dropRequest deletes a request the leader will not act on, saying why.
func (s *view) dropRequest(r *rec[keys.Request], why string) Action {
	return Action{Object: "request", What: "drop request",
		Conds:  []Cond{ModRev(r.Key, r.ModRevision)},
		Writes: []Write{Del(r.Key)},
		Notes: []Note{{Level: Warn, Log: "request ignored", Args: []any{"key", r.Key, "why", why},
			Object: "request/" + strings.TrimPrefix(r.Key, s.cfg.Space.RequestPrefix()), Event: "ignored", Message: why}}}
}

// purgeRequested returns the purge request of a disk record, or nil.
func (s *view) purgeRequested(pool, image string, vol *rec[keys.VolumeRecord]) *rec[keys.Request] {
	r := s.Requests[s.cfg.Space.PurgeRequest(pool, image)]
	if !r.OK() || r.Value.Of != vol.CreateRevision {
		return nil
	}
	return r
}
