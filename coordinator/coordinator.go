// Package coordinator is herd's control loop. Every replica keeps watch-fed caches of the whole
// cluster (so a standby that becomes leader acts at once); the one that wins the etcd election
// schedules VMs onto live nodes and keeps placements, assignments and problem records in step with
// the specs. Every leader write is a transaction guarded by the election key's CreateRevision: a
// deposed leader cannot write, and stops as soon as it notices.
package coordinator

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"

	"github.com/herdhq/herd/coordinator/decide"
	"github.com/herdhq/herd/coordinator/fence"
	"github.com/herdhq/herd/coordinator/scheduler"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/events"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/volume"
)

// Config is everything a coordinator needs.
type Config struct {
	Client *clientv3.Client
	// EtcdUser is the etcd user Client authenticates as (its certificate's CN), recorded in events.
	EtcdUser string
	Space    keys.Space
	// Name identifies this replica in the election and in events.
	Name string
	// SessionTTL is how long a dead leader keeps its leadership. Default 5 s.
	SessionTTL time.Duration
	// Pools seed the cluster record when this coordinator is the first ever.
	Pools     []string
	Scheduler scheduler.Options
	// Parallel bounds the transactions one round has in flight. Default 64.
	Parallel int
	// Interval is the longest time between two rounds, changes or not. Default 10 s.
	Interval time.Duration

	// Fencer fences lost nodes before their VMs move. Nil means none configured: lost nodes' VMs
	// stay placed (safe), with a problem saying why.
	Fencer fence.Fencer
	// Grace is how long a node's lease must have been gone before it is fenced. Default 5 s.
	Grace time.Duration
	// RescheduleRate bounds VM moves off fenced nodes, per second. Default 20.
	RescheduleRate float64
	// The mass-failure guard holds failover when more than MassFailureMin nodes AND more than
	// MassFailureFraction of all nodes are lost within MassFailureWindow.
	MassFailureFraction float64
	MassFailureMin      int
	MassFailureWindow   time.Duration
	// RecoveryWait bounds how long a restore recovery waits for the inventories of live nodes
	// before it adopts what those that answered run. Default 1 min.
	RecoveryWait time.Duration
	// RevisionFile keeps the newest etcd revision this replica saw (etcdutil.Watermark), so that
	// a replica restarted while etcd was restored from a backup still notices; "" keeps none.
	RevisionFile string
	// Volumes, if set, makes the leader create, clone, grow and purge VM disks before placing
	// VMs (the rbd backend). Without it, agents create directory disks themselves.
	Volumes volume.Backend
	// ImportDir is where file:// sources of VM images must lie ("": file:// is refused).
	ImportDir string
	// ImportWorkDir holds an import's temporary files: the fetched file and, for a qcow2, its
	// raw conversion, as big as the image's virtual size (sparse). Default: the system's.
	ImportWorkDir string
	// MaxMigrationsPerNode bounds the open migrations a node takes part in (source or target).
	// Default 2.
	MaxMigrationsPerNode int

	// RevokeNodeUsers makes the leader delete the etcd user of every node whose hardware record
	// is gone. It needs user administration (root), so only with TLS and RBAC on.
	RevokeNodeUsers bool

	Log      hclog.Logger
	Registry prometheus.Registerer

	// decided, for tests, is called when a full round has decided, before it may land.
	decided func()
}

