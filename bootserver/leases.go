package bootserver

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/time/rate"

	"github.com/herdhq/herd/bootserver/dhcp"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

// leases is the full-mode address pool, kept in etcd so that any number of bootserver replicas hand
// out each address once. An address is held by two keys written together in one transaction:
// /herd/dhcp/ips/<ip> (the allocation: created, or taken over once expired, only if unchanged since
// read) and /herd/dhcp/leases/<mac> (the same record, found by MAC). A record's own Expires ends its
// hold; the keys hang on a lease this replica shares between all records it writes for a while
// (rotated every bucketEvery), so etcd removes them some time after they expire, and no etcd lease
// is made, or leaked, per address or per client.
//
// Candidates are chosen from a watch-fed cache of the pool, so an allocation is one transaction; a
// conflict (another replica took the address, or answered the same client first) brings the cache
// up to the conflicting revision and the choice is made again: replicas that disagree retry, never
// report a full pool that is not full.
type leases struct {
	client     *clientv3.Client
	space      keys.Space
	name       string
	start, end uint32
	leaseTime  time.Duration
	offerHold  time.Duration
	declined   time.Duration
	inf        *etcdutil.Typed[keys.DHCPLease]
	// newAllocs bounds how fast new clients take addresses (and write to etcd): a flood of
	// DISCOVERs from invented MACs is answered at this rate, the rest ignored and counted.
	newAllocs *rate.Limiter
	log       hclog.Logger

	mu          sync.Mutex
	bucket      clientv3.LeaseID
	bucketUntil time.Time
}

const bucketEvery = 10 * time.Minute

func ipToU32(ip net.IP) uint32 { return binary.BigEndian.Uint32(ip.To4()) }
func u32ToIP(v uint32) net.IP {
	ip := make(net.IP, 4)
	binary.BigEndian.PutUint32(ip, v)
	return ip
}

// errRateLimited: too many new clients at once; the client's DISCOVER is ignored (it retries).
var errRateLimited = fmt.Errorf("%w: new clients arrive faster than --dhcp-new-rate; ignored, the client will retry", dhcp.ErrBusy)

func newLeases(c *clientv3.Client, s keys.Space, name string, start, end net.IP, leaseTime time.Duration, newRate float64, log hclog.Logger) (*leases, error) {
	if start.To4() == nil || end.To4() == nil || ipToU32(start) > ipToU32(end) {
		return nil, fmt.Errorf("dhcp range %v-%v: want two IPv4 addresses, low to high", start, end)
	}
	if leaseTime < time.Minute {
		return nil, fmt.Errorf("dhcp lease time %s: want at least a minute", leaseTime)
	}
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return &leases{client: c, space: s, name: name, start: ipToU32(start), end: ipToU32(end), leaseTime: leaseTime,
		offerHold: time.Minute, declined: 10 * time.Minute, log: log,
		inf:       etcdutil.NewTyped[keys.DHCPLease](c, s.DHCPPrefix(), nil, log),
		newAllocs: rate.NewLimiter(rate.Limit(newRate), max(1, 2*int(newRate)))}, nil
}

// run keeps the pool's cache until ctx ends.
func (l *leases) run(ctx context.Context) { l.inf.Run(ctx) }

func (l *leases) synced(ctx context.Context) error { return l.inf.WaitRev(ctx, 0) }

func (l *leases) inRange(ip net.IP) bool {
	if ip.To4() == nil {
		return false
	}
	v := ipToU32(ip)
	return v >= l.start && v <= l.end
}

// live says whether a cached record still holds its address at now.
func live(r *keys.Record[keys.DHCPLease], now time.Time) bool {
	if r == nil {
		return false
	}
	if !r.OK() {
		return true // unreadable: never hand out what someone may hold
	}
	return r.Value.Expires.After(now)
}

// bucketLease is the etcd lease records written now hang on: granted once per bucketEvery, for long
// enough that a record written at the end of the period outlives its own Expires.
func (l *leases) bucketLease(ctx context.Context, hold time.Duration) (clientv3.LeaseID, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	if l.bucket != 0 && now.Add(hold).Before(l.bucketUntil) {
		return l.bucket, nil
	}
	ttl := max(l.leaseTime, l.declined) + bucketEvery + time.Minute
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	g, err := l.client.Grant(cctx, int64(ttl/time.Second))
	if err != nil {
		return 0, fmt.Errorf("grant the dhcp records' lease: %w", err)
	}
	l.bucket, l.bucketUntil = g.ID, now.Add(ttl-bucketEvery)
	return g.ID, nil
}

