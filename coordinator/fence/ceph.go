package fence

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"
)

// CephAdmin is what the ceph fencer needs of a cluster (lib/volume/rbd.Backend implements it).
type CephAdmin interface {
	Blocklist(ctx context.Context, addr string, expire time.Duration) error
	Unblocklist(ctx context.Context, addr string) error
	BlocklistAddrs(ctx context.Context) (map[string]bool, error)
	OSDMapEpoch(ctx context.Context) (int64, error)
	ImageClients(ctx context.Context, pool, image string) ([]string, error)
}

// Ceph fences a node from its VMs' disks: it blocklists the node's storage address in the OSD map
// (plus the exact addresses of the clients holding its VMs' images at that address), verifies the
// entries, and records the osdmap epoch they came into force at. A blocklisted client's writes are
// refused by every OSD: a partitioned node that still runs its VMs can no longer touch their disks,
// which is what makes starting them elsewhere safe. This is what ceph-csi's NetworkFence does.
type Ceph struct {
	Admin  CephAdmin
	Expire time.Duration // default 24 h; renewed while the fence stands
}

// Detail keys the ceph fencer records.
const (
	DetailBlocklist = "blocklist"    // comma-separated addresses
	DetailEpoch     = "osdmap_epoch" // the epoch after the entries were added
	DetailExpires   = "blocklist_expires"
)

// Name implements Fencer.
func (Ceph) Name() string { return "ceph" }

func (c Ceph) expire() time.Duration {
	if c.Expire == 0 {
		return 24 * time.Hour
	}
	return c.Expire
}

// Fence implements Fencer.
func (c Ceph) Fence(ctx context.Context, t Target) (map[string]string, error) {
	if t.StorageIP == "" {
		return nil, errors.New("the node has no storage_ip in its hardware record: it cannot be fenced from Ceph, so its VMs do not move (set one with 'herdctl hw add NODE --storage-ip IP')")
	}
	addrs := map[string]bool{t.StorageIP + ":0/0": true}
	for _, disk := range t.Disks {
		pool, image, _ := strings.Cut(disk, "/")
		clients, err := c.Admin.ImageClients(ctx, pool, image)
		if err != nil {
			return nil, fmt.Errorf("clients of %s: %w", disk, err)
		}
		for _, a := range clients {
			if addrIP(a) == t.StorageIP {
				addrs[strings.TrimPrefix(strings.TrimPrefix(a, "v1:"), "v2:")] = true
			}
		}
	}
	list := make([]string, 0, len(addrs))
	for a := range addrs {
		list = append(list, a)
	}
	sort.Strings(list)
	for _, a := range list {
		if err := c.Admin.Blocklist(ctx, a, c.expire()); err != nil {
			return nil, fmt.Errorf("blocklist %s: %w", a, err)
		}
	}
	in, err := c.Admin.BlocklistAddrs(ctx)
	if err != nil {
		return nil, err
	}
	for _, a := range list {
		if !in[a] {
			return nil, fmt.Errorf("blocklist entry %s not found after adding it", a)
		}
	}
	epoch, err := c.Admin.OSDMapEpoch(ctx)
	if err != nil {
		return nil, err
	}
	return map[string]string{
		DetailBlocklist: strings.Join(list, ","),
		DetailEpoch:     strconv.FormatInt(epoch, 10),
		DetailExpires:   time.Now().Add(c.expire()).UTC().Format(time.RFC3339),
	}, nil
}

// Renew re-adds the entries of a standing fence before they expire; it returns the new details.
func (c Ceph) Renew(ctx context.Context, details map[string]string) (map[string]string, error) {
	out := map[string]string{}
	for k, v := range details {
		out[k] = v
	}
	for _, a := range splitList(details[DetailBlocklist]) {
		if err := c.Admin.Blocklist(ctx, a, c.expire()); err != nil {
			return nil, fmt.Errorf("renew blocklist %s: %w", a, err)
		}
	}
	out[DetailExpires] = time.Now().Add(c.expire()).UTC().Format(time.RFC3339)
	return out, nil
}

// Unfence removes the entries: the node rebooted (a new boot id) or an operator cleared the fence.
func (c Ceph) Unfence(ctx context.Context, details map[string]string) error {
	for _, a := range splitList(details[DetailBlocklist]) {
		if err := c.Admin.Unblocklist(ctx, a); err != nil {
			return fmt.Errorf("unblocklist %s: %w", a, err)
		}
	}
	return nil
}

// RenewDue reports whether the entries expire within half their lifetime.
func (c Ceph) RenewDue(details map[string]string) bool {
	exp, err := time.Parse(time.RFC3339, details[DetailExpires])
	if err != nil {
		return false
	}
	return time.Until(exp) < c.expire()/2
}

func splitList(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, ",")
}

func addrIP(addr string) string {
	a := strings.TrimPrefix(strings.TrimPrefix(addr, "v1:"), "v2:")
	if i := strings.LastIndexByte(a, '/'); i >= 0 {
		a = a[:i]
	}
	if i := strings.LastIndexByte(a, ':'); i >= 0 {
		a = a[:i]
	}
	return strings.Trim(a, "[]")
}

// Unfencer is implemented by fencers whose fence must be undone when the node comes back clean.
type Unfencer interface {
	Unfence(ctx context.Context, details map[string]string) error
}

// Renewer is implemented by fencers whose fence expires unless renewed.
type Renewer interface {
	RenewDue(details map[string]string) bool
	Renew(ctx context.Context, details map[string]string) (map[string]string, error)
}

// Unfence undoes what any of the fencers in a (possibly combined) fencer did.
func (a All) Unfence(ctx context.Context, details map[string]string) error {
	for _, f := range a {
		if u, ok := f.(Unfencer); ok {
			if err := u.Unfence(ctx, details); err != nil {
				return err
			}
		}
	}
	return nil
}

// RenewDue implements Renewer for a combination.
func (a All) RenewDue(details map[string]string) bool {
	for _, f := range a {
		if r, ok := f.(Renewer); ok && r.RenewDue(details) {
			return true
		}
	}
	return false
}

// Renew implements Renewer for a combination.
func (a All) Renew(ctx context.Context, details map[string]string) (map[string]string, error) {
	out := details
	for _, f := range a {
		if r, ok := f.(Renewer); ok {
			d, err := r.Renew(ctx, out)
			if err != nil {
				return nil, err
			}
			out = d
		}
	}
	return out, nil
}