func (c *Config) defaults() error {
	if c.Client == nil {
		return errors.New("coordinator: Client is required")
	}
	if c.Name == "" {
		h, _ := os.Hostname()
		c.Name = fmt.Sprintf("%s-%d", h, os.Getpid())
	}
	if c.SessionTTL == 0 {
		c.SessionTTL = 5 * time.Second
	}
	if c.SessionTTL < time.Second {
		return fmt.Errorf("coordinator: session TTL %s is below 1s", c.SessionTTL)
	}
	if len(c.Pools) == 0 {
		c.Pools = []string{"default"}
	}
	if c.Scheduler.Strategy == "" {
		c.Scheduler.Strategy = scheduler.Spread
	}
	if c.Scheduler.CPUOvercommit == 0 {
		c.Scheduler.CPUOvercommit = 4
	}
	if c.Parallel == 0 {
		c.Parallel = 64
	}
	if c.Interval == 0 {
		c.Interval = 10 * time.Second
	}
	if c.Fencer == nil {
		c.Fencer = fence.All{}
	}
	if c.Grace == 0 {
		c.Grace = 5 * time.Second
	}
	if c.RescheduleRate == 0 {
		c.RescheduleRate = 20
	}
	if c.MassFailureFraction == 0 {
		c.MassFailureFraction = 0.5
	}
	if c.MassFailureMin == 0 {
		c.MassFailureMin = 2
	}
	if c.MassFailureWindow == 0 {
		c.MassFailureWindow = 10 * time.Minute
	}
	if c.MaxMigrationsPerNode == 0 {
		c.MaxMigrationsPerNode = 2
	}
	if c.Log == nil {
		c.Log = hclog.NewNullLogger()
	}
	if c.Registry == nil {
		c.Registry = prometheus.NewRegistry()
	}
	return nil
}

// Coordinator is one replica: the caches every replica keeps warm, and the election. What a
// leadership term does lives in a term (term.go), created when the term starts and gone when it
// ends, so nothing a term decided or started can outlive it.
type Coordinator struct {
	cfg    Config
	space  keys.Space
	log    hclog.Logger
	events *events.Recorder
	m      *metrics

	// The caches. vmInf holds both parts under a VM's key (spec and migrate request) and
	// rolloutInf both rollout keys (the operator's request and the leader's progress): they are
	// read as typed records through etcdutil.Record.
	vmInf, rolloutInf *etcdutil.Informer
	clusterInf        *etcdutil.Typed[keys.Cluster]
	hwInf             *etcdutil.Typed[keys.Hardware]
	nodeInf           *etcdutil.Typed[keys.Node]
	nodeStateInf      *etcdutil.Typed[keys.NodeState]
	nodeSpecInf       *etcdutil.Typed[keys.NodeSpec]
	placementInf      *etcdutil.Typed[keys.Placement]
	problemInf        *etcdutil.Typed[keys.Problem]
	assignInf         *etcdutil.Typed[keys.Assignment]
	statusInf         *etcdutil.Typed[keys.VMStatus]
	fenceInf          *etcdutil.Typed[keys.Fence]
	guardInf          *etcdutil.Typed[keys.LossGuard]
	volInf            *etcdutil.Typed[keys.VolumeRecord]
	imgInf            *etcdutil.Typed[keys.VMImage]
	imgStatusInf      *etcdutil.Typed[keys.VMImageStatus]
	requestInf        *etcdutil.Typed[keys.Request]
	nodeCmdInf        *etcdutil.Typed[keys.NodeCommand]
	netInf            *etcdutil.Typed[keys.NetworkSpec]
	addrInf           *etcdutil.Typed[keys.AddressClaim]

	trigger   chan struct{} // a cache changed, or side work ended: decide again
	newLease  chan struct{} // a node key on a lease not asked about yet: warmLeases asks
	revokeNow chan struct{} // a hardware record was deleted: revoke its node now, not at the next tick

	mu        sync.Mutex
	isLeader  bool
	vms       map[string]*decide.VM      // by VM name; each value is replaced, never modified
	ledger    *decide.Ledger             // what quick rounds know of every VM (decide/quick.go)
	assignsOn map[string][]string        // VM -> nodes with an assignment of it (quick rounds' index)
	reportsOn map[string][]string        // VM -> nodes with a status report of it
	claimsOn  map[string]map[string]bool // network -> addresses claimed on it (quick rounds' index)
	dirty     map[string]bool            // VMs whose records changed since the last round took them
	full      string                     // what other than a VM's records changed ("": nothing): the next round is full
	// nodesChanged are the nodes whose records changed since a full round last took them, global
	// what else did (not a VM's, not a node's): see fullRound.
	nodesChanged map[string]bool
	global       string
	vanished     map[string]*keys.Placement // VM -> its last placement, deleted by someone
	firstSeen    map[string]time.Time       // VM -> when its spec was first seen, for the placement latency
	left         map[string]string          // hwid -> boot id of a clean departure this replica saw
	deadLease    map[int64]bool             // leases etcd said are gone: a lease never comes back
	nodeTTLs     *ttlCache                  // node leases' granted TTLs, asked once per lease

	nospace *etcdutil.SpaceGauge // etcd refuses the leader's writes for want of space

	// restoreWant is the restore recovery generation this replica asks for (it saw etcd's
	// revision go back), maxGen the highest the cluster record ever showed it.
	restoreWant, maxGen atomic.Int64
	mark                *etcdutil.Watermark
}

