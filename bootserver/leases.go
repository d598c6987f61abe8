package bootserver

import (
	"context"
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"net"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/bootserver/dhcp"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

// leases is the full-mode address pool, kept in etcd so that any number of bootserver replicas hand
// out each address once. An address is held by two keys written together: /herd/dhcp/ips/<ip> (who
// holds it; created only if absent, which is the allocation) and /herd/dhcp/leases/<mac>, both under
// an etcd lease as long as the DHCP lease, so expired leases free themselves.
type leases struct {
	client     *clientv3.Client
	space      keys.Space
	start, end uint32
	leaseTime  time.Duration
	offerHold  time.Duration
}

func ipToU32(ip net.IP) uint32 { return binary.BigEndian.Uint32(ip.To4()) }
func u32ToIP(v uint32) net.IP {
	ip := make(net.IP, 4)
	binary.BigEndian.PutUint32(ip, v)
	return ip
}

func newLeases(c *clientv3.Client, s keys.Space, start, end net.IP, leaseTime time.Duration) (*leases, error) {
	if start.To4() == nil || end.To4() == nil || ipToU32(start) > ipToU32(end) {
		return nil, fmt.Errorf("dhcp range %v-%v: want two IPv4 addresses, low to high", start, end)
	}
	return &leases{client: c, space: s, start: ipToU32(start), end: ipToU32(end), leaseTime: leaseTime, offerHold: time.Minute}, nil
}

func (l *leases) inRange(ip net.IP) bool {
	if ip.To4() == nil {
		return false
	}
	v := ipToU32(ip)
	return v >= l.start && v <= l.end
}

func (l *leases) current(ctx context.Context, mac string) (*keys.DHCPLease, *clientv3.GetResponse, error) {
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	resp, err := l.client.Get(cctx, l.space.DHCPLease(mac))
	if err != nil || len(resp.Kvs) == 0 {
		return nil, resp, err
	}
	cur, err := keys.Decode[keys.DHCPLease](resp.Kvs[0].Value)
	return cur, resp, err
}

// claim writes both keys for mac and ip under a new etcd lease of ttl, if ip is free (or already
// mac's, at the revision read).
func (l *leases) claim(ctx context.Context, mac string, ip net.IP, ttl time.Duration, leaseModRev int64) (bool, error) {
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	g, err := l.client.Grant(cctx, int64(ttl/time.Second))
	if err != nil {
		return false, err
	}
	rec := keys.MustEncode(&keys.DHCPLease{MAC: mac, IP: ip.String()})
	ipKey, macKey := l.space.DHCPAddress(ip.String()), l.space.DHCPLease(mac)
	conds := []clientv3.Cmp{etcdutil.ModRev(macKey, leaseModRev)}
	if leaseModRev == 0 {
		conds = append(conds, etcdutil.CreateRev(ipKey, 0))
	}
	tx, err := l.client.Txn(cctx).If(conds...).Then(
		clientv3.OpPut(ipKey, rec, clientv3.WithLease(g.ID)),
		clientv3.OpPut(macKey, rec, clientv3.WithLease(g.ID)),
	).Commit()
	if err != nil || !tx.Succeeded {
		_, _ = l.client.Revoke(cctx, g.ID)
	}
	if err != nil {
		return false, err
	}
	return tx.Succeeded, nil
}

// Offer implements dhcp.Leases: the address the MAC holds, else a free one held briefly for the
// client's REQUEST. The search starts at a hash of the MAC, so a machine tends to get the same
// address again and replicas rarely race for one.
func (l *leases) Offer(ctx context.Context, mac string) (net.IP, error) {
	cur, _, err := l.current(ctx, mac)
	if err != nil {
		return nil, err
	}
	if cur != nil {
		if ip := net.ParseIP(cur.IP); ip != nil && l.inRange(ip) {
			return ip.To4(), nil
		}
	}
	size := l.end - l.start + 1
	h := fnv.New32a()
	_, _ = h.Write([]byte(mac))
	first := h.Sum32() % size
	for i := uint32(0); i < size; i++ {
		ip := u32ToIP(l.start + (first+i)%size)
		ok, err := l.claim(ctx, mac, ip, l.offerHold, 0)
		if err != nil {
			return nil, err
		}
		if ok {
			return ip, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
	}
	return nil, fmt.Errorf("address range exhausted (%d addresses)", size)
}

// Confirm implements dhcp.Leases.
func (l *leases) Confirm(ctx context.Context, mac string, ip net.IP) error {
	if !l.inRange(ip) {
		return dhcp.ErrNotOurs
	}
	cur, resp, err := l.current(ctx, mac)
	if err != nil {
		return err
	}
	var modRev int64
	if cur != nil {
		if cur.IP != ip.String() {
			return dhcp.ErrNotOurs
		}
		modRev = resp.Kvs[0].ModRevision
	}
	ok, err := l.claim(ctx, mac, ip, l.leaseTime, modRev)
	if err != nil {
		return err
	}
	if !ok {
		return dhcp.ErrNotOurs
	}
	return nil
}

// Release implements dhcp.Leases.
func (l *leases) Release(ctx context.Context, mac string) error {
	cur, resp, err := l.current(ctx, mac)
	if err != nil || cur == nil {
		return err
	}
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	_, err = l.client.Txn(cctx).If(etcdutil.ModRev(l.space.DHCPLease(mac), resp.Kvs[0].ModRevision)).Then(
		clientv3.OpDelete(l.space.DHCPLease(mac)),
		clientv3.OpDelete(l.space.DHCPAddress(cur.IP)),
	).Commit()
	return err
}
