// Package agent is herd's per-hypervisor daemon. It registers the node under an etcd lease with its
// facts, watches the node's own assignments (/herd/assign/<hwid>/), converges libvirt to them and
// reports what it observes under /herd/status/<hwid>/.
//
// Safety rules, each enforced in one place:
//   - it starts a domain only after a linearizable read shows the assignment unchanged while its
//     lease is alive (preflight), so a partitioned agent never starts anything;
//   - it destroys a domain only on positive evidence that the VM is gone or moved on (evidence.go);
//     etcd being unreachable, or keys vanishing with the cluster id changed, is never evidence;
//   - every status write compares the assignment it was computed from.
package agent

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/agent/hostnet"
	"github.com/herdhq/herd/agent/hypervisor"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/events"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/volume"
	"github.com/herdhq/herd/lib/workqueue"
)

// Config is everything an agent needs; cmd/herd fills it from flags, `herd dev` from its own.
type Config struct {
	Client *clientv3.Client
	// EtcdUser is the etcd user Client authenticates as (its certificate's CN), recorded in events.
	EtcdUser   string
	Space      keys.Space
	HWID       string
	BootID     string
	Hypervisor hypervisor.Hypervisor
	Volumes    volume.Backend

	// LeaseTTL is how long the node outlives a silent agent. Default 10 s.
	LeaseTTL time.Duration
	// Resync is the period of the full comparison that catches anything a watch missed. Default 30 s.
	Resync time.Duration
	// Workers reconcile different VMs in parallel. Default 4.
	Workers int

	// CPUs and MemoryMiB override what libvirt reports (0: use libvirt's).
	CPUs      int
	MemoryMiB int64
	// ReservedMemoryMiB is kept for the host and never given to VMs.
	ReservedMemoryMiB int64
	Addresses         keys.Addresses
	// MigrationURI is the libvirt URI other nodes' libvirtd reach this one at (qemu+tcp://addr/system).
	MigrationURI string
	// BootDir is the only directory direct kernel boot files may come from (symlinks resolved);
	// "" allows no direct kernel boot.
	BootDir string
	// ConsoleDir holds each VM's serial console log, <dir>/<vm>.log; keep the path the same on every
	// node (a shared filesystem) and a console survives migrations in one file.
	ConsoleDir string
	// SeedDir is where VMs' cloud-init seeds are built (seed.go); "" builds none.
	SeedDir string
	// Uplink is the interface VLAN networks are tagged on (agent/hostnet makes their bridges);
	// "" carries none, and the leader places no VM on a VLAN network here.
	Uplink string
	// RevisionFile keeps the newest etcd revision this agent saw (etcdutil.Watermark), so that an
	// agent restarted while etcd was restored from a backup still notices it went back. Keep it
	// where a restart of the agent finds it (/run on a netbooted node); "" keeps none.
	RevisionFile string
	// MaxMigrations bounds concurrent outgoing migrations. Default 2.
	MaxMigrations int
	// ShutdownTimeout is how long a guest gets to power off through ACPI before it is destroyed.
	// Default 60 s.
	ShutdownTimeout time.Duration
	// MigrationTimeout aborts a migration that takes longer. Default 10 min.
	MigrationTimeout time.Duration
	// CrashBackoff is the wait before starting a crashed guest again after its first crash in
	// ten minutes; it doubles with each further one, up to 5 min. Default 1 s.
	CrashBackoff time.Duration
	// DiskPaths are filesystems the node needs room on (console logs, local disks): while one has
	// less than DiskMinFree free (default DefaultDiskMinFree), the node takes no new VMs.
	DiskPaths   []string
	DiskMinFree uint64
	// CephUser and CephKey, when set, become the libvirt secret QEMU reaches RBD disks with.
	CephUser, CephKey string
	// RebootCommand is what a reboot node command runs (sh -c). Default "systemctl reboot".
	RebootCommand string
	// Reboot, when set, replaces RebootCommand: herd dev's simulated machines reboot in-process
	// (a developer's rollout must never run `systemctl reboot` on the developer's machine).
	Reboot    func(ctx context.Context) error
	Hostname  string
	Image     string
	Version   string
	StatusURL string
	// ConsoleURL is where this agent serves its VMs' consoles ("": nowhere).
	ConsoleURL string

	Log      hclog.Logger
	Registry prometheus.Registerer
}