// New prepares a coordinator; Run starts it.
func New(cfg Config) (*Coordinator, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	c := &Coordinator{
		cfg:          cfg,
		space:        cfg.Space,
		log:          cfg.Log.With("coordinator", cfg.Name),
		trigger:      make(chan struct{}, 1),
		newLease:     make(chan struct{}, 1),
		revokeNow:    make(chan struct{}, 1),
		vms:          map[string]*decide.VM{},
		ledger:       decide.NewLedger(),
		assignsOn:    map[string][]string{},
		reportsOn:    map[string][]string{},
		claimsOn:     map[string]map[string]bool{},
		dirty:        map[string]bool{},
		nodesChanged: map[string]bool{},
		vanished:     map[string]*keys.Placement{},
		firstSeen:    map[string]time.Time{},
		left:         map[string]string{},
		deadLease:    map[int64]bool{},
	}
	c.nodeTTLs = newTTLCache(cfg.Client, 0)
	c.events = events.New(cfg.Client, cfg.Space, keys.EventsByCoordinator, "coordinator/"+cfg.Name, cfg.EtcdUser, c.log)
	c.m = newMetrics(cfg.Registry)
	c.nospace = etcdutil.NewSpaceGauge(cfg.Registry, "herd_coordinator_etcd_nospace", c.log)
	s, cl, poke := cfg.Space, cfg.Client, c.poke
	c.vmInf = etcdutil.NewInformer(cl, s.VMPrefix(), c.decodeVMKey, c.onVM, c.log)
	// One watch covers both rollout keys: the operator's request and the leader's progress.
	c.rolloutInf = etcdutil.NewInformer(cl, s.Rollout(), c.decodeRolloutKey, poke, c.log)
	c.placementInf = etcdutil.NewTyped[keys.Placement](cl, s.PlacementPrefix(), c.onPlacement, c.log)
	c.problemInf = etcdutil.NewTyped[keys.Problem](cl, s.ProblemPrefix(), c.onProblem, c.log)
	// The leader reads every assignment every round, their spec copies almost never.
	c.assignInf = etcdutil.WithDecode(cl, s.AssignRoot(), keys.DecodeAssignmentHead, c.onVMOnNode(s.AssignRoot(), c.assignsOn), c.log)
	c.clusterInf = etcdutil.NewTyped[keys.Cluster](cl, s.Cluster(), poke, c.log)
	c.hwInf = etcdutil.NewTyped[keys.Hardware](cl, s.HardwarePrefix(), c.onHardware, c.log)
	c.nodeInf = etcdutil.NewTyped[keys.Node](cl, s.NodePrefix(), c.onNode, c.log)
	c.nodeStateInf = etcdutil.NewTyped[keys.NodeState](cl, s.NodeStatePrefix(), poke, c.log)
	c.nodeSpecInf = etcdutil.NewTyped[keys.NodeSpec](cl, s.NodeSpecPrefix(), poke, c.log)
	c.statusInf = etcdutil.NewTyped[keys.VMStatus](cl, s.StatusRoot(), c.onVMOnNode(s.StatusRoot(), c.reportsOn), c.log)
	c.fenceInf = etcdutil.NewTyped[keys.Fence](cl, s.FenceRoot(), poke, c.log)
	c.guardInf = etcdutil.NewTyped[keys.LossGuard](cl, s.LossGuard(), poke, c.log)
	c.volInf = etcdutil.NewTyped[keys.VolumeRecord](cl, s.VolumeRoot(), poke, c.log)
	c.imgInf = etcdutil.NewTyped[keys.VMImage](cl, s.VMImagePrefix(), poke, c.log)
	c.imgStatusInf = etcdutil.NewTyped[keys.VMImageStatus](cl, s.VMImageStatusPrefix(), poke, c.log)
	c.requestInf = etcdutil.NewTyped[keys.Request](cl, s.RequestPrefix(), poke, c.log)
	c.nodeCmdInf = etcdutil.NewTyped[keys.NodeCommand](cl, s.NodeCmdRoot(), poke, c.log)
	c.netInf = etcdutil.NewTyped[keys.NetworkSpec](cl, s.NetworkPrefix(), poke, c.log)
	c.addrInf = etcdutil.NewTyped[keys.AddressClaim](cl, s.AddressRoot(), c.onAddress, c.log)
	for _, inf := range c.informers() {
		inf.OnRegress = c.onRegress
	}
	var err error
	if c.mark, err = etcdutil.OpenWatermark(cfg.RevisionFile); err != nil {
		c.log.Warn("the revision watermark is lost: a restore of etcd while this replica is down goes unnoticed by it", "error", err)
	}
	for _, inf := range c.informers() {
		cfg.Registry.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "herd_coordinator_cache_lists_total", Help: "Full lists of a cache: 1 in a steady system; more when a watch fell too far behind or etcd compacted or went back.",
			ConstLabels: prometheus.Labels{"prefix": inf.Prefix()},
		}, func() float64 { return float64(inf.Relists()) }))
	}
	// The big prefixes are read only decoded: at 100,000 VMs their raw bytes were a fifth of the
	// leader's heap. (Records whose holder decodes a private copy from Raw keep theirs.)
	for _, inf := range []*etcdutil.Informer{c.vmInf, c.placementInf.Informer, c.problemInf.Informer, c.assignInf.Informer, c.statusInf.Informer} {
		inf.DropValues = true
	}
	sweepImportWork(cfg.ImportWorkDir, cfg.Name, c.log)
	return c, nil
}

