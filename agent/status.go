package agent

import (
	"context"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/agent/hypervisor"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

// report writes the VM's status, guarded by the assignment it was computed from: if the leader
// changed the assignment meanwhile, the write is dropped and the new assignment is reconciled.
func (a *Agent) report(ctx context.Context, name string, kv *assignRec, state, msg string) error {
	asg := kv.Value
	st := keys.VMStatus{State: state, Message: msg}
	if asg != nil {
		st.UID, st.Epoch, st.UUID = asg.UID, asg.Epoch, asg.UUID
	}
	return a.reportStatus(ctx, name, kv, st)
}

// reportStatus writes st guarded by the assignment kv.
func (a *Agent) reportStatus(ctx context.Context, name string, kv *assignRec, st keys.VMStatus) error {
	if asg := kv.Value; asg != nil && st.UUID == "" {
		st.UUID = asg.UUID // the leader can restore a placement from reports alone
	}
	return a.writeStatus(ctx, name, etcdutil.ModRev(kv.Key, kv.ModRevision), st)
}

// reportOrphan records a domain kept without an assignment, guarded by the assignment's absence.
func (a *Agent) reportOrphan(ctx context.Context, name string, dom *hypervisor.Domain, why string) error {
	st := keys.VMStatus{UID: dom.UID, Epoch: dom.Epoch, UUID: dom.UUID, Domain: string(dom.State), State: keys.StateOrphan, Message: fmt.Sprintf("domain %s kept: %s", dom.State, why)}
	return a.writeStatus(ctx, name, etcdutil.CreateRev(a.space.Assign(a.hwid, name), 0), st)
}

func sameStatus(a, b keys.VMStatus) bool {
	return a.UID == b.UID && a.Epoch == b.Epoch && a.State == b.State && a.Message == b.Message && a.UUID == b.UUID &&
		a.Domain == b.Domain && a.Migration == b.Migration && a.MigrationResult == b.MigrationResult
}

func (a *Agent) writeStatus(ctx context.Context, name string, guard clientv3.Cmp, st keys.VMStatus) error {
	a.mu.Lock()
	prev, had := a.reported[name]
	a.mu.Unlock()
	if had && sameStatus(prev, st) {
		return nil
	}
	st.Since = time.Now().UTC()
	if had && prev.State == st.State && prev.UID == st.UID {
		st.Since = prev.Since
	}
	b, err := keys.Encode(&st)
	if err != nil {
		return err
	}
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	resp, err := a.cfg.Client.Txn(cctx).If(guard).Then(clientv3.OpPut(a.space.Status(a.hwid, name), string(b))).Commit()
	a.nospace.Observe(err)
	if err != nil {
		return fmt.Errorf("write status: %w", err)
	}
	if !resp.Succeeded {
		a.queue.Add(name) // the assignment moved on; decide again from the new one
		return nil
	}
	a.mu.Lock()
	a.reported[name] = st
	a.mu.Unlock()
	return nil
}

// clearStatus deletes the VM's status once no domain and no assignment remain.
func (a *Agent) clearStatus(ctx context.Context, name string) error {
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	_, err := a.cfg.Client.Txn(cctx).
		If(etcdutil.CreateRev(a.space.Assign(a.hwid, name), 0)).
		Then(clientv3.OpDelete(a.space.Status(a.hwid, name))).
		Commit()
	if err != nil {
		return fmt.Errorf("clear status: %w", err)
	}
	a.mu.Lock()
	delete(a.reported, name)
	a.mu.Unlock()
	return nil
}
