package agent

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

// keepRegistered holds the node key under a lease for as long as ctx lives, registering again with a
// new lease whenever the old one is lost. registered is closed after the first registration.
func (a *Agent) keepRegistered(ctx context.Context, registered chan struct{}) {
	b := etcdutil.Backoff{Min: 500 * time.Millisecond, Max: 5 * time.Second}
	first := true
	for ctx.Err() == nil {
		lease, err := a.register(ctx)
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			a.log.Warn("registration failed; retrying", "error", err)
			b.Wait(ctx)
			continue
		}
		b.Reset()
		if first {
			close(registered)
			first = false
		}
		a.keepAlive(ctx, lease)
		if ctx.Err() == nil {
			a.metrics.leaseLost.Inc()
			a.log.Warn("node lease lost; registering again", "lease", fmt.Sprintf("%x", lease))
		}
	}
	a.deregister()
}

func (a *Agent) register(ctx context.Context) (clientv3.LeaseID, error) {
	info, err := a.hv.Info(ctx)
	if err != nil {
		return 0, fmt.Errorf("read host facts: %w", err)
	}
	if a.cfg.CPUs > 0 {
		info.CPUs = a.cfg.CPUs
	}
	if a.cfg.MemoryMiB > 0 {
		info.MemoryMiB = a.cfg.MemoryMiB
	}
	ttl := int64(a.cfg.LeaseTTL / time.Second)
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	grant, err := a.cfg.Client.Grant(cctx, ttl)
	if err != nil {
		return 0, fmt.Errorf("grant lease: %w", err)
	}
	node := keys.Node{
		HWID:              a.hwid,
		Lease:             int64(grant.ID),
		BootID:            a.cfg.BootID,
		Hostname:          a.cfg.Hostname,
		Addresses:         a.cfg.Addresses,
		LibvirtURI:        a.hv.URI(),
		Image:             a.cfg.Image,
		CPUs:              info.CPUs,
		MemoryMiB:         info.MemoryMiB,
		ReservedMemoryMiB: a.cfg.ReservedMemoryMiB,
		AgentVersion:      a.cfg.Version,
		Features:          keys.AgentFeatures,
		Started:           time.Now().UTC(),
		StatusURL:         a.cfg.StatusURL,
		ConsoleURL:        a.cfg.ConsoleURL,
		MigrationURI:      a.cfg.MigrationURI,
		BootDir:           a.cfg.BootDir,
		Uplink:            a.cfg.Uplink,
		Recovery:          a.inv.Load(),
		Problem:           a.problem(),
	}
	b, err := keys.Encode(&node)
	if err != nil {
		return 0, err
	}
	floor := etcdutil.MaxRev(a.caches())
	put, err := a.cfg.Client.Put(cctx, a.space.Node(a.hwid), string(b), clientv3.WithLease(grant.ID))
	if err != nil {
		return 0, fmt.Errorf("put node key: %w", err)
	}
	a.checkRevision(floor, put.Header.Revision)
	a.node.Store(&node)
	a.leaseID.Store(int64(grant.ID))
	a.markAlive(grant.TTL)
	a.log.Info("node registered", "lease", fmt.Sprintf("%x", grant.ID), "ttl", grant.TTL, "cpus", info.CPUs, "memory_mib", info.MemoryMiB)
	a.events.Record("node/"+a.hwid, "registered", "boot %s, %d CPUs, %d MiB", a.cfg.BootID, info.CPUs, info.MemoryMiB)
	return grant.ID, nil
}

// markAlive records that the lease was confirmed now with ttl seconds left. One second of margin
// covers the time the confirmation took to arrive.
func (a *Agent) markAlive(ttl int64) {
	until := time.Now().Add(time.Duration(ttl)*time.Second - time.Second)
	a.aliveUntil.Store(until.UnixNano())
}

// leaseAlive says whether the node's lease is surely still alive.
func (a *Agent) leaseAlive() bool {
	return time.Now().UnixNano() < a.aliveUntil.Load()
}

func (a *Agent) keepAlive(ctx context.Context, lease clientv3.LeaseID) {
	kctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch, err := a.cfg.Client.KeepAlive(kctx, lease)
	if err != nil {
		a.aliveUntil.Store(0)
		return
	}
	// Someone deleting the node key by hand does not end the lease; put the key back.
	key := a.space.Node(a.hwid)
	wch := a.cfg.Client.Watch(clientv3.WithRequireLeader(kctx), key)
	floor := etcdutil.MaxRev(a.caches())
	for {
		select {
		case resp, ok := <-ch:
			if !ok {
				// Closed when ctx ends or the lease is gone (expired, revoked, or unreachable
				// past its TTL).
				a.aliveUntil.Store(0)
				return
			}
			a.markAlive(resp.TTL)
			if rev, ok := etcdutil.CheckAnswer(kctx, a.cfg.Client, a.caches(), floor, resp.Revision); ok {
				a.noteRevision(rev)
			}
			floor = etcdutil.MaxRev(a.caches())
		case wr, ok := <-wch:
			if !ok {
				wch = a.cfg.Client.Watch(clientv3.WithRequireLeader(kctx), key)
				continue
			}
			for _, ev := range wr.Events {
				if ev.Type == clientv3.EventTypeDelete && a.leaseAlive() {
					a.reput(kctx, lease)
				}
			}
		}
	}
}