// informers are every cache, each with the key prefix it holds.
func (c *Coordinator) informers() []*etcdutil.Informer {
	return []*etcdutil.Informer{c.clusterInf.Informer, c.hwInf.Informer, c.nodeInf.Informer, c.nodeStateInf.Informer,
		c.nodeSpecInf.Informer, c.vmInf, c.placementInf.Informer, c.problemInf.Informer, c.assignInf.Informer,
		c.fenceInf.Informer, c.guardInf.Informer, c.statusInf.Informer, c.volInf.Informer, c.rolloutInf,
		c.nodeCmdInf.Informer, c.requestInf.Informer, c.netInf.Informer, c.addrInf.Informer,
		c.imgInf.Informer, c.imgStatusInf.Informer}
}

func (c *Coordinator) decodeVMKey(key string, v []byte) (any, error) {
	_, part, ok := c.space.ParseVM(key)
	if !ok {
		return nil, fmt.Errorf("not a herd VM key")
	}
	switch part {
	case keys.VMPartSpec:
		return keys.Decode[keys.VMSpec](v)
	case keys.VMPartMigrate:
		return keys.Decode[keys.MigrateRequest](v)
	}
	return nil, fmt.Errorf("unknown VM key")
}

func (c *Coordinator) decodeRolloutKey(key string, v []byte) (any, error) {
	switch key {
	case c.space.Rollout():
		return keys.Decode[keys.Rollout](v)
	case c.space.RolloutStatus():
		return keys.Decode[keys.RolloutStatus](v)
	}
	return nil, fmt.Errorf("not a rollout key")
}

