package agent

import (
	"context"
	"fmt"
	"time"

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
		Started:           time.Now().UTC(),
		StatusURL:         a.cfg.StatusURL,
	}
	b, err := keys.Encode(&node)
	if err != nil {
		return 0, err
	}
	if _, err := a.cfg.Client.Put(cctx, a.space.Node(a.hwid), string(b), clientv3.WithLease(grant.ID)); err != nil {
		return 0, fmt.Errorf("put node key: %w", err)
	}
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
	for resp := range ch {
		a.markAlive(resp.TTL)
	}
	// The channel closes when ctx ends or the lease is gone (expired, revoked, or unreachable
	// past its TTL).
	a.aliveUntil.Store(0)
}

// deregister revokes the lease on a clean stop, so the node leaves at once rather than after its TTL.
func (a *Agent) deregister() {
	id := clientv3.LeaseID(a.leaseID.Load())
	if id == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if _, err := a.cfg.Client.Revoke(ctx, id); err != nil {
		a.log.Warn("could not revoke the node lease; the node will leave when it expires", "error", err)
		return
	}
	a.log.Info("node deregistered")
}