func (c *Config) defaults() error {
	if c.Client == nil || c.Hypervisor == nil || c.Volumes == nil {
		return errors.New("agent: Client, Hypervisor and Volumes are required")
	}
	if c.HWID == "" {
		return errors.New("agent: HWID is required")
	}
	if c.BootID == "" {
		return errors.New("agent: BootID is required")
	}
	if c.LeaseTTL == 0 {
		c.LeaseTTL = 10 * time.Second
	}
	if c.LeaseTTL < 2*time.Second {
		return fmt.Errorf("agent: lease TTL %s is below etcd's useful minimum of 2s", c.LeaseTTL)
	}
	if c.Resync == 0 {
		c.Resync = 30 * time.Second
	}
	if c.Workers == 0 {
		c.Workers = 4
	}
	if c.MaxMigrations == 0 {
		c.MaxMigrations = 2
	}
	if c.ShutdownTimeout == 0 {
		c.ShutdownTimeout = time.Minute
	}
	if c.MigrationTimeout == 0 {
		c.MigrationTimeout = 10 * time.Minute
	}
	if c.CrashBackoff == 0 {
		c.CrashBackoff = time.Second
	}
	if c.DiskMinFree == 0 {
		c.DiskMinFree = DefaultDiskMinFree
	}
	if c.RebootCommand == "" {
		c.RebootCommand = "systemctl reboot"
	}
	if c.Log == nil {
		c.Log = hclog.NewNullLogger()
	}
	if c.Registry == nil {
		c.Registry = prometheus.NewRegistry()
	}
	return nil
}

// Agent is one node's daemon. Create it with New and run it with Run.
type Agent struct {
	cfg     Config
	space   keys.Space
	hwid    string
	log     hclog.Logger
	hv      hypervisor.Hypervisor
	events  *events.Recorder
	queue   *workqueue.Queue
	assigns *etcdutil.Typed[keys.Assignment]
	cluster *etcdutil.Typed[keys.Cluster]
	fences  *etcdutil.Typed[keys.Fence]
	cmdsInf *etcdutil.Typed[keys.NodeCommand]
	cmds    chan *cmdRec
	metrics *metrics
	// node is the record this agent registers (under its current lease).
	node atomic.Pointer[keys.Node]
	// hold is set when every assignment vanished at once while domains ran: until a new
	// assignment arrives (or the agent restarts), no unassigned domain is destroyed, evidence or
	// not, because a mistake or a bug that deleted the keys is likelier than the operator deleting
	// every VM of a node in one go.
	hold atomic.Bool

	// aliveUntil is the unix-nano time until which this agent's lease is surely alive; 0 when it
	// has no lease.
	aliveUntil atomic.Int64
	leaseID    atomic.Int64
	// clusterID is the first cluster id this agent saw; a different one later means etcd was
	// replaced and nothing is evidence of anything.
	clusterID atomic.Pointer[string]

	migrations chan struct{} // semaphore of outgoing migrations

	// Restore recovery (recovery.go): freeze is set while nothing may be acted on; restoreWant is
	// the recovery generation this agent asked for (it saw etcd go back), maxGen the highest the
	// cluster record ever showed it; inv is the inventory the node record carries.
	freeze       atomic.Bool
	restoreWant  atomic.Int64
	maxGen       atomic.Int64
	mark         *etcdutil.Watermark
	inv          atomic.Pointer[keys.Inventory]
	recoveryWake chan struct{}

	nospace *etcdutil.SpaceGauge // etcd refuses this node's reports for want of space
	// hvProblem says why libvirtd cannot be used (nil: it can); pubMu orders node record rewrites.
	hvProblem atomic.Pointer[string]
	// diskProblem says which watched filesystem is nearly full (nil: none); diskShortPaths is the
	// set last published, touched by the resync loop only.
	diskProblem    atomic.Pointer[string]
	diskShortPaths string
	pubMu          sync.Mutex

	mu       sync.Mutex
	reported map[string]keys.VMStatus // last status written per VM, to skip identical writes
	defined  map[string]int64         // spec revision last defined per VM
	seeds    map[string][]byte        // seed path -> hash of what it says
	guarded  string                   // the guard's script as last applied ("": never)
	stopping map[string]time.Time     // VMs asked to power off, since when
	outcomes map[string]string        // migration id -> this source's result
	// Crash handling (crash.go): guests seen running as wanted, recent crashes, and the time
	// before which a crashed guest is not started again.
	ran       map[string]ranAs
	crashes   map[string][]time.Time
	notBefore map[string]time.Time
}