func (c *Coordinator) onVM(key string, _, cur *etcdutil.KV) {
	name, part, ok := c.space.ParseVM(key)
	if !ok {
		return
	}
	c.updateVM(name, func(v *decide.VM) {
		switch part {
		case keys.VMPartSpec:
			if cur != nil && (v.Spec == nil || v.Spec.CreateRevision != cur.CreateRevision) {
				c.firstSeen[name] = time.Now()
			}
			if cur == nil {
				delete(c.firstSeen, name)
			}
			v.Spec = etcdutil.Record[keys.VMSpec](cur)
		case keys.VMPartMigrate:
			v.Migrate = etcdutil.Record[keys.MigrateRequest](cur)
		}
	})
}

func (c *Coordinator) onPlacement(key string, prev, cur *etcdutil.KV) {
	name, ok := keys.ParseVMName(c.space.PlacementPrefix(), key)
	if !ok {
		return
	}
	c.updateVM(name, func(v *decide.VM) {
		v.Placement = etcdutil.Record[keys.Placement](cur)
		if cur != nil {
			delete(c.vanished, name)
		} else if p := etcdutil.Record[keys.Placement](prev); p.OK() {
			// Remembered so that a placement deleted by anyone but the leader (root with
			// etcdctl, a restored backup) is restored rather than made anew while the VM may
			// still run.
			c.vanished[name] = p.Value
		}
	})
}

func (c *Coordinator) onProblem(key string, _, cur *etcdutil.KV) {
	if name, ok := keys.ParseVMName(c.space.ProblemPrefix(), key); ok {
		c.updateVM(name, func(v *decide.VM) { v.Problem = etcdutil.Record[keys.Problem](cur) })
	}
}

// updateVM replaces a VM's records with a changed copy (a round may be reading the old one).
func (c *Coordinator) updateVM(name string, change func(*decide.VM)) {
	c.mu.Lock()
	var v decide.VM
	if old := c.vms[name]; old != nil {
		v = *old
	}
	change(&v)
	if v.Spec == nil && v.Placement == nil && v.Problem == nil && v.Migrate == nil {
		delete(c.vms, name)
		delete(c.vanished, name)
		c.ledger.Set(name, nil)
	} else {
		c.vms[name] = &v
		c.ledger.Set(name, &v)
	}
	c.dirty[name] = true
	c.mu.Unlock()
	c.signal()
}

// onVMOnNode keeps an index of the nodes holding a per-node record of each VM (assignments,
// status reports), for quick rounds, and marks the VM changed.
func (c *Coordinator) onVMOnNode(root string, index map[string][]string) etcdutil.ChangeFunc {
	return func(key string, _, cur *etcdutil.KV) {
		hwid, name, ok := keys.ParseNodeScoped(root, key)
		if !ok {
			c.poke(key, nil, cur) // not herd's: a full round sees what it is
			return
		}
		c.mu.Lock()
		nodes := index[name]
		i := slices.Index(nodes, hwid)
		switch {
		case cur != nil && i < 0:
			index[name] = append(slices.Clip(nodes), hwid)
		case cur == nil && i >= 0:
			if len(nodes) == 1 {
				delete(index, name)
			} else {
				index[name] = slices.Delete(slices.Clone(nodes), i, i+1)
			}
		}
		c.dirty[name] = true
		c.mu.Unlock()
		c.signal()
	}
}

// onNode notices clean departures: the agent marks its key leaving before it revokes the lease.
// Every replica records them, so a new leader knows too.
func (c *Coordinator) onNode(key string, prev, cur *etcdutil.KV) {
	p, n := etcdutil.Record[keys.Node](prev), etcdutil.Record[keys.Node](cur)
	c.mu.Lock()
	if cur == nil && p.OK() && p.Value.Leaving {
		c.left[p.Value.HWID] = p.Value.BootID
	}
	if n.OK() {
		delete(c.left, n.Value.HWID)
	}
	c.mu.Unlock()
	unknown := false
	if n.OK() && n.Lease != 0 {
		_, known := c.nodeTTLs.known(n.Lease)
		unknown = !known
	}
	if unknown {
		select {
		case c.newLease <- struct{}{}:
		default:
		}
	}
	c.poke(key, prev, cur)
}

