package agent

import (
	"context"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/agent/hypervisor"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

// evidence decides whether an unassigned domain may be destroyed. Only positive evidence counts:
//   - the VM's spec is gone, or was re-created as a newer VM (its uid, keys.SpecUID, is larger);
//   - its placement names another node with a newer epoch for the same uid.
//
// Nothing counts while the cluster id differs from the one the domain was made in or this agent
// joined: after etcd is wiped or replaced, absence means nothing. An etcd error is returned, never
// read as absence.
func (a *Agent) evidence(ctx context.Context, name string, dom *hypervisor.Domain) (gone bool, why string, err error) {
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	// One transaction reads the cluster record, spec and placement at the same revision. The
	// cluster id must come from this read, not from a cache: after a wipe, the informers of the
	// assignments and of the cluster record relist in no particular order.
	floor := etcdutil.MaxRev(a.caches())
	resp, err := a.cfg.Client.Txn(cctx).Then(
		clientv3.OpGet(a.space.Cluster()),
		clientv3.OpGet(a.space.VMSpec(name)),
		clientv3.OpGet(a.space.Placement(name)),
	).Commit()
	if err != nil {
		return false, "", fmt.Errorf("read spec and placement for evidence: %w", err)
	}
	if err := a.notRestored(floor, resp.Header.Revision); err != nil {
		return false, "", err
	}
	first := a.clusterID.Load()
	clusters := resp.Responses[0].GetResponseRange().Kvs
	if len(clusters) == 0 || first == nil {
		return false, "the cluster record is missing", nil
	}
	cl, err := keys.Decode[keys.Cluster](clusters[0].Value)
	if err != nil {
		return false, "the cluster record is unreadable: " + err.Error(), nil
	}
	if cl.ID != *first {
		return false, fmt.Sprintf("the cluster id changed from %s to %s since this agent joined", *first, cl.ID), nil
	}
	if dom.Cluster != "" && dom.Cluster != cl.ID {
		return false, fmt.Sprintf("the domain was made by cluster %s, this is %s", dom.Cluster, cl.ID), nil
	}
	places := resp.Responses[2].GetResponseRange().Kvs
	var p *keys.Placement
	if len(places) > 0 {
		if p, err = keys.Decode[keys.Placement](places[0].Value); err != nil {
			return false, "unreadable placement: " + err.Error(), nil
		}
	}
	if p != nil && p.Orphan && p.UID == dom.UID {
		return false, "an etcd restore lost its spec: kept as an orphan until an operator forgets it (herdctl vm forget " + name + ")", nil
	}
	specs := resp.Responses[1].GetResponseRange().Kvs
	if len(specs) == 0 {
		return true, "the VM was deleted", nil
	}
	spec := &keys.Record[keys.VMSpec]{CreateRevision: specs[0].CreateRevision}
	spec.Value, spec.Err = keys.Decode[keys.VMSpec](specs[0].Value) // unreadable: its CreateRevision
	if uid := keys.SpecUID(spec); uid != dom.UID {
		if uid > dom.UID {
			return true, fmt.Sprintf("the VM was deleted (its name now belongs to uid %d)", uid), nil
		}
		return false, fmt.Sprintf("the spec's uid %d is older than the domain's %d", uid, dom.UID), nil
	}
	if p == nil {
		return false, "the VM exists but has no placement", nil
	}
	if p.UID == dom.UID && p.Node != a.hwid && p.Epoch > dom.Epoch {
		return true, fmt.Sprintf("the VM moved to %s at epoch %d", p.Node, p.Epoch), nil
	}
	return false, fmt.Sprintf("placement is %s epoch %d, this domain epoch %d", p.Node, p.Epoch, dom.Epoch), nil
}

// notRestored checks the revision a read answered at against floor, the newest revision the caches
// reflected before the read was made: an older one means etcd went back in time, and nothing read
// from it may be acted on.
func (a *Agent) notRestored(floor, rev int64) error {
	if a.checkRevision(floor, rev) {
		a.onRegress(floor, rev)
	}
	if a.frozenNow() {
		return fmt.Errorf("%w: a restore recovery is under way", errNotSafe)
	}
	return nil
}
