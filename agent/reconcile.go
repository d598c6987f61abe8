package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/herdhq/herd/agent/hypervisor"
	"github.com/herdhq/herd/agent/volume"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

// errNotSafe means the agent could not prove it may act (lease not confirmed, assignment changed):
// the key is retried, and nothing was done.
var errNotSafe = errors.New("agent: not safe to act now")

// reconcile converges one VM: desired state from the cached assignment, actual state from libvirt.
func (a *Agent) reconcile(ctx context.Context, name string) error {
	start := time.Now()
	defer func() { a.metrics.reconcileSeconds.Observe(time.Since(start).Seconds()) }()

	kv := a.assigns.Get(a.space.Assign(a.hwid, name))
	dom, err := a.hv.Lookup(ctx, name)
	if err != nil {
		return fmt.Errorf("look up domain: %w", err)
	}
	if a.fenced() {
		return a.reconcileFenced(ctx, name, dom)
	}
	if dom != nil && !dom.Managed {
		if kv != nil {
			return a.report(ctx, name, kv, keys.StateError, "a domain of this name exists that herd did not create; rename or remove it")
		}
		return nil // not ours, not wanted: leave it alone
	}
	if kv == nil {
		return a.reconcileUnassigned(ctx, name, dom)
	}
	if kv.Err != nil {
		// The leader wrote something this agent can't read (a newer herd?). Touch nothing.
		a.log.Error("unreadable assignment", "vm", name, "error", kv.Err)
		return nil
	}
	asg := kv.Obj.(*keys.Assignment)
	if asg.Spec == nil {
		a.log.Error("assignment without a spec", "vm", name)
		return nil
	}

	if dom != nil && dom.UID != asg.UID {
		// Another incarnation of this name runs here. It goes only on the same positive evidence
		// as any domain: its spec deleted (the name now belongs to a newer uid).
		gone, why, err := a.evidence(ctx, name, dom)
		if err != nil {
			return err
		}
		if !gone {
			return a.report(ctx, name, kv, keys.StateError, fmt.Sprintf("a domain of VM uid %d runs here and is kept (%s); the assignment is for uid %d", dom.UID, why, asg.UID))
		}
		a.log.Info("removing the domain of a deleted VM whose name was reused", "vm", name, "old_uid", dom.UID, "uid", asg.UID, "why", why)
		if err := a.hv.Remove(ctx, name); err != nil {
			return fmt.Errorf("remove old incarnation: %w", err)
		}
		a.events.Record("vm/"+name, "removed", "domain of uid %d removed from %s: %s", dom.UID, a.hwid, why)
		dom = nil
	}
	if dom != nil && dom.Epoch > asg.Epoch {
		return a.report(ctx, name, kv, keys.StateError, fmt.Sprintf("the domain runs epoch %d, newer than the assignment's %d: not touching it", dom.Epoch, asg.Epoch))
	}

	if err := a.ensureDefined(ctx, name, kv, asg, dom); err != nil {
		_ = a.report(ctx, name, kv, keys.StateError, err.Error())
		return err
	}
	state := hypervisor.Stopped
	if dom != nil {
		state = dom.State
	}

	switch {
	case asg.Spec.WantsRunning() && state != hypervisor.Running:
		if err := a.preflight(ctx, kv); err != nil {
			return err
		}
		if err := a.hv.Start(ctx, name); err != nil {
			_ = a.report(ctx, name, kv, keys.StateError, "start: "+err.Error())
			return fmt.Errorf("start: %w", err)
		}
		a.log.Info("domain started", "vm", name, "uid", asg.UID, "epoch", asg.Epoch)
		a.events.Record("vm/"+name, "started", "on %s, epoch %d", a.hwid, asg.Epoch)
		state = hypervisor.Running
	case !asg.Spec.WantsRunning() && state == hypervisor.Running:
		if err := a.hv.Shutdown(ctx, name); err != nil {
			return fmt.Errorf("shutdown: %w", err)
		}
		a.events.Record("vm/"+name, "shutdown", "on %s", a.hwid)
		d, err := a.hv.Lookup(ctx, name)
		if err != nil {
			return err
		}
		if d != nil && d.State == hypervisor.Running {
			a.queue.AddAfter(name, time.Second)
			return a.report(ctx, name, kv, keys.StateStopping, "")
		}
		state = hypervisor.Stopped
	}
	return a.report(ctx, name, kv, herdState(state), "")
}

func herdState(s hypervisor.State) string {
	switch s {
	case hypervisor.Running:
		return keys.StateRunning
	case hypervisor.Stopped:
		return keys.StateStopped
	case hypervisor.Crashed:
		return keys.StateError
	}
	return string(s)
}