// poke asks the leader loop for a full round: something other than a VM's records changed (or a
// side work ended, or etcd went back). Bursts of changes coalesce into one round.
func (c *Coordinator) poke(key string, _, _ *etcdutil.KV) {
	// What changed, as the keyspace's top level (nodes, fences, ...), for the metric.
	cause := "work"
	if rest, ok := strings.CutPrefix(key, c.space.All()); ok {
		cause, _, _ = strings.Cut(rest, "/")
	}
	hwid := c.nodeOf(key)
	c.mu.Lock()
	if c.full == "" {
		c.full = cause
	}
	if hwid != "" {
		c.nodesChanged[hwid] = true
	} else if c.global == "" {
		c.global = cause
	}
	c.mu.Unlock()
	c.signal()
}

// onAddress keeps the index of the claims by network. A claim's change wakes no round: the leader
// writes them itself, with the placements, and a full round (at least every interval) puts back
// one deleted by someone else.
func (c *Coordinator) onAddress(key string, _, cur *etcdutil.KV) {
	net, ip, ok := keys.ParseNodeScoped(c.space.AddressRoot(), key)
	if !ok {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if cur == nil {
		delete(c.claimsOn[net], ip)
		if len(c.claimsOn[net]) == 0 {
			delete(c.claimsOn, net)
		}
		return
	}
	if c.claimsOn[net] == nil {
		c.claimsOn[net] = map[string]bool{}
	}
	c.claimsOn[net][ip] = true
}

// nodeOf names the node a key of the node-level prefixes belongs to ("" for any other key).
func (c *Coordinator) nodeOf(key string) string {
	sp := c.space
	for _, prefix := range []string{sp.NodePrefix(), sp.NodeStatePrefix(), sp.NodeSpecPrefix(), sp.HardwarePrefix()} {
		if hwid, ok := keys.ParseLeaf(prefix, key); ok {
			return hwid
		}
	}
	if hwid, _, ok := keys.ParseNodeScoped(sp.FenceRoot(), key); ok {
		return hwid
	}
	return ""
}

// signal wakes the leader loop.
func (c *Coordinator) signal() {
	select {
	case c.trigger <- struct{}{}:
	default:
	}
}

// Events is the coordinator's audit trail, for the endpoints it serves beside its loop.
func (c *Coordinator) Events() *events.Recorder { return c.events }

// IsLeader reports whether this replica leads now.
func (c *Coordinator) IsLeader() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.isLeader
}

func (c *Coordinator) setLeader(v bool) {
	c.mu.Lock()
	c.isLeader = v
	c.mu.Unlock()
	if v {
		c.m.leader.Set(1)
	} else {
		c.m.leader.Set(0)
		c.m.rolloutNodes.Reset() // only the leader knows the rollout's progress
	}
}

// Run keeps the caches warm and campaigns for leadership until ctx ends. On a clean stop a leader
// resigns at once, so a standby takes over without waiting for the session to expire.
func (c *Coordinator) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	for _, inf := range c.informers() {
		wg.Add(1)
		go func() { defer wg.Done(); inf.Run(ctx) }()
	}
	wg.Add(1)
	go func() { defer wg.Done(); c.events.Run(ctx) }()
	wg.Add(1)
	go func() { defer wg.Done(); c.warmLeases(ctx) }()
	defer wg.Wait()

	if err := c.initCluster(ctx); err != nil {
		return err
	}
	c.checkWatermark(ctx)
	defer func() {
		c.noteRevision(etcdutil.MaxRev(c.informers()))
		if err := c.mark.Flush(); err != nil {
			c.log.Warn("cannot keep the revision watermark", "error", err)
		}
	}()
	b := etcdutil.Backoff{Min: 200 * time.Millisecond, Max: 5 * time.Second}
	for ctx.Err() == nil {
		if err := c.campaign(ctx); err != nil && ctx.Err() == nil {
			c.log.Warn("election round ended", "error", err)
			b.Wait(ctx)
			continue
		}
		b.Reset()
	}
	return nil
}

