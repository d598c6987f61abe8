// Package schema upgrades a cluster's keyspace in place to the layout this herd writes
// (keys.SchemaVersion). The leader runs it when elected, before its first round, in transactions
// guarded by its election key, so a running cluster upgrades by restarting its coordinators on the
// new herd (docs/keyspace.md). Every step is idempotent: a leader killed half-way leaves a keyspace
// the next one finishes.
//
// Schema 1 -> 2 (authority follows the keyspace):
//   - /herd/vms/<name>/placement and /problem move to /herd/placements/<name> and
//     /herd/problems/<name>, out of the operators' prefix;
//   - an operator's cordon and drain move from /herd/nodestate/<hwid> to /herd/nodespec/<hwid>; a
//     rollout's cordon stays in the node state as the rollout's id;
//   - /herd/rollout keeps the operator's request; the leader's progress moves to
//     /herd/rolloutstatus;
//   - a disk record's purge flag becomes a request under /herd/requests/purge/;
//   - /herd/cluster records schema 2.
package schema

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

// Upgrade brings the keyspace to keys.SchemaVersion and returns how many keys it rewrote. It does
// nothing when the cluster record says the schema is current.
func Upgrade(ctx context.Context, c *clientv3.Client, s keys.Space, g etcdutil.Guard, log hclog.Logger) (int, error) {
	u := &upgrader{c: c, s: s, g: g, log: log}
	cl, clRev, err := u.cluster(ctx)
	if err != nil || cl == nil || cl.Schema >= keys.SchemaVersion {
		return 0, err
	}
	log.Warn("upgrading the keyspace", "from", max(cl.Schema, 1), "to", keys.SchemaVersion)
	for _, step := range []func(context.Context) error{u.moveVMRecords, u.splitNodeStates, u.splitRollout, u.purgeRequests} {
		if err := step(ctx); err != nil {
			return u.n, err
		}
	}
	cl.Schema = keys.SchemaVersion
	if err := u.commit(ctx, "record the schema", []etcdutil.Cmp{etcdutil.ModRev(s.Cluster(), clRev)},
		[]etcdutil.Op{etcdutil.OpPut(s.Cluster(), keys.MustEncode(cl))}); err != nil {
		return u.n, err
	}
	log.Warn("keyspace upgraded", "schema", keys.SchemaVersion, "keys", u.n)
	return u.n, nil
}

type upgrader struct {
	c   *clientv3.Client
	s   keys.Space
	g   etcdutil.Guard
	log hclog.Logger
	n   int
}

