package coordinator

import (
	"strings"
	"time"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

// Operators' one-shot requests (/herd/requests/): operators may write them, never the records they
// concern. Each names the record it is about by that record's CreateRevision ("of"), so a request
// can never apply to a later record at the same key. The leader acts by writing its own record, and
// deletes the request in the same transaction; a request about a record that is gone, or about
// another incarnation of it, is deleted with an event saying it was ignored.

// handleRequests turns confirm-loss and fence-clear requests into the leader's records. Purge
// requests are acted on by purgeVolumes, once the disk is unused; here only stale ones go.
func (c *Coordinator) handleRequests(s *snapshotView) []action {
	var acts []action
	for key, kv := range s.requests {
		if kv.Err != nil {
			acts = append(acts, c.dropRequest(kv, "unreadable: "+kv.Err.Error()))
			continue
		}
		req := kv.Obj.(*keys.Request)
		switch {
		case key == c.space.ConfirmLossRequest():
			g := s.guard
			if g == nil || g.Err != nil || g.CreateRevision != req.Of {
				acts = append(acts, c.dropRequest(kv, "no such loss guard (it was released, or this confirms an earlier one)"))
				continue
			}
			gd := *g.Obj.(*keys.LossGuard)
			gd.Confirmed, gd.By = true, req.By
			nodes := strings.Join(gd.Nodes, ", ")
			acts = append(acts, action{vm: "cluster", what: "confirm loss",
				conds: []etcdutil.Cmp{etcdutil.ModRev(g.Key, g.ModRevision), etcdutil.ModRev(kv.Key, kv.ModRevision)},
				ops:   []etcdutil.Op{etcdutil.OpPut(g.Key, keys.MustEncode(&gd)), etcdutil.OpDelete(kv.Key)},
				after: func() {
					c.log.Warn("mass loss confirmed by an operator: fencing and rescheduling proceed", "by", req.By, "nodes", nodes)
					c.events.Record("cluster", "loss-confirmed", "by %s: %s", req.By, nodes)
				}})
		case strings.HasPrefix(key, c.space.FenceClearPrefix()):
			hwid, boot, ok := keys.ParseNodeScoped(c.space.FenceClearPrefix(), key)
			var fkv *etcdutil.KV
			if ok {
				for _, f := range s.fences[hwid] {
					if f.Key == c.space.Fence(hwid, boot) {
						fkv = f
					}
				}
			}
			if fkv == nil || fkv.Err != nil || fkv.CreateRevision != req.Of {
				acts = append(acts, c.dropRequest(kv, "no such fence record (cleared already, or this names an earlier one)"))
				continue
			}
			f := *fkv.Obj.(*keys.Fence)
			f.Phase, f.Updated, f.By = keys.FenceClearing, time.Now().UTC(), c.cfg.Name
			acts = append(acts, action{vm: "node/" + hwid, what: "clear fence",
				conds: []etcdutil.Cmp{etcdutil.ModRev(fkv.Key, fkv.ModRevision), etcdutil.ModRev(kv.Key, kv.ModRevision)},
				ops:   []etcdutil.Op{etcdutil.OpPut(fkv.Key, keys.MustEncode(&f)), etcdutil.OpDelete(kv.Key)},
				after: func() {
					c.log.Warn("fence clear requested by an operator", "node", hwid, "boot_id", boot, "by", req.By)
					c.events.Record("node/"+hwid, "fence-clearing", "fence of boot %s cleared by %s: undoing it", boot, req.By)
				}})
		case strings.HasPrefix(key, c.space.PurgeRequestPrefix()):
			pool, image, ok := keys.ParseNodeScoped(c.space.PurgeRequestPrefix(), key)
			vol := s.volumes[pool+"/"+image]
			if !ok || vol == nil || vol.CreateRevision != req.Of {
				acts = append(acts, c.dropRequest(kv, "no such disk record (purged already, or this names an earlier one)"))
			}
		}
	}
	return acts
}

// dropRequest deletes a request the leader will not act on, saying why.
func (c *Coordinator) dropRequest(kv *etcdutil.KV, why string) action {
	key := kv.Key
	return action{vm: "request", what: "drop request",
		conds: []etcdutil.Cmp{etcdutil.ModRev(kv.Key, kv.ModRevision)},
		ops:   []etcdutil.Op{etcdutil.OpDelete(kv.Key)},
		after: func() {
			c.log.Warn("request ignored", "key", key, "why", why)
			c.events.Record("request/"+strings.TrimPrefix(key, c.space.RequestPrefix()), "ignored", "%s", why)
		}}
}

// purgeRequested returns the purge request of a disk record, or nil.
func (s *snapshotView) purgeRequested(space keys.Space, pool, image string, rec *etcdutil.KV) *etcdutil.KV {
	kv := s.requests[space.PurgeRequest(pool, image)]
	if kv == nil || kv.Err != nil || kv.Obj.(*keys.Request).Of != rec.CreateRevision {
		return nil
	}
	return kv
}