// probeRevision follows the revisions etcd answers the session's keepalives with: a watch resumed
// on an etcd restored from a backup waits silently for revisions the new history has not reached,
// so without this a replica would sit on caches of the past and notice nothing.
func (c *Coordinator) probeRevision(ctx context.Context, lease clientv3.LeaseID) {
	ch, err := c.cfg.Client.KeepAlive(ctx, lease)
	if err != nil {
		return
	}
	floor := etcdutil.MaxRev(c.informers())
	for resp := range ch {
		if rev, ok := etcdutil.CheckAnswer(ctx, c.cfg.Client, c.informers(), floor, resp.Revision); ok {
			c.noteRevision(rev)
		}
		floor = etcdutil.MaxRev(c.informers())
	}
}

// checkWatermark compares etcd with the newest revision an earlier run of this replica saw (its
// watermark file), before the replica campaigns: etcd restored from a backup while every
// coordinator was down is noticed, and the first round as leader starts a restore recovery.
func (c *Coordinator) checkWatermark(ctx context.Context) {
	m := c.mark.Loaded()
	if m.Cluster == "" {
		return
	}
	b := etcdutil.Backoff{Min: 200 * time.Millisecond, Max: 5 * time.Second}
	for {
		cctx, cancel := etcdutil.WithTimeout(ctx)
		resp, err := c.cfg.Client.Get(cctx, c.space.Cluster())
		cancel()
		if err == nil {
			if len(resp.Kvs) == 0 {
				return
			}
			cl, err := keys.Decode[keys.Cluster](resp.Kvs[0].Value)
			if err != nil {
				return
			}
			gen, now := cl.RestoreGeneration(), resp.Header.Revision
			if int64(gen) > c.maxGen.Load() {
				c.maxGen.Store(int64(gen))
			}
			if m.WentBack(cl.ID, gen, now) {
				c.log.Error("etcd is behind what this replica saw before it restarted", "saved", m.Saved, "revision", m.Revision,
					"recovery", m.Generation, "now", now, "now_recovery", gen)
				c.onRegress(m.Revision, now)
			}
			return
		}
		c.log.Warn("cannot read the cluster record to compare with the revision watermark; retrying", "error", err)
		if !b.Wait(ctx) {
			return
		}
	}
}

// noteRevision keeps the watermark: etcd answered a request (a keepalive) at rev. Not while this
// replica waits for a restore recovery: etcd may be a restored past.
func (c *Coordinator) noteRevision(rev int64) {
	r := c.clusterInf.Get(c.space.Cluster())
	if !r.OK() || c.restoreWant.Load() > int64(r.Value.RestoreGeneration()) {
		return
	}
	if err := c.mark.Note(r.Value.ID, r.Value.RestoreGeneration(), rev); err != nil {
		c.log.Warn("cannot keep the revision watermark", "error", err)
	}
}

// checkRevision hands a revision etcd answered a request with to the caches, with floor, what they
// held before the request was made (see etcdutil.CheckRevisions).
func (c *Coordinator) checkRevision(floor, rev int64) bool {
	return etcdutil.CheckRevisions(c.informers(), floor, rev)
}

// onRegress is told by a cache that etcd went back in time: the replica asks for a restore
// recovery above any it knew of (decide.recovery), and decides again at once.
func (c *Coordinator) onRegress(was, now int64) {
	want := c.maxGen.Load() + 1
	if r := c.clusterInf.Get(c.space.Cluster()); r.OK() && r.Value.Collecting() && int64(r.Value.Restore.Generation) == want-1 {
		want-- // a recovery is collecting already: it covers what this replica saw
	}
	for {
		cur := c.restoreWant.Load()
		if cur >= want {
			return
		}
		if c.restoreWant.CompareAndSwap(cur, want) {
			break
		}
	}
	c.log.Error("etcd's revision went back (restored from a backup?): asking for a restore recovery", "seen", was, "now", now, "recovery", want)
	c.poke("", nil, nil)
}