func (u *upgrader) cluster(ctx context.Context) (*keys.Cluster, int64, error) {
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	resp, err := u.c.Get(cctx, u.s.Cluster())
	if err != nil {
		return nil, 0, fmt.Errorf("read the cluster record: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return nil, 0, nil
	}
	cl, err := keys.Decode[keys.Cluster](resp.Kvs[0].Value)
	if err != nil {
		return nil, 0, fmt.Errorf("the cluster record is unreadable: %w", err)
	}
	return cl, resp.Kvs[0].ModRevision, nil
}

// list reads a prefix in pages.
func (u *upgrader) list(ctx context.Context, prefix string) ([]*clientv3.GetResponse, error) {
	var out []*clientv3.GetResponse
	key, end := prefix, clientv3.GetPrefixRangeEnd(prefix)
	for {
		cctx, cancel := etcdutil.WithTimeout(ctx)
		resp, err := u.c.Get(cctx, key, clientv3.WithRange(end), clientv3.WithLimit(500))
		cancel()
		if err != nil {
			return nil, fmt.Errorf("list %s: %w", prefix, err)
		}
		out = append(out, resp)
		if !resp.More || len(resp.Kvs) == 0 {
			return out, nil
		}
		key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

func (u *upgrader) commit(ctx context.Context, what string, conds []etcdutil.Cmp, ops []etcdutil.Op) error {
	_, err := etcdutil.GuardedTxn(ctx, u.c, u.g, conds, ops)
	switch {
	case err == nil:
		u.n += len(ops)
		return nil
	case err == etcdutil.ErrConflict:
		// Changed under us (an operator, an old herd still running): the next election's upgrade
		// looks again, and until the schema is recorded nothing assumes it done.
		return fmt.Errorf("%s: %w; run the upgrade again (restart the coordinators)", what, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// moveVMRecords moves placements and problems out of /herd/vms/.
func (u *upgrader) moveVMRecords(ctx context.Context) error {
	pages, err := u.list(ctx, u.s.VMPrefix())
	if err != nil {
		return err
	}
	for _, p := range pages {
		for _, kv := range p.Kvs {
			key := string(kv.Key)
			name, part := keys.ParseV1VMRecord(u.s, key)
			var to string
			switch part {
			case "placement":
				to = u.s.Placement(name)
			case "problem":
				to = u.s.Problem(name)
			default:
				continue
			}
			cctx, cancel := etcdutil.WithTimeout(ctx)
			cur, err := u.c.Get(cctx, to, clientv3.WithCountOnly())
			cancel()
			if err != nil {
				return err
			}
			ops := []etcdutil.Op{etcdutil.OpDelete(key)}
			conds := []etcdutil.Cmp{etcdutil.ModRev(key, kv.ModRevision)}
			if cur.Count == 0 {
				ops = append(ops, etcdutil.OpPut(to, string(kv.Value)))
				conds = append(conds, etcdutil.CreateRev(to, 0))
			}
			if err := u.commit(ctx, "move "+key, conds, ops); err != nil {
				return err
			}
		}
	}
	return nil
}

// v1NodeState is what schema 1 kept in a node state besides what schema 2 keeps there.
type v1NodeState struct {
	Cordoned bool      `json:"cordoned"`
	Reason   string    `json:"reason"`
	Since    time.Time `json:"since"`
	Draining bool      `json:"draining"`
}

// splitNodeStates moves operators' cordons and drains into node specs; a rollout's cordon becomes
// the rollout's id in the node state.
func (u *upgrader) splitNodeStates(ctx context.Context) error {
	pages, err := u.list(ctx, u.s.NodeStatePrefix())
	if err != nil {
		return err
	}
	for _, p := range pages {
		for _, kv := range p.Kvs {
			hwid, ok := keys.ParseLeaf(u.s.NodeStatePrefix(), string(kv.Key))
			if !ok {
				continue
			}
			var old v1NodeState
			if json.Unmarshal(kv.Value, &old) != nil {
				continue // unreadable: left for an operator, as the leader leaves it
			}
			ns, err := keys.Decode[keys.NodeState](kv.Value)
			if err != nil {
				continue
			}
			had := false
			for _, f := range []string{"cordoned", "reason", "since", "draining"} {
				if _, ok := ns.Extra[f]; ok {
					delete(ns.Extra, f)
					had = true
				}
			}
			if !had {
				continue
			}
			conds := []etcdutil.Cmp{etcdutil.ModRev(string(kv.Key), kv.ModRevision)}
			var ops []etcdutil.Op
			if id, isRollout := strings.CutPrefix(old.Reason, "rollout "); isRollout && old.Cordoned {
				id, _, _ = strings.Cut(id, " ")
				ns.Rollout = id
			} else if old.Cordoned || old.Draining {
				spec := keys.NodeSpec{Cordoned: old.Cordoned, Reason: old.Reason, Since: old.Since, Drain: old.Draining}
				conds = append(conds, etcdutil.CreateRev(u.s.NodeSpec(hwid), 0))
				ops = append(ops, etcdutil.OpPut(u.s.NodeSpec(hwid), keys.MustEncode(&spec)))
			}
			if !old.Draining {
				ns.Drained = false
			}
			ops = append(ops, etcdutil.OpPut(string(kv.Key), keys.MustEncode(ns)))
			if err := u.commit(ctx, "split node state "+hwid, conds, ops); err != nil {
				return err
			}
		}
	}
	return nil
}

// splitRollout leaves the operator's request in /herd/rollout and moves the leader's progress to
// /herd/rolloutstatus.
func (u *upgrader) splitRollout(ctx context.Context) error {
	cctx, cancel := etcdutil.WithTimeout(ctx)
	resp, err := u.c.Get(cctx, u.s.Rollout())
	cancel()
	if err != nil || len(resp.Kvs) == 0 {
		return err
	}
	kv := resp.Kvs[0]
	var old struct {
		State   string                       `json:"state"`
		Reason  string                       `json:"reason"`
		Updated time.Time                    `json:"updated"`
		Ended   time.Time                    `json:"ended"`
		Per     map[string]*keys.RolloutNode `json:"per_node"`
	}
	if json.Unmarshal(kv.Value, &old) != nil || old.Per == nil {
		return nil // unreadable, or already a request
	}
	req, err := keys.Decode[keys.Rollout](kv.Value)
	if err != nil {
		return nil
	}
	st := keys.RolloutStatus{ID: req.ID, State: old.State, Reason: old.Reason, Nodes: req.Nodes, Per: old.Per, Updated: old.Updated, Ended: old.Ended}
	for _, f := range []string{"reason", "updated", "ended", "per_node"} {
		delete(req.Extra, f)
	}
	for _, p := range st.Per {
		delete(p.Extra, "was_cordoned") // the operator's cordon is the node spec's now, untouched
	}
	switch old.State {
	case keys.RolloutRunning, keys.RolloutPaused, keys.RolloutAborting:
		// A pause the leader made (a node failed) is resumed like one an operator made.
		req.State = old.State
	default:
		req.State = keys.RolloutRunning // done or aborted: the status says so
	}
	return u.commit(ctx, "split the rollout", []etcdutil.Cmp{etcdutil.ModRev(u.s.Rollout(), kv.ModRevision)},
		[]etcdutil.Op{etcdutil.OpPut(u.s.Rollout(), keys.MustEncode(req)), etcdutil.OpPut(u.s.RolloutStatus(), keys.MustEncode(&st))})
}

// purgeRequests turns disk records' purge flags into purge requests.
func (u *upgrader) purgeRequests(ctx context.Context) error {
	pages, err := u.list(ctx, u.s.VolumeRoot())
	if err != nil {
		return err
	}
	for _, p := range pages {
		for _, kv := range p.Kvs {
			pool, image, ok := keys.ParseNodeScoped(u.s.VolumeRoot(), string(kv.Key))
			if !ok {
				continue
			}
			rec, err := keys.Decode[keys.VolumeRecord](kv.Value)
			if err != nil {
				continue
			}
			raw, flagged := rec.Extra["purge"]
			if !flagged {
				continue
			}
			delete(rec.Extra, "purge")
			ops := []etcdutil.Op{etcdutil.OpPut(string(kv.Key), keys.MustEncode(rec))}
			if string(raw) == "true" {
				req := keys.Request{Of: kv.CreateRevision, By: "schema upgrade", At: time.Now().UTC()}
				ops = append(ops, etcdutil.OpPut(u.s.PurgeRequest(pool, image), keys.MustEncode(&req)))
			}
			if err := u.commit(ctx, "purge request of "+pool+"/"+image, []etcdutil.Cmp{etcdutil.ModRev(string(kv.Key), kv.ModRevision)}, ops); err != nil {
				return err
			}
		}
	}
	return nil
}
