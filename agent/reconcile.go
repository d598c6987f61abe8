package agent

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/agent/hostnet"
	"github.com/herdhq/herd/agent/hypervisor"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/volume"
)

// errNotSafe means the agent could not prove it may act (lease not confirmed, assignment changed):
// the key is retried, and nothing was done.
var errNotSafe = errors.New("agent: not safe to act now")

// reconcile converges one VM: desired state from the cached assignment, actual state from libvirt.
func (a *Agent) reconcile(ctx context.Context, name string) error {
	start := time.Now()
	defer func() { a.metrics.reconcileSeconds.Observe(time.Since(start).Seconds()) }()
	if a.frozenNow() {
		return nil // a restore recovery: nothing is acted on (recovery.go); the thaw requeues all
	}

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
	asg := kv.Value
	if asg.Withdraw && (dom == nil || dom.UID == asg.UID) {
		return a.reconcileWithdrawn(ctx, name, kv, asg, dom) // needs no spec
	}
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
	if asg.Withdraw {
		return a.reconcileWithdrawn(ctx, name, kv, asg, dom)
	}
	if asg.Incoming != "" {
		return a.reconcileIncoming(ctx, name, kv, asg, dom)
	}
	if dom != nil && dom.Epoch > asg.Epoch {
		return a.report(ctx, name, kv, keys.StateError, fmt.Sprintf("the domain runs epoch %d, newer than the assignment's %d: not touching it", dom.Epoch, asg.Epoch))
	}
	if asg.Outgoing != nil {
		return a.reconcileOutgoing(ctx, name, kv, asg, dom)
	}

	state := hypervisor.Stopped
	if dom != nil {
		state = dom.State
	}
	// A raised restart generation: power off first (the definition keeps the old generation so
	// that an agent restarted meanwhile still knows), then start anew below.
	wantRestart := dom != nil && dom.Restarts < asg.Spec.Restarts
	if wantRestart && state == hypervisor.Running {
		done, err := a.powerOff(ctx, name)
		if err != nil || !done {
			if err == nil {
				err = a.report(ctx, name, kv, keys.StateStopping, "restarting")
			}
			return err
		}
		state = hypervisor.Stopped
	}
	restarts := asg.Spec.Restarts
	if dom != nil && state == hypervisor.Running {
		restarts = dom.Restarts // a running domain keeps the generation it was started with
	}
	if err := a.ensureDefined(ctx, name, asg, dom, restarts); err != nil {
		_ = a.report(ctx, name, kv, keys.StateError, err.Error())
		return err
	}

	switch {
	case asg.Spec.WantsRunning() && state != hypervisor.Running:
		if wait, crashes := a.crashGate(name, dom, time.Now()); wait > 0 {
			a.queue.AddAfter(name, wait)
			st := keys.StateStarting // not a failure: it starts again after the backoff
			if crashes >= crashLoop {
				st = keys.StateCrashLoop
			}
			return a.report(ctx, name, kv, st, fmt.Sprintf("crashed %d times in %s; starting again at %s", crashes, crashWindow,
				time.Now().Add(wait).UTC().Format(time.TimeOnly)))
		}
		if err := a.waitFence(ctx, asg); err != nil {
			return err
		}
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
		done, err := a.powerOff(ctx, name)
		if err != nil {
			return err
		}
		if !done {
			return a.report(ctx, name, kv, keys.StateStopping, "")
		}
		state = hypervisor.Stopped
	}
	if state == hypervisor.Running && asg.Spec.WantsRunning() {
		a.sawRunning(name, asg.UID, asg.Epoch) // the domain is defined as the assignment says
	}
	return a.report(ctx, name, kv, herdState(state), "")
}