// write commits a record for mac at ip, conditioned on both keys being as the cache read them; old
// is the address mac held before, released in the same transaction. It returns the revision etcd
// answered at and whether the write held.
func (l *leases) write(ctx context.Context, mac string, ip net.IP, state string, hold time.Duration, ipRev, macRev int64, old string, oldRev int64) (int64, bool, error) {
	lease, err := l.bucketLease(ctx, hold)
	if err != nil {
		return 0, false, err
	}
	rec := keys.MustEncode(&keys.DHCPLease{MAC: mac, IP: ip.String(), State: state, Expires: time.Now().Add(hold).UTC(), By: l.name})
	ipKey, macKey := l.space.DHCPAddress(ip.String()), l.space.DHCPLease(mac)
	conds := []clientv3.Cmp{etcdutil.ModRev(ipKey, ipRev), etcdutil.ModRev(macKey, macRev)}
	ops := []clientv3.Op{clientv3.OpPut(ipKey, rec, clientv3.WithLease(lease)), clientv3.OpPut(macKey, rec, clientv3.WithLease(lease))}
	if old != "" && old != ip.String() && oldRev != 0 {
		conds = append(conds, etcdutil.ModRev(l.space.DHCPAddress(old), oldRev))
		ops = append(ops, clientv3.OpDelete(l.space.DHCPAddress(old)))
	}
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	tx, err := l.client.Txn(cctx).If(conds...).Then(ops...).Commit()
	if err != nil {
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			return 0, false, err
		}
		// The lease may be gone (etcd restored, revoked by hand): take a new one next time.
		l.mu.Lock()
		l.bucket = 0
		l.mu.Unlock()
		return 0, false, err
	}
	return tx.Header.Revision, tx.Succeeded, nil
}

// catchUp brings the cache to rev after a conflict, so the next choice sees what won.
func (l *leases) catchUp(ctx context.Context, rev int64) error { return l.inf.Sync(ctx, rev) }

// catchUpNow brings the cache to etcd's current revision.
func (l *leases) catchUpNow(ctx context.Context) error {
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	resp, err := l.client.Get(cctx, l.space.DHCPPrefix(), clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		return fmt.Errorf("read the dhcp pool's revision: %w", err)
	}
	return l.catchUp(ctx, resp.Header.Revision)
}

// settled waits (briefly) until the cache shows this replica's own write at rev, so the client's
// next packet is judged by it. Not seeing it in time is no error: the write stands, and a choice
// made from an older view only conflicts and is made again.
func (l *leases) settled(ctx context.Context, rev int64) {
	wctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	_ = l.inf.WaitRev(wctx, rev)
}

// mine returns mac's cached record and the record of the address it names (either may be nil).
func (l *leases) mine(mac string) (*keys.Record[keys.DHCPLease], *keys.Record[keys.DHCPLease]) {
	m := l.inf.Get(l.space.DHCPLease(mac))
	if !m.OK() {
		return m, nil
	}
	return m, l.inf.Get(l.space.DHCPAddress(m.Value.IP))
}

// holds says whether mac's record m and the address record a agree that mac holds a.
func holds(m, a *keys.Record[keys.DHCPLease], mac string) bool {
	return m.OK() && a.OK() && a.Value.MAC == mac && a.Value.IP == m.Value.IP && a.Value.State != keys.DHCPDeclined
}

// Offer implements dhcp.Leases: the address the MAC holds (no write while its hold lasts), else a
// free one held briefly for the client's REQUEST. The search starts at a hash of the MAC, so a
// machine tends to get the same address again and replicas rarely race for one.
func (l *leases) Offer(ctx context.Context, mac string) (net.IP, error) {
	size := l.end - l.start + 1
	h := fnv.New32a()
	_, _ = h.Write([]byte(mac))
	first := h.Sum32() % size
	limited, fresh := false, false
	for attempt := 0; attempt < 16; attempt++ {
		now := time.Now()
		m, a := l.mine(mac)
		var old string
		var oldRev int64
		if holds(m, a, mac) {
			ip := net.ParseIP(m.Value.IP).To4()
			if l.inRange(ip) {
				if m.Value.Expires.After(now.Add(l.offerHold / 2)) {
					return ip, nil // held long enough: nothing to write
				}
				rev, ok, err := l.write(ctx, mac, ip, keepState(m.Value.State), max(l.offerHold, time.Until(m.Value.Expires)), a.ModRevision, m.ModRevision, "", 0)
				if err != nil {
					return nil, err
				}
				if ok {
					l.settled(ctx, rev)
					return ip, nil
				}
				if err := l.catchUp(ctx, rev); err != nil {
					return nil, err
				}
				continue
			}
			old, oldRev = m.Value.IP, a.ModRevision // out of a changed range: give it up
		}
		if !limited {
			// Only clients without an address cost an allocation; counted once per request.
			if !l.newAllocs.Allow() {
				return nil, errRateLimited
			}
			limited = true
		}
		ip, ipRev, ok := l.candidate(first, size, now)
		if !ok && !fresh {
			// The cache may lag a release another replica just wrote: look again at etcd's
			// current revision before calling the pool full.
			fresh = true
			if err := l.catchUpNow(ctx); err != nil {
				return nil, err
			}
			continue
		}
		if !ok {
			return nil, fmt.Errorf("address range exhausted (%d addresses, all held)", size)
		}
		rev, won, err := l.write(ctx, mac, ip, keys.DHCPOffered, l.offerHold, ipRev, modRevOf(m), old, oldRev)
		if err != nil {
			return nil, err
		}
		if won {
			l.settled(ctx, rev)
			return ip, nil
		}
		if err := l.catchUp(ctx, rev); err != nil {
			return nil, err
		}
	}
	return nil, fmt.Errorf("%w: the pool kept changing under every choice (16 conflicts); ignored, the client will retry", dhcp.ErrBusy)
}

