package coordinator

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/coordinator/decide"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

// observe builds a round's snapshot: the caches as one view, and what etcd says about the leases
// the decision needs (a node key's granted TTL, whether an absent node's lease still lives). Those
// are the only etcd calls a round makes before it decides, and each lease is asked about once
// where the answer cannot change (a granted TTL, a lease that is gone).
func (c *Coordinator) observe(ctx context.Context) *decide.Snapshot {
	sp := c.space
	s := &decide.Snapshot{
		Now:        time.Now(),
		Cluster:    c.clusterInf.Get(sp.Cluster()),
		Assigns:    map[string]map[string]*keys.Record[keys.Assignment]{},
		Reports:    map[string]map[string]*keys.Record[keys.VMStatus]{},
		Nodes:      map[string]*keys.Record[keys.Node]{},
		LeaseTTL:   map[int64]time.Duration{},
		LeaseAlive: map[int64]bool{},
		States:     map[string]*keys.Record[keys.NodeState]{},
		Specs:      map[string]*keys.Record[keys.NodeSpec]{},
		Hardware:   map[string]*keys.Hardware{},
		Fences:     map[string][]*keys.Record[keys.Fence]{},
		Guard:      c.guardInf.Get(sp.LossGuard()),
		Volumes:    map[string]*keys.Record[keys.VolumeRecord]{},
		Requests:   map[string]*keys.Record[keys.Request]{},
		NodeCmds:   map[string]*keys.Record[keys.NodeCommand]{},
		Rollout:    etcdutil.Record[keys.Rollout](c.rolloutInf.Get(sp.Rollout())),
		Progress:   etcdutil.Record[keys.RolloutStatus](c.rolloutInf.Get(sp.RolloutStatus())),
	}
	if s.Cluster.OK() {
		if g := int64(s.Cluster.Value.RestoreGeneration()); g > c.maxGen.Load() {
			c.maxGen.Store(g)
		}
	}
	s.RestoreWant = int(c.restoreWant.Load())
	byNodeVM(sp.AssignRoot(), c.assignInf.Unsorted(), s.Assigns)
	byNodeVM(sp.StatusRoot(), c.statusInf.Unsorted(), s.Reports)
	for _, r := range c.volInf.Unsorted() {
		if pool, image, ok := keys.ParseNodeScoped(sp.VolumeRoot(), r.Key); ok {
			s.Volumes[pool+"/"+image] = r
		}
	}
	for _, r := range c.requestInf.Unsorted() {
		s.Requests[r.Key] = r
	}
	for _, r := range c.nodeCmdInf.Unsorted() {
		s.NodeCmds[r.Key] = r
	}
	s.Networks = c.networks()
	s.Images, s.ImageStatus = c.images()
	s.Claims = map[string]map[string]*keys.Record[keys.AddressClaim]{}
	for _, r := range c.addrInf.Unsorted() {
		if net, ip, ok := keys.ParseNodeScoped(sp.AddressRoot(), r.Key); ok {
			if s.Claims[net] == nil {
				s.Claims[net] = map[string]*keys.Record[keys.AddressClaim]{}
			}
			s.Claims[net][ip] = r
		}
	}
	c.observeNodes(s)
	c.mu.Lock()
	if s.Cluster.OK() && s.Cluster.Value.Collecting() {
		// Placements the caches saw vanish while relisting a restored etcd belong to the other
		// history: nothing may be restored from them.
		clear(c.vanished)
	}
	s.VMs = make(map[string]*decide.VM, len(c.vms))
	for n, v := range c.vms {
		s.VMs[n] = v // replaced on change, never modified: sharing is safe
	}
	s.Vanished = make(map[string]*keys.Placement, len(c.vanished))
	for n, p := range c.vanished {
		s.Vanished[n] = p
	}
	s.Left = make(map[string]string, len(c.left))
	for h, b := range c.left {
		s.Left[h] = b
	}
	s.FirstSeen = make(map[string]time.Time, len(c.firstSeen))
	for n, t := range c.firstSeen {
		s.FirstSeen[n] = t
	}
	c.mu.Unlock()

	// A node key is trusted only on a lease of a sane length; a lease's granted TTL never changes.
	// Usually every replica knows them already (warmLeases); what is left is asked in parallel.
	var nodes []*keys.Record[keys.Node]
	for _, r := range s.Nodes {
		nodes = append(nodes, r)
	}
	askAll(c.unknownTTLs(nodes), func(id int64) {
		if _, err := c.nodeTTLs.get(ctx, id, c.m.leaseQuestions.WithLabelValues("round")); err != nil {
			c.log.Warn("lease check failed", "lease", fmt.Sprintf("%x", id), "error", err)
		}
	})
	trusted := map[string]bool{}
	for hwid, r := range s.Nodes {
		if !r.OK() || r.Lease == 0 {
			continue
		}
		ttl, known := c.nodeTTLs.known(r.Lease)
		if !known {
			continue // unknown counts as sane: not knowing is no reason to call a node dead
		}
		s.LeaseTTL[r.Lease] = ttl
		trusted[hwid] = ttl <= decide.MaxNodeLeaseTTL
	}
	// Whether the last recorded lease of each node without a trusted key still lives: a key deleted
	// by hand (lease alive) is no death. Only nodes the leader might fence are asked about.
	var ask []int64
	for hwid, r := range s.States {
		if !r.OK() || trusted[hwid] {
			continue
		}
		ns := r.Value
		if ns.BootID == "" || ns.Left || ns.Lease == 0 || hasFence(s.Fences[hwid], ns.BootID) {
			continue
		}
		ask = append(ask, ns.Lease)
	}
	var amu sync.Mutex
	askAll(ask, func(id int64) {
		if alive, known := c.leaseAlive(ctx, id); known {
			amu.Lock()
			s.LeaseAlive[id] = alive
			amu.Unlock()
		}
	})
	c.forgetLeases(s)
	return s
}