// ensureDefined makes the domain's definition match the assignment: disk present, XML defined with
// the current spec revision and epoch.
func (a *Agent) ensureDefined(ctx context.Context, name string, kv *etcdutil.KV, asg *keys.Assignment, dom *hypervisor.Domain) error {
	a.mu.Lock()
	definedRev, known := a.defined[name]
	a.mu.Unlock()
	if dom != nil && dom.Epoch == asg.Epoch && known && definedRev == asg.SpecRev {
		return nil
	}
	cluster, ok := a.currentCluster()
	if !ok {
		return fmt.Errorf("%w: the cluster record is missing or changed", errNotSafe)
	}
	spec := hypervisor.Spec{
		Cluster:   cluster,
		Name:      name,
		UUID:      asg.UUID,
		UID:       asg.UID,
		Epoch:     asg.Epoch,
		VCPUs:     asg.Spec.VCPUs,
		MemoryMiB: asg.Spec.MemoryMiB,
	}
	if d := asg.Spec.Disk; d != nil {
		att, err := a.cfg.Volumes.Ensure(ctx, volume.Volume{Pool: d.Pool, VM: name, UID: asg.UID, SizeGiB: d.SizeGiB, From: d.From})
		if err != nil {
			return fmt.Errorf("disk: %w", err)
		}
		spec.Disk = &att
	}
	if err := a.hv.Define(ctx, spec); err != nil {
		return fmt.Errorf("define domain: %w", err)
	}
	a.mu.Lock()
	a.defined[name] = asg.SpecRev
	a.mu.Unlock()
	return nil
}

// preflight proves, just before a domain starts, that this node may start it: the node's lease is
// alive and a linearizable read shows the very assignment the decision was made from. A node cut off
// from etcd fails here and starts nothing.
func (a *Agent) preflight(ctx context.Context, kv *etcdutil.KV) error {
	if !a.leaseAlive() {
		return fmt.Errorf("%w: node lease not confirmed", errNotSafe)
	}
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	resp, err := a.cfg.Client.Get(cctx, kv.Key) // linearizable by default
	if err != nil {
		return fmt.Errorf("%w: read assignment: %v", errNotSafe, err)
	}
	if len(resp.Kvs) == 0 || resp.Kvs[0].ModRevision != kv.ModRevision {
		return fmt.Errorf("%w: assignment changed since it was read", errNotSafe)
	}
	if !a.leaseAlive() {
		return fmt.Errorf("%w: node lease not confirmed", errNotSafe)
	}
	return nil
}

// reconcileFenced stops a domain of a fenced boot: the cluster declared this boot dead and its VMs
// may run elsewhere now. The definition stays, so that clearing the fence by hand resumes what is
// still assigned here; nothing is started and no status is written.
func (a *Agent) reconcileFenced(ctx context.Context, name string, dom *hypervisor.Domain) error {
	if dom == nil || !dom.Managed || dom.State == hypervisor.Stopped {
		return nil
	}
	if err := a.hv.Destroy(ctx, name); err != nil {
		return fmt.Errorf("stop domain of a fenced boot: %w", err)
	}
	a.log.Warn("stopped a domain of this fenced boot", "vm", name, "uid", dom.UID, "epoch", dom.Epoch)
	a.events.Record("vm/"+name, "stopped-fenced", "domain epoch %d stopped on fenced %s", dom.Epoch, a.hwid)
	return nil
}

// reconcileUnassigned handles a VM name with no assignment here: nothing to do, a domain to remove
// on positive evidence, or an orphan to keep and report.
func (a *Agent) reconcileUnassigned(ctx context.Context, name string, dom *hypervisor.Domain) error {
	if dom == nil {
		a.mu.Lock()
		delete(a.defined, name)
		a.mu.Unlock()
		return a.clearStatus(ctx, name)
	}
	gone, why, err := a.evidence(ctx, name, dom)
	if err != nil {
		return err
	}
	if gone && a.hold.Load() {
		gone, why = false, "removals are held: every assignment vanished at once ("+why+")"
	}
	if !gone {
		a.log.Warn("keeping a domain without assignment: no evidence it should go", "vm", name, "uid", dom.UID, "why", why)
		return a.reportOrphan(ctx, name, dom, why)
	}
	if err := a.hv.Remove(ctx, name); err != nil {
		return fmt.Errorf("remove domain: %w", err)
	}
	a.log.Info("domain removed", "vm", name, "uid", dom.UID, "why", why)
	a.events.Record("vm/"+name, "removed", "domain removed from %s: %s", a.hwid, why)
	a.mu.Lock()
	delete(a.defined, name)
	a.mu.Unlock()
	return a.clearStatus(ctx, name)
}