// initCluster writes /herd/cluster if no coordinator ever did. Losing the race to another
// coordinator is success.
func (c *Coordinator) initCluster(ctx context.Context) error {
	cl := keys.Cluster{ID: uuid.NewString(), Created: time.Now().UTC(), Pools: c.cfg.Pools, Schema: keys.SchemaVersion}
	if err := cl.Validate(); err != nil {
		return fmt.Errorf("cluster record: %w", err)
	}
	val := keys.MustEncode(&cl)
	b := etcdutil.Backoff{Min: 200 * time.Millisecond, Max: 5 * time.Second}
	for {
		cctx, cancel := etcdutil.WithTimeout(ctx)
		resp, err := c.cfg.Client.Txn(cctx).
			If(etcdutil.CreateRev(c.space.Cluster(), 0)).
			Then(clientv3.OpPut(c.space.Cluster(), val)).
			Commit()
		cancel()
		if err == nil {
			if resp.Succeeded {
				c.log.Info("initialised a new cluster", "cluster", cl.ID, "pools", cl.Pools)
				c.events.Record("cluster/"+cl.ID, "created", "pools %v", cl.Pools)
			}
			return nil
		}
		c.log.Warn("cannot reach etcd to check the cluster record; retrying", "error", err)
		if !b.Wait(ctx) {
			return ctx.Err()
		}
	}
}

// campaign runs one election term: wait to win, lead until the session ends or a guarded write
// fails, then resign.
func (c *Coordinator) campaign(ctx context.Context) error {
	sess, err := concurrency.NewSession(c.cfg.Client, concurrency.WithTTL(int(c.cfg.SessionTTL/time.Second)), concurrency.WithContext(ctx))
	if err != nil {
		return fmt.Errorf("election session: %w", err)
	}
	defer sess.Close() // revokes the lease: our key goes at once
	el := concurrency.NewElection(sess, c.space.Election())
	pctx, pcancel := context.WithCancel(ctx)
	go c.probeRevision(pctx, sess.Lease())
	err = el.Campaign(ctx, c.cfg.Name)
	pcancel()
	if err != nil {
		return fmt.Errorf("campaign: %w", err)
	}
	select {
	case <-sess.Done():
		return errors.New("session expired while campaigning")
	default:
	}
	guard := etcdutil.Guard{Key: el.Key(), Rev: el.Rev()}
	lctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go c.probeRevision(lctx, sess.Lease())
	go func() {
		select {
		case <-sess.Done():
			c.log.Warn("election session lost: stepping down")
			cancel()
		case <-lctx.Done():
		}
	}()
	go func() {
		// Our key deleted by anyone (an operator, a lease expiry we have not heard of yet) ends
		// the term at once, before a guarded write would have to find out.
		wch := c.cfg.Client.Watch(clientv3.WithRequireLeader(lctx), guard.Key, clientv3.WithRev(guard.Rev))
		for resp := range wch {
			for _, ev := range resp.Events {
				if ev.Type == clientv3.EventTypeDelete {
					c.log.Warn("election key deleted: stepping down", "key", guard.Key)
					cancel()
					return
				}
			}
		}
	}()
	c.log.Info("elected leader", "key", guard.Key, "rev", guard.Rev)
	c.events.Record("coordinator/"+c.cfg.Name, "elected", "leader at revision %d", guard.Rev)
	c.setLeader(true)
	err = c.newTerm(lctx, guard).run()
	c.setLeader(false)
	cancel()
	if ctx.Err() != nil {
		// Clean shutdown: resign so a standby takes over without waiting for the TTL.
		rctx, rcancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = el.Resign(rctx)
		rcancel()
		c.log.Info("resigned leadership")
		return nil
	}
	if errors.Is(err, etcdutil.ErrNotLeader) {
		c.log.Warn("a guarded write failed: no longer leader, stepping down")
		c.events.Record("coordinator/"+c.cfg.Name, "deposed", "guarded write refused")
	}
	return err
}