// powerOff asks the guest to shut down through ACPI and reports whether it is off. A guest that
// ignores the request for ShutdownTimeout is destroyed: the fallback is logged and recorded, because
// a guest that had to be pulled may have lost writes.
func (a *Agent) powerOff(ctx context.Context, name string) (bool, error) {
	a.mu.Lock()
	since, asked := a.stopping[name]
	a.mu.Unlock()
	if !asked {
		if err := a.hv.Shutdown(ctx, name); err != nil {
			return false, fmt.Errorf("shutdown: %w", err)
		}
		since = time.Now()
		a.mu.Lock()
		a.stopping[name] = since
		a.mu.Unlock()
		a.log.Info("asked the guest to power off (ACPI)", "vm", name)
		a.events.Record("vm/"+name, "shutdown", "ACPI power button on %s", a.hwid)
	}
	d, err := a.hv.Lookup(ctx, name)
	if err != nil {
		return false, err
	}
	if d == nil || d.State != hypervisor.Running {
		a.mu.Lock()
		delete(a.stopping, name)
		delete(a.ran, name)
		a.mu.Unlock()
		return true, nil
	}
	if time.Since(since) < a.cfg.ShutdownTimeout {
		a.queue.AddAfter(name, time.Second)
		return false, nil
	}
	if err := a.hv.Destroy(ctx, name); err != nil {
		return false, fmt.Errorf("destroy after ACPI timeout: %w", err)
	}
	a.mu.Lock()
	delete(a.stopping, name)
	delete(a.ran, name)
	a.mu.Unlock()
	a.log.Warn("guest ignored the ACPI shutdown: destroyed (fallback)", "vm", name, "waited", a.cfg.ShutdownTimeout)
	a.events.Record("vm/"+name, "destroyed", "guest did not power off within %s of the ACPI request; destroyed", a.cfg.ShutdownTimeout)
	return true, nil
}

// reconcileWithdrawn gives a VM back to the leader: its uid may be running elsewhere (the leader's
// records disagreed, someone deleted or wrote them by hand), so the domain is stopped at once, with
// no ACPI grace (two writers on one disk do harm by the second), and undefined; nothing is started.
// The disk stays: it lives on shared storage and belongs to the VM wherever it runs.
func (a *Agent) reconcileWithdrawn(ctx context.Context, name string, kv *assignRec, asg *keys.Assignment, dom *hypervisor.Domain) error {
	if dom != nil && dom.UID == asg.UID {
		if err := a.hv.Remove(ctx, name); err != nil {
			return fmt.Errorf("remove withdrawn domain: %w", err)
		}
		a.mu.Lock()
		delete(a.defined, name)
		delete(a.stopping, name)
		delete(a.ran, name)
		a.mu.Unlock()
		a.log.Warn("domain withdrawn by the leader: stopped and removed", "vm", name, "uid", dom.UID, "epoch", dom.Epoch, "state", dom.State)
		a.events.Record("vm/"+name, "withdrawn", "domain epoch %d (%s) stopped and removed from %s at the leader's request", dom.Epoch, dom.State, a.hwid)
	}
	return a.reportStatus(ctx, name, kv, keys.VMStatus{UID: asg.UID, Epoch: asg.Epoch, UUID: asg.UUID, State: keys.StateWithdrawn})
}

// reconcileIncoming handles a migration target: expect the domain, never define or start it, and
// say whether it has arrived and runs.
func (a *Agent) reconcileIncoming(ctx context.Context, name string, kv *assignRec, asg *keys.Assignment, dom *hypervisor.Domain) error {
	st := keys.VMStatus{UID: asg.UID, Epoch: asg.Epoch, State: keys.StateIncoming, Migration: asg.Incoming}
	// The arriving domain's CD-ROM names this path: QEMU here opens it when the migration starts.
	if err := a.ensureNetworks(asg); err != nil {
		st.State, st.Message = keys.StateError, err.Error()
		return a.reportStatus(ctx, name, kv, st)
	}
	if err := a.guard(ctx, false); err != nil {
		st.State, st.Message = keys.StateError, "guard: "+err.Error()
		return a.reportStatus(ctx, name, kv, st)
	}
	if _, err := a.ensureSeed(name, asg); err != nil {
		st.State, st.Message = keys.StateError, "seed: "+err.Error()
		return a.reportStatus(ctx, name, kv, st)
	}
	if dom != nil && dom.UID == asg.UID && dom.State == hypervisor.Running {
		st.State, st.Epoch = keys.StateRunning, dom.Epoch
	}
	return a.reportStatus(ctx, name, kv, st)
}