// New checks the configuration and prepares the agent.
func New(cfg Config) (*Agent, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	a := &Agent{
		cfg:        cfg,
		space:      cfg.Space,
		hwid:       cfg.HWID,
		log:        cfg.Log.With("node", cfg.HWID),
		hv:         cfg.Hypervisor,
		queue:      workqueue.New(),
		reported:   map[string]keys.VMStatus{},
		defined:    map[string]int64{},
		seeds:      map[string][]byte{},
		stopping:   map[string]time.Time{},
		outcomes:   map[string]string{},
		ran:        map[string]ranAs{},
		crashes:    map[string][]time.Time{},
		notBefore:  map[string]time.Time{},
		migrations: make(chan struct{}, cfg.MaxMigrations),
		cmds:       make(chan *cmdRec, 16),

		recoveryWake: make(chan struct{}, 1),
	}
	a.events = events.New(cfg.Client, cfg.Space, keys.EventsByNode(cfg.HWID), "agent/"+cfg.HWID, cfg.EtcdUser, a.log)
	a.metrics = newMetrics(cfg.Registry)
	a.nospace = etcdutil.NewSpaceGauge(cfg.Registry, "herd_agent_etcd_nospace", a.log)
	a.assigns = etcdutil.NewTyped[keys.Assignment](cfg.Client, cfg.Space.AssignPrefix(cfg.HWID), a.onAssign, a.log)
	a.assigns.OnBatch = a.onAssignBatch
	a.cluster = etcdutil.NewTyped[keys.Cluster](cfg.Client, cfg.Space.Cluster(), a.onCluster, a.log)
	a.fences = etcdutil.NewTyped[keys.Fence](cfg.Client, cfg.Space.FencePrefix(cfg.HWID), a.onFence, a.log)
	a.cmdsInf = etcdutil.NewTyped[keys.NodeCommand](cfg.Client, cfg.Space.NodeCmdPrefix(cfg.HWID), a.onCommand, a.log)
	for _, inf := range a.caches() {
		inf.OnRegress = a.onRegress
	}
	var err error
	if a.mark, err = etcdutil.OpenWatermark(cfg.RevisionFile); err != nil {
		a.log.Warn("the revision watermark is lost: a restore of etcd while this agent is down goes unnoticed by it", "error", err)
	}
	return a, nil
}

// The cached records the agent reads.
type (
	assignRec = keys.Record[keys.Assignment]
	cmdRec    = keys.Record[keys.NodeCommand]
)

func (a *Agent) onAssign(key string, _, cur *etcdutil.KV) { a.assigned(key, cur != nil) }

// assigned queues the VM of an assignment key; present says the key exists now.
func (a *Agent) assigned(key string, present bool) {
	if name, ok := keys.ParseLeaf(a.space.AssignPrefix(a.hwid), key); ok {
		if present && a.hold.CompareAndSwap(true, false) {
			a.log.Info("a new assignment arrived: the leader is working normally; lifting the hold on removals")
		}
		a.queue.Add(name)
	}
}

// onAssignBatch notices every assignment vanishing at once while domains run.
func (a *Agent) onAssignBatch(deleted, remaining int) {
	if deleted < 2 || remaining > 0 {
		return
	}
	doms, err := a.hv.List(context.Background())
	if err != nil {
		return
	}
	running := 0
	for _, d := range doms {
		if d.Managed && d.State == hypervisor.Running {
			running++
		}
	}
	if running > 0 && !a.hold.Swap(true) {
		a.log.Error("all assignments vanished at once while domains run: holding every removal; the domains are reported as orphans", "vanished", deleted, "running", running)
		a.events.Record("node/"+a.hwid, "orphan-hold", "%d assignments vanished at once while %d domains run; nothing is destroyed until a new assignment arrives or the agent restarts", deleted, running)
	}
}

// onFence requeues everything when this node's fence records change: entering or leaving fenced
// mode affects every domain.
func (a *Agent) onFence(key string, _, cur *etcdutil.KV) {
	if f := etcdutil.Record[keys.Fence](cur); f.OK() && f.Value.BootID == a.cfg.BootID {
		a.log.Error("this boot of the node is fenced: stopping its domains and serving nothing until it reboots or 'herdctl fence clear'", "phase", f.Value.Phase)
	}
	a.enqueueAll(context.Background())
}

// fenced reports whether this boot has a fence record: the cluster declared it dead.
func (a *Agent) fenced() bool {
	return a.fences.Get(a.space.Fence(a.hwid, a.cfg.BootID)) != nil
}

func (a *Agent) onCluster(key string, _, cur *etcdutil.KV) {
	cl := etcdutil.Record[keys.Cluster](cur)
	if key != a.space.Cluster() || !cl.OK() {
		return
	}
	a.noteCluster(cl.Value)
	id := cl.Value.ID
	if a.clusterID.CompareAndSwap(nil, &id) {
		a.log.Info("cluster identified", "cluster", id)
		return
	}
	if old := a.clusterID.Load(); *old != id {
		a.log.Error("cluster id changed: etcd was wiped or replaced; no domain will be destroyed until the agent restarts and an operator decides", "was", *old, "now", id)
		a.events.Record("node/"+a.hwid, "cluster-changed", "cluster id changed from %s to %s", *old, id)
	}
}