// checkRevision hands a revision etcd answered a request with to the caches, with floor, the newest
// revision they reflected before the request was made (see etcdutil.CheckRevisions).
func (a *Agent) checkRevision(floor, rev int64) bool {
	return etcdutil.CheckRevisions(a.caches(), floor, rev)
}

// caches are the agent's informers.
func (a *Agent) caches() []*etcdutil.Informer {
	return []*etcdutil.Informer{a.assigns.Informer, a.cluster.Informer, a.fences.Informer, a.cmdsInf.Informer}
}

// reput writes the node record again under the same lease.
func (a *Agent) reput(ctx context.Context, lease clientv3.LeaseID) {
	n := a.node.Load()
	if n == nil {
		return
	}
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	if _, err := a.cfg.Client.Put(cctx, a.space.Node(a.hwid), keys.MustEncode(n), clientv3.WithLease(lease)); err != nil {
		a.log.Warn("node key was deleted; putting it back failed", "error", err)
		return
	}
	a.log.Warn("node key was deleted by someone; put it back")
}

// deregister revokes the lease on a clean stop, so the node leaves at once rather than after its TTL.
// The key is first marked leaving, so the leader reads the disappearance as a departure, not a
// death: the domains keep running and must not be fenced or started elsewhere.
func (a *Agent) deregister() {
	id := clientv3.LeaseID(a.leaseID.Load())
	if id == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if n := a.node.Load(); n != nil && a.leaseAlive() {
		leaving := *n
		leaving.Leaving = true
		if _, err := a.cfg.Client.Put(ctx, a.space.Node(a.hwid), keys.MustEncode(&leaving), clientv3.WithLease(id)); err != nil {
			a.log.Warn("could not mark the node leaving", "error", err)
		}
	}
	if _, err := a.cfg.Client.Revoke(ctx, id); err != nil {
		a.log.Warn("could not revoke the node lease; the node will leave when it expires", "error", err)
		return
	}
	a.log.Info("node deregistered")
}

// Unready is a node that is up but cannot run VMs (its libvirtd does not start): what it tells the
// cluster instead of registering capacity.
type Unready struct {
	Client       *clientv3.Client
	Space        keys.Space
	HWID, BootID string
	Hostname     string
	Addresses    keys.Addresses
	Image        string
	Version      string
	LeaseTTL     time.Duration
	Log          hclog.Logger
}

// ReportUnready registers the node with problem and no capacity until ctx ends (the problem is
// fixed, or the process stops), then revokes that registration's lease: the leader keeps the node
// out of scheduling with the reason, and `herdctl node get` shows it.
func ReportUnready(ctx context.Context, u Unready, problem func() string) error {
	if u.LeaseTTL == 0 {
		u.LeaseTTL = 10 * time.Second
	}
	bo := etcdutil.Backoff{Min: time.Second, Max: 10 * time.Second}
	for ctx.Err() == nil {
		err := reportUnready(ctx, u, problem)
		if ctx.Err() != nil {
			return nil
		}
		u.Log.Warn("cannot report the node's problem to etcd; retrying", "error", err)
		bo.Wait(ctx)
	}
	return nil
}

func reportUnready(ctx context.Context, u Unready, problem func() string) error {
	cctx, cancel := etcdutil.WithTimeout(ctx)
	grant, err := u.Client.Grant(cctx, int64(u.LeaseTTL/time.Second))
	cancel()
	if err != nil {
		return fmt.Errorf("grant lease: %w", err)
	}
	defer func() {
		rctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, _ = u.Client.Revoke(rctx, grant.ID)
		cancel()
	}()
	ka, err := u.Client.KeepAlive(ctx, grant.ID)
	if err != nil {
		return fmt.Errorf("keep the lease alive: %w", err)
	}
	last := ""
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
	for {
		if p := problem(); p != last {
			n := keys.Node{HWID: u.HWID, Lease: int64(grant.ID), BootID: u.BootID, Hostname: u.Hostname, Addresses: u.Addresses,
				Image: u.Image, AgentVersion: u.Version, Started: time.Now().UTC(), Problem: p}
			cctx, cancel := etcdutil.WithTimeout(ctx)
			_, err := u.Client.Put(cctx, u.Space.Node(u.HWID), keys.MustEncode(&n), clientv3.WithLease(grant.ID))
			cancel()
			if err != nil {
				return fmt.Errorf("register the node's problem: %w", err)
			}
			u.Log.Error("node registered without capacity: it cannot run VMs", "problem", p)
			last = p
		}
		select {
		case <-ctx.Done():
			return nil
		case _, ok := <-ka:
			if !ok {
				return fmt.Errorf("lease %x lost", grant.ID)
			}
		case <-tick.C:
		}
	}
}