// observeNodes fills a snapshot's view of the nodes from the caches: hardware, node keys, states
// and specs, fences.
func (c *Coordinator) observeNodes(s *decide.Snapshot) {
	sp := c.space
	for _, r := range c.hwInf.Unsorted() {
		if hwid, ok := keys.ParseLeaf(sp.HardwarePrefix(), r.Key); ok && r.OK() {
			s.Hardware[hwid] = r.Value
		}
	}
	leaf(sp.NodeStatePrefix(), c.nodeStateInf.Unsorted(), s.States)
	leaf(sp.NodeSpecPrefix(), c.nodeSpecInf.Unsorted(), s.Specs)
	leaf(sp.NodePrefix(), c.nodeInf.Unsorted(), s.Nodes)
	for _, r := range c.fenceInf.List() {
		if hwid, _, ok := keys.ParseNodeScoped(sp.FenceRoot(), r.Key); ok {
			s.Fences[hwid] = append(s.Fences[hwid], r)
		}
	}
}

// nodesOnly is a snapshot of the nodes alone, for a new term's first round: a quick one, which
// places what waits before the full round that follows at once walks every VM. The lease TTLs are
// those the replica knows (every replica asks each new node lease's as it appears); one it does not
// know counts as sane, as in any round.
func (c *Coordinator) nodesOnly() *decide.Snapshot {
	s := &decide.Snapshot{
		Cluster:  c.clusterInf.Get(c.space.Cluster()),
		Rollout:  etcdutil.Record[keys.Rollout](c.rolloutInf.Get(c.space.Rollout())),
		Progress: etcdutil.Record[keys.RolloutStatus](c.rolloutInf.Get(c.space.RolloutStatus())),
		Nodes:    map[string]*keys.Record[keys.Node]{},
		LeaseTTL: map[int64]time.Duration{},
		States:   map[string]*keys.Record[keys.NodeState]{},
		Specs:    map[string]*keys.Record[keys.NodeSpec]{},
		Hardware: map[string]*keys.Hardware{},
		Fences:   map[string][]*keys.Record[keys.Fence]{},
	}
	c.observeNodes(s)
	for _, r := range s.Nodes {
		if ttl, known := c.nodeTTLs.known(r.Lease); r.OK() && r.Lease != 0 && known {
			s.LeaseTTL[r.Lease] = ttl
		}
	}
	return s
}