// currentCluster returns the id of the cluster as etcd says now and whether it is the one this
// agent joined.
func (a *Agent) currentCluster() (string, bool) {
	cl := a.cluster.Get(a.space.Cluster())
	first := a.clusterID.Load()
	if !cl.OK() || first == nil {
		return "", false
	}
	id := cl.Value.ID
	return id, id == *first
}

// Run serves until ctx ends. On a clean stop it revokes its lease (its VMs keep running: stopping
// the agent is not stopping the node's guests) and returns nil.
func (a *Agent) Run(ctx context.Context) error {
	a.log.Info("agent starting", "libvirt", a.hv.URI(), "boot_id", a.cfg.BootID)
	if a.cfg.Uplink != "" && a.hv.DomainType() != "test" {
		if err := hostnet.ProbeVLAN(a.cfg.Uplink); err != nil {
			// Reported as no uplink: the leader then places no VM on a VLAN network here,
			// rather than every one failing at its definition.
			a.log.Error("the uplink cannot carry VLANs: this node takes no VM on a VLAN network", "uplink", a.cfg.Uplink, "error", err)
			a.events.Record("node/"+a.hwid, "uplink-unusable", "%v", err)
			a.cfg.Uplink = ""
		}
	}
	if a.cfg.CephKey != "" && a.hv.DomainType() != "test" {
		for {
			_, err := a.hv.EnsureCephSecret(ctx, a.cfg.CephUser, a.cfg.CephKey)
			if err == nil {
				break
			}
			a.log.Warn("cannot define the Ceph secret in libvirt; retrying", "error", err)
			if !etcdutil.Sleep(ctx, 5*time.Second) {
				return ctx.Err()
			}
		}
	}
	if err := a.waitHardware(ctx); err != nil {
		return err
	}
	var wg sync.WaitGroup
	run := func(f func(context.Context)) {
		wg.Add(1)
		go func() { defer wg.Done(); f(ctx) }()
	}
	run(a.events.Run)
	run(a.cluster.Run)
	if err := a.waitCluster(ctx); err != nil {
		wg.Wait()
		return err
	}
	a.checkWatermark()
	run(a.recoveryLoop)
	run(a.fences.Run)
	run(a.assigns.Run)
	registered := make(chan struct{})
	run(func(ctx context.Context) { a.keepRegistered(ctx, registered) })
	if err := a.assigns.WaitRev(ctx, 0); err != nil {
		wg.Wait()
		return nil
	}
	if err := a.fences.WaitRev(ctx, 0); err != nil {
		wg.Wait()
		return nil
	}
	// Node commands (a rollout's reboot) name the boot they apply to.
	run(a.cmdsInf.Run)
	run(a.runCommands)
	// Adopt what runs already: every domain herd made is reconciled, assigned or not.
	a.enqueueAll(ctx)
	run(a.enqueueReported)
	run(a.resyncLoop)
	a.queue.Run(ctx, a.cfg.Workers, a.reconcile, func(name string, err error, retry time.Duration) {
		a.metrics.reconcileErrors.Inc()
		a.log.Warn("reconcile failed", "vm", name, "error", err, "retry_in", retry)
	})
	wg.Wait()
	a.noteRevision(etcdutil.MaxRev(a.caches()))
	if err := a.mark.Flush(); err != nil {
		a.log.Warn("cannot keep the revision watermark", "error", err)
	}
	return nil
}

// waitHardware blocks until the operator has enrolled this hwid. An unknown machine serves nothing.
func (a *Agent) waitHardware(ctx context.Context) error {
	key := a.space.Hardware(a.hwid)
	b := etcdutil.Backoff{Min: time.Second, Max: 10 * time.Second}
	logged := time.Time{}
	for {
		cctx, cancel := etcdutil.WithTimeout(ctx)
		resp, err := a.cfg.Client.Get(cctx, key)
		cancel()
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case err != nil:
			a.log.Warn("cannot reach etcd to check enrolment; retrying", "error", err)
		case len(resp.Kvs) > 0:
			a.log.Info("hardware is enrolled", "key", key)
			return nil
		case time.Since(logged) > time.Minute:
			a.log.Warn("this machine is not enrolled: refusing to serve until it is", "key", key,
				"hint", "herdctl hw add "+a.hwid)
			logged = time.Now()
		}
		if !b.Wait(ctx) {
			return ctx.Err()
		}
	}
}