// reconcileOutgoing handles a migration source: move the domain (live, or by shutting it down for
// a restart elsewhere) once, and report the outcome. Nothing is started here while it is set.
func (a *Agent) reconcileOutgoing(ctx context.Context, name string, kv *assignRec, asg *keys.Assignment, dom *hypervisor.Domain) error {
	out := asg.Outgoing
	st := keys.VMStatus{UID: asg.UID, Epoch: asg.Epoch, Migration: out.ID}
	a.mu.Lock()
	result, done := a.outcomes[out.ID]
	a.mu.Unlock()
	switch {
	case done:
		st.MigrationResult = result
		st.State = keys.StateStopped
		if dom != nil && dom.State == hypervisor.Running {
			st.State = keys.StateRunning
		}
		return a.reportStatus(ctx, name, kv, st)
	case dom == nil && out.Mode == keys.ModeRestart:
		// Nothing runs here to stop: this node rebooted since the move began (a reboot ends every
		// guest), or never started it. A restart move never puts the domain anywhere else, so
		// the VM runs nowhere and may start on the target. Without this answer the leader waits
		// for an eviction that can never come while this node lives on its new boot.
		a.setOutcome(out.ID, keys.MigrationEvicted)
		st.State, st.MigrationResult, st.Message = keys.StateStopped, keys.MigrationEvicted, "no domain here: nothing to stop"
		return a.reportStatus(ctx, name, kv, st)
	case dom == nil:
		// A live move's domain may be on the target already (the leader commits from the
		// target's report); saying "failed" here could bring it back while it runs there.
		st.State, st.Message = keys.StateStopped, "no domain here to move"
		return a.reportStatus(ctx, name, kv, st)
	}
	if err := a.preflight(ctx, kv); err != nil {
		return err
	}
	if out.Mode == keys.ModeRestart || dom.State != hypervisor.Running {
		off, err := a.powerOff(ctx, name)
		if err != nil {
			return err
		}
		if !off {
			st.State = keys.StateStopping
			return a.reportStatus(ctx, name, kv, st)
		}
		a.setOutcome(out.ID, keys.MigrationEvicted)
		st.State, st.MigrationResult = keys.StateStopped, keys.MigrationEvicted
		a.events.Record("vm/"+name, "evicted", "stopped on %s to start on %s", a.hwid, out.To)
		return a.reportStatus(ctx, name, kv, st)
	}

	select {
	case a.migrations <- struct{}{}:
	default:
		a.queue.AddAfter(name, time.Second) // at the per-node limit; try again soon
		return nil
	}
	defer func() { <-a.migrations }()
	st.State = keys.StateMigrating
	_ = a.reportStatus(ctx, name, kv, st)
	start := time.Now()
	mctx, cancel := context.WithTimeout(ctx, a.cfg.MigrationTimeout)
	err := a.hv.Migrate(mctx, name, out.PeerURI, out.Address)
	cancel()
	if err != nil {
		a.setOutcome(out.ID, keys.MigrationFailed+": "+err.Error())
		a.log.Error("live migration failed; the VM keeps running here", "vm", name, "to", out.To, "error", err)
		a.events.Record("vm/"+name, "migration-failed", "to %s: %v", out.To, err)
		st.State, st.MigrationResult = keys.StateRunning, keys.MigrationFailed+": "+err.Error()
		return a.reportStatus(ctx, name, kv, st)
	}
	a.setOutcome(out.ID, keys.MigrationDone)
	a.log.Info("live migration done", "vm", name, "to", out.To, "took", time.Since(start).Round(time.Millisecond))
	a.events.Record("vm/"+name, "migrated", "from %s to %s in %s", a.hwid, out.To, time.Since(start).Round(time.Millisecond))
	st.State, st.MigrationResult = keys.StateStopped, keys.MigrationDone
	return a.reportStatus(ctx, name, kv, st)
}