// nodeView is what quick rounds take of a full round's snapshot: the nodes and the round's
// judgement of them, without the VMs' records, which the next full round's snapshot would
// otherwise double in memory while it decides (100,000 VMs' assignments and reports are hundreds
// of thousands of small maps).
func nodeView(s *decide.Snapshot, trusted *decide.Trusted) *decide.Snapshot {
	return &decide.Snapshot{
		Now: s.Now, Cluster: s.Cluster, Nodes: s.Nodes, LeaseTTL: s.LeaseTTL, States: s.States, Specs: s.Specs,
		Hardware: s.Hardware, Fences: s.Fences, Rollout: s.Rollout, Progress: s.Progress, Trusted: trusted,
	}
}

// forgetLeases drops what the replica knows about leases nothing refers to any more, so the
// memory follows the cluster's size rather than its history of boots.
func (c *Coordinator) forgetLeases(s *decide.Snapshot) {
	c.nodeTTLs.keepOnly(s.LeaseTTL, 2*len(s.Nodes)+64)
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.deadLease) > 2*len(s.States)+64 {
		keep := map[int64]bool{}
		for _, r := range s.States {
			if r.OK() && c.deadLease[r.Value.Lease] {
				keep[r.Value.Lease] = true
			}
		}
		c.deadLease = keep
	}
}

func hasFence(fs []*keys.Record[keys.Fence], boot string) bool {
	for _, f := range fs {
		if f.OK() && f.Value.BootID == boot {
			return true
		}
	}
	return false
}

// byNodeVM files per-node, per-VM records (/<root>/<hwid>/<vm>) by VM, then node.
func byNodeVM[T any](root string, rs []*keys.Record[T], out map[string]map[string]*keys.Record[T]) {
	for _, r := range rs {
		if hwid, name, ok := keys.ParseNodeScoped(root, r.Key); ok {
			if out[name] == nil {
				out[name] = map[string]*keys.Record[T]{}
			}
			out[name][hwid] = r
		}
	}
}

// fileOn files the records of each VM on the nodes an index names (on: VM -> nodes) by VM, then
// node; get reads a record from a cache, key names it.
func fileOn[T any](get func(string) *keys.Record[T], key func(hwid, name string) string, on map[string][]string, out map[string]map[string]*keys.Record[T]) {
	for name, nodes := range on {
		for _, hwid := range nodes {
			if r := get(key(hwid, name)); r != nil {
				if out[name] == nil {
					out[name] = map[string]*keys.Record[T]{}
				}
				out[name][hwid] = r
			}
		}
	}
}

// leaf files per-node records (/<prefix>/<hwid>) by node.
func leaf[T any](prefix string, rs []*keys.Record[T], out map[string]*keys.Record[T]) {
	for _, r := range rs {
		if hwid, ok := keys.ParseLeaf(prefix, r.Key); ok {
			out[hwid] = r
		}
	}
}

// leaseAlive asks etcd whether a lease still lives; known is false when etcd could not say. A lease
// found gone is remembered: it never comes back.
func (c *Coordinator) leaseAlive(ctx context.Context, id int64) (alive, known bool) {
	c.mu.Lock()
	dead := c.deadLease[id]
	c.mu.Unlock()
	if dead {
		return false, true
	}
	c.m.leaseQuestions.WithLabelValues("round").Inc()
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	resp, err := c.cfg.Client.TimeToLive(cctx, clientv3.LeaseID(id))
	if err != nil {
		c.log.Warn("lease check failed; assuming alive", "lease", fmt.Sprintf("%x", id), "error", err)
		return false, false
	}
	if resp.TTL <= 0 {
		c.mu.Lock()
		c.deadLease[id] = true
		c.mu.Unlock()
		return false, true
	}
	return true, true
}

// networks are the network records, by name.
func (c *Coordinator) networks() map[string]*keys.Record[keys.NetworkSpec] {
	return byLeaf(c.space.NetworkPrefix(), c.netInf)
}

// images are the VM image records and their statuses, by name.
func (c *Coordinator) images() (map[string]*keys.Record[keys.VMImage], map[string]*keys.Record[keys.VMImageStatus]) {
	return byLeaf(c.space.VMImagePrefix(), c.imgInf), byLeaf(c.space.VMImageStatusPrefix(), c.imgStatusInf)
}