// waitCluster blocks until a coordinator has written the cluster record: before it exists there
// can be no assignment, and the id is needed to stamp domains.
func (a *Agent) waitCluster(ctx context.Context) error {
	logged := time.Now()
	for a.clusterID.Load() == nil {
		if time.Since(logged) > 30*time.Second {
			a.log.Warn("waiting for a coordinator to initialise the cluster", "key", a.space.Cluster())
			logged = time.Now()
		}
		if !etcdutil.Sleep(ctx, 200*time.Millisecond) {
			return ctx.Err()
		}
	}
	return nil
}

func (a *Agent) resyncLoop(ctx context.Context) {
	a.diskHealth(ctx)
	t := time.NewTicker(a.cfg.Resync)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			a.enqueueAll(ctx)
			a.diskHealth(ctx)
		}
	}
}

// enqueueReported queues, once per boot, every VM this node has a status key for: an earlier boot
// (or this one before a restart) may have reported a VM that is now neither assigned here nor
// defined (deleted while the node was down), and only its reconcile removes that report. Later
// reports are this process's own, so one read at start is enough and steady state reads nothing.
func (a *Agent) enqueueReported(ctx context.Context) {
	b := etcdutil.Backoff{Min: time.Second, Max: 30 * time.Second}
	for {
		cctx, cancel := etcdutil.WithTimeout(ctx)
		resp, err := a.cfg.Client.Get(cctx, a.space.StatusPrefix(a.hwid), clientv3.WithPrefix(), clientv3.WithKeysOnly())
		cancel()
		if err == nil {
			for _, kv := range resp.Kvs {
				if _, name, ok := keys.ParseNodeScoped(a.space.StatusRoot(), string(kv.Key)); ok {
					a.queue.Add(name)
				}
			}
			return
		}
		a.log.Warn("cannot list this node's status reports; retrying", "error", err)
		if !b.Wait(ctx) {
			return
		}
	}
}

// enqueueAll queues every VM that is assigned here or has a domain here.
func (a *Agent) enqueueAll(ctx context.Context) {
	for _, r := range a.assigns.List() {
		a.assigned(r.Key, true)
	}
	doms, err := a.hv.List(ctx)
	a.hypervisorHealth(ctx, err)
	if err != nil {
		a.log.Warn("list domains for resync", "error", err)
		return
	}
	a.sweepSeeds(doms)
	if err := a.guard(ctx, true); err != nil {
		a.log.Error("anti-spoofing rules not applied", "error", err)
	}
	counts := map[hypervisor.State]int{}
	for _, d := range doms {
		if d.Managed {
			a.queue.Add(d.Name)
			counts[d.State]++
		}
	}
	a.metrics.setDomains(counts)
}

// Domains is the agent's own report of its hypervisor, served on its status endpoint.
func (a *Agent) Domains(ctx context.Context) ([]hypervisor.Domain, error) {
	return a.hv.List(ctx)
}

// Record writes an event of this node's agent into the audit trail (a console session, say).
func (a *Agent) Record(object, action, format string, args ...any) {
	a.events.Record(object, action, format, args...)
}

// RunsHere says why vm has no console on this node, nil when it is a herd VM running here: the
// console serves nothing else (no domain of another cluster, no guest that is not up).
func (a *Agent) RunsHere(ctx context.Context, vm string) error {
	d, err := a.hv.Lookup(ctx, vm)
	if err != nil {
		return fmt.Errorf("vm/%s: %w", vm, err)
	}
	switch {
	case d == nil || !d.Managed:
		return fmt.Errorf("vm/%s does not run on node %s", vm, a.hwid)
	case d.State != hypervisor.Running:
		return fmt.Errorf("vm/%s is %s on node %s, not running: its console log (--log) tells what it printed last", vm, d.State, a.hwid)
	}
	return nil
}

// ConsoleTicket reads this node's console ticket id (nil when there is none) and the lease it
// hangs on: the console admits an operator only with one (lib/console).
func (a *Agent) ConsoleTicket(ctx context.Context, id string) (*keys.ConsoleTicket, int64, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	resp, err := a.cfg.Client.Get(ctx, a.space.ConsoleTicket(a.hwid, id))
	if err != nil || len(resp.Kvs) == 0 {
		return nil, 0, err
	}
	t, err := keys.Decode[keys.ConsoleTicket](resp.Kvs[0].Value)
	if err != nil {
		return nil, 0, fmt.Errorf("console ticket %s: %w", id, err)
	}
	return t, resp.Kvs[0].Lease, nil
}