// keepState keeps a bound lease bound when its hold is refreshed.
func keepState(s string) string {
	if s == keys.DHCPBound {
		return s
	}
	return keys.DHCPOffered
}

func modRevOf(r *keys.Record[keys.DHCPLease]) int64 {
	if r == nil {
		return 0
	}
	return r.ModRevision
}

// candidate picks the first address from the MAC's starting point that no live record holds.
func (l *leases) candidate(first, size uint32, now time.Time) (net.IP, int64, bool) {
	for i := uint32(0); i < size; i++ {
		ip := u32ToIP(l.start + (first+i)%size)
		r := l.inf.Get(l.space.DHCPAddress(ip.String()))
		if !live(r, now) {
			return ip, modRevOf(r), true
		}
	}
	return nil, 0, false
}

// Confirm implements dhcp.Leases: the REQUEST of an address offered to mac (or held by it, or free,
// for a client that reboots with the address it had): the record becomes a lease of leaseTime.
func (l *leases) Confirm(ctx context.Context, mac string, ip net.IP) error {
	if !l.inRange(ip) {
		return dhcp.ErrNotOurs
	}
	ip = ip.To4()
	for attempt := 0; attempt < 4; attempt++ {
		now := time.Now()
		m, _ := l.mine(mac)
		a := l.inf.Get(l.space.DHCPAddress(ip.String()))
		var old string
		var oldRev int64
		switch {
		case a.OK() && a.Value.MAC == mac && a.Value.State != keys.DHCPDeclined:
			// Offered to or held by mac.
		case live(a, now):
			return dhcp.ErrNotOurs
		}
		if m.OK() && m.Value.IP != ip.String() {
			if oa := l.inf.Get(l.space.DHCPAddress(m.Value.IP)); oa.OK() && oa.Value.MAC == mac {
				old, oldRev = m.Value.IP, oa.ModRevision
			}
		}
		rev, ok, err := l.write(ctx, mac, ip, keys.DHCPBound, l.leaseTime, modRevOf(a), modRevOf(m), old, oldRev)
		if err != nil {
			return err
		}
		if ok {
			l.settled(ctx, rev)
			return nil
		}
		if err := l.catchUp(ctx, rev); err != nil {
			return err
		}
	}
	return dhcp.ErrNotOurs
}

// Release implements dhcp.Leases.
func (l *leases) Release(ctx context.Context, mac string) error {
	m, a := l.mine(mac)
	if !m.OK() {
		return nil
	}
	conds := []clientv3.Cmp{etcdutil.ModRev(m.Key, m.ModRevision)}
	ops := []clientv3.Op{clientv3.OpDelete(m.Key)}
	if holds(m, a, mac) {
		conds = append(conds, etcdutil.ModRev(a.Key, a.ModRevision))
		ops = append(ops, clientv3.OpDelete(a.Key))
	}
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	tx, err := l.client.Txn(cctx).If(conds...).Then(ops...).Commit()
	if err == nil {
		l.settled(ctx, tx.Header.Revision)
	}
	return err
}

// Decline implements dhcp.Leases: the address goes out of use for a while, the client's hold ends.
func (l *leases) Decline(ctx context.Context, mac string, ip net.IP) error {
	if !l.inRange(ip) {
		return nil
	}
	a := l.inf.Get(l.space.DHCPAddress(ip.To4().String()))
	if !a.OK() || a.Value.MAC != mac {
		return nil // not ours to judge: a client declines what it was offered
	}
	lease, err := l.bucketLease(ctx, l.declined)
	if err != nil {
		return err
	}
	rec := keys.MustEncode(&keys.DHCPLease{IP: a.Value.IP, State: keys.DHCPDeclined, Expires: time.Now().Add(l.declined).UTC(), By: l.name})
	conds := []clientv3.Cmp{etcdutil.ModRev(a.Key, a.ModRevision)}
	ops := []clientv3.Op{clientv3.OpPut(a.Key, rec, clientv3.WithLease(lease))}
	if m := l.inf.Get(l.space.DHCPLease(mac)); m.OK() && m.Value.IP == a.Value.IP {
		conds = append(conds, etcdutil.ModRev(m.Key, m.ModRevision))
		ops = append(ops, clientv3.OpDelete(m.Key))
	}
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	tx, err := l.client.Txn(cctx).If(conds...).Then(ops...).Commit()
	if err == nil && tx.Succeeded {
		l.settled(ctx, tx.Header.Revision)
		l.log.Warn("address declined: a client found it in use; not offered for a while", "ip", a.Value.IP, "mac", mac, "for", l.declined)
	}
	return err
}