func byLeaf[T any](prefix string, inf *etcdutil.Typed[T]) map[string]*keys.Record[T] {
	out := map[string]*keys.Record[T]{}
	for _, r := range inf.Unsorted() {
		if name, ok := keys.ParseLeaf(prefix, r.Key); ok {
			out[name] = r
		}
	}
	return out
}

// observeQuick builds a quick round's snapshot (decide/quick.go): of the VMs only those whose
// records changed and those waiting for a place, with the ledger's account of the capacity every
// other VM holds. The nodes are the last full round's view (base): any change to a node-level key
// since that round's start makes the round full, so a quick round only runs while that view is
// still what the caches hold. It returns nil when the round must be full after all (no full round
// yet, a restore recovery).
func (c *Coordinator) observeQuick(dirty []string, base *decide.Snapshot) *decide.Snapshot {
	if base == nil {
		return nil
	}
	sp := c.space
	s := &decide.Snapshot{
		Now:       time.Now(),
		Cluster:   base.Cluster,
		VMs:       map[string]*decide.VM{},
		Assigns:   map[string]map[string]*keys.Record[keys.Assignment]{},
		Reports:   map[string]map[string]*keys.Record[keys.VMStatus]{},
		Nodes:     base.Nodes,
		LeaseTTL:  base.LeaseTTL,
		States:    base.States,
		Specs:     base.Specs,
		Hardware:  base.Hardware,
		Fences:    base.Fences,
		Trusted:   base.Trusted,
		Rollout:   base.Rollout,
		Progress:  base.Progress,
		Volumes:   map[string]*keys.Record[keys.VolumeRecord]{},
		Vanished:  map[string]*keys.Placement{},
		FirstSeen: map[string]time.Time{},
		Occupied:  map[string]bool{},
	}
	if !s.Cluster.OK() || s.Cluster.Value.Collecting() || c.restoreWant.Load() > int64(s.Cluster.Value.RestoreGeneration()) {
		return nil // a restore recovery is a full round's
	}
	assigned, reported := map[string][]string{}, map[string][]string{}
	c.mu.Lock()
	s.Focus, s.Held = c.ledger.Quick(dirty)
	for _, name := range s.Focus {
		if v := c.vms[name]; v != nil {
			s.VMs[name] = v
		}
		if p := c.vanished[name]; p != nil {
			s.Vanished[name] = p
		}
		if t, ok := c.firstSeen[name]; ok {
			s.FirstSeen[name] = t
		}
		assigned[name], reported[name] = c.assignsOn[name], c.reportsOn[name]
	}
	for hwid := range s.Fences {
		s.Occupied[hwid] = c.ledger.Occupied(hwid)
	}
	c.mu.Unlock()
	fileOn(c.assignInf.Get, sp.Assign, assigned, s.Assigns)
	fileOn(c.statusInf.Get, sp.Status, reported, s.Reports)
	// The claims of the networks the VMs' NICs name: all a quick round allocates from.
	s.Networks = c.networks()
	s.Images, s.ImageStatus = c.images()
	s.Claims = map[string]map[string]*keys.Record[keys.AddressClaim]{}
	for _, v := range s.VMs {
		if !v.Spec.OK() {
			continue
		}
		for _, n := range v.Spec.Value.Networks {
			if n.Network != "" && s.Claims[n.Network] == nil {
				s.Claims[n.Network] = map[string]*keys.Record[keys.AddressClaim]{}
				c.mu.Lock()
				held := slices.Collect(maps.Keys(c.claimsOn[n.Network]))
				c.mu.Unlock()
				for _, ip := range held {
					if r := c.addrInf.Get(sp.Address(n.Network, ip)); r != nil {
						s.Claims[n.Network][ip] = r
					}
				}
			}
		}
	}
	for name, v := range s.VMs {
		if !v.Spec.OK() {
			continue
		}
		for _, d := range v.Spec.Value.DiskList() {
			image := keys.DiskImage(name, keys.SpecUID(v.Spec), d.Name)
			if r := c.volInf.Get(sp.Volume(d.Pool, image)); r != nil {
				s.Volumes[d.Pool+"/"+image] = r
			}
		}
	}
	return s
}