// osdmapWaiter is implemented by volume backends that can wait for an osdmap epoch (rbd).
type osdmapWaiter interface {
	WaitOSDMap(ctx context.Context, epoch int64) error
}

// waitFence holds the start of a VM moved off a node fenced by Ceph blocklisting until this node's
// cluster handle has seen the osdmap epoch of the blocklist entry: only then is the old writer
// surely locked out of the disk this VM is about to write.
func (a *Agent) waitFence(ctx context.Context, asg *keys.Assignment) error {
	if asg.MinOSDMapEpoch == 0 {
		return nil
	}
	w, ok := a.cfg.Volumes.(osdmapWaiter)
	if !ok {
		return nil
	}
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := w.WaitOSDMap(wctx, asg.MinOSDMapEpoch); err != nil {
		return fmt.Errorf("%w: waiting for osdmap epoch %d (the fence of the VM's old node): %v", errNotSafe, asg.MinOSDMapEpoch, err)
	}
	return nil
}

func (a *Agent) setOutcome(id, result string) {
	a.mu.Lock()
	a.outcomes[id] = result
	a.mu.Unlock()
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
// the current spec revision, epoch and restart generation.
func (a *Agent) ensureDefined(ctx context.Context, name string, asg *keys.Assignment, dom *hypervisor.Domain, restarts int) error {
	a.mu.Lock()
	definedRev, known := a.defined[name]
	a.mu.Unlock()
	if dom != nil && dom.Epoch == asg.Epoch && dom.Restarts == restarts && known && definedRev == asg.SpecRev {
		return nil
	}
	cluster, ok := a.currentCluster()
	if !ok {
		return fmt.Errorf("%w: the cluster record is missing or changed", errNotSafe)
	}
	sp := asg.Spec
	spec := hypervisor.Spec{
		Cluster:   cluster,
		Name:      name,
		UUID:      asg.UUID,
		UID:       asg.UID,
		Epoch:     asg.Epoch,
		Restarts:  restarts,
		VCPUs:     sp.VCPUs,
		MemoryMiB: sp.MemoryMiB,
	}
	if a.cfg.ConsoleDir != "" {
		spec.Console = filepath.Join(a.cfg.ConsoleDir, name+".log")
	}
	if b := sp.Boot; b != nil {
		var err error
		if spec.Kernel, err = a.bootFile(b.Kernel); err != nil {
			return fmt.Errorf("boot.kernel: %w", err)
		}
		if b.Initrd != "" {
			if spec.Initrd, err = a.bootFile(b.Initrd); err != nil {
				return fmt.Errorf("boot.initrd: %w", err)
			}
		}
		spec.Cmdline = b.Cmdline
	}
	for i, n := range sp.Networks {
		if i >= len(asg.MACs) {
			return fmt.Errorf("network %d has no MAC in the assignment", i)
		}
		nic := hypervisor.NIC{Bridge: n.Bridge, Model: n.Model, MAC: asg.MACs[i]}
		if n.Network != "" {
			// The leader resolved the network when it gave the NIC its address.
			if i >= len(asg.NICs) || asg.NICs[i] == nil {
				return fmt.Errorf("NIC %d on network %s has no address in the assignment", i, n.Network)
			}
			// A tap of a known name: the guard (hostnet) names it before QEMU makes it.
			nic.Bridge, nic.Target = asg.NICs[i].Bridge, hostnet.TapName(asg.UID, i)
		}
		spec.NICs = append(spec.NICs, nic)
	}
	for _, d := range sp.DiskList() {
		// From only as the spec gives it: an image the leader resolved was cloned by the leader.
		att, err := a.cfg.Volumes.Attach(ctx, volume.Volume{Pool: d.Pool, VM: name, UID: asg.UID, Disk: d.Name, SizeGiB: d.SizeGiB, From: d.From})
		if err != nil {
			return fmt.Errorf("disk %s: %w", d.Name, err)
		}
		spec.Disks = append(spec.Disks, att)
	}
	if err := a.ensureNetworks(asg); err != nil {
		return err
	}
	if err := a.guard(ctx, false); err != nil {
		return fmt.Errorf("guard: %w", err)
	}
	seed, err := a.ensureSeed(name, asg)
	if err != nil {
		return fmt.Errorf("seed: %w", err)
	}
	spec.Seed = seed
	if err := a.hv.Define(ctx, spec); err != nil {
		return fmt.Errorf("define domain: %w", err)
	}
	a.mu.Lock()
	a.defined[name] = asg.SpecRev
	a.mu.Unlock()
	return nil
}

// bootFile resolves a direct kernel boot path and refuses it unless it lies in the node's boot
// directory once every symlink is resolved: a spec must not be able to load any file of the
// hypervisor (its credentials, say) into a guest.
func (a *Agent) bootFile(p string) (string, error) {
	if err := keys.ValidateBootPath(p); err != nil {
		return "", err
	}
	if a.cfg.BootDir == "" {
		return "", fmt.Errorf("refused: this node allows no direct kernel boot (no --boot-dir)")
	}
	dir, err := filepath.EvalSymlinks(a.cfg.BootDir)
	if err != nil {
		return "", fmt.Errorf("refused: boot directory %s: %w", a.cfg.BootDir, err)
	}
	real, err := filepath.EvalSymlinks(p)
	if err != nil {
		return "", fmt.Errorf("refused: %w", err)
	}
	if !keys.InDir(real, dir) {
		return "", fmt.Errorf("refused: %s resolves to %s, outside this node's boot directory %s", p, real, a.cfg.BootDir)
	}
	return real, nil
}

// preflight proves, just before a domain starts, that this node may start it: the node's lease is
// alive and a linearizable read shows the very assignment the decision was made from. A node cut off
// from etcd fails here and starts nothing.
//
// The same read shows that no fence record of this node names another boot. Such a record is
// what a leader moves this node's VMs on; a boot that started VMs while it stood (registered while
// no leader was there to drop it) would run them unfenced when the record moved them. The leader
// drops an earlier boot's record once it sees this boot registered, so this boot waits for that,
// and every move names the boot that hosts the VMs.
func (a *Agent) preflight(ctx context.Context, kv *assignRec) error {
	if !a.leaseAlive() {
		return fmt.Errorf("%w: node lease not confirmed", errNotSafe)
	}
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	floor := etcdutil.MaxRev(a.caches())
	tx, err := a.cfg.Client.Txn(cctx).Then( // linearizable
		clientv3.OpGet(kv.Key),
		clientv3.OpGet(a.space.FencePrefix(a.hwid), clientv3.WithPrefix(), clientv3.WithKeysOnly()),
	).Commit()
	if err != nil {
		return fmt.Errorf("%w: read assignment: %v", errNotSafe, err)
	}
	if err := a.notRestored(floor, tx.Header.Revision); err != nil {
		return err
	}
	resp := tx.Responses[0].GetResponseRange()
	if len(resp.Kvs) == 0 || resp.Kvs[0].ModRevision != kv.ModRevision {
		return fmt.Errorf("%w: assignment changed since it was read", errNotSafe)
	}
	if fences := tx.Responses[1].GetResponseRange().Kvs; len(fences) > 0 {
		boot := "?"
		if _, b, ok := keys.ParseNodeScoped(a.space.FenceRoot(), string(fences[0].Key)); ok {
			boot = b
		}
		if boot == a.cfg.BootID {
			return fmt.Errorf("%w: this boot is fenced", errNotSafe)
		}
		return fmt.Errorf("%w: a fence record of this node's boot %s still stands; the leader drops it once it sees this boot registered", errNotSafe, boot)
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
	a.stoppedOnPurpose(name)
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
		delete(a.ran, name)
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
