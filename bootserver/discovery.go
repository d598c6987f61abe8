package bootserver

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/time/rate"

	"github.com/herdhq/herd/bootserver/httpboot"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/events"
	"github.com/herdhq/herd/lib/keys"
)

// discoveredTTL is how long an unknown machine stays listed after its last recorded attempt (about).
const discoveredTTL = 24 * time.Hour

// DiscoveryLimits bound what unknown machines cost etcd: anyone on the boot network can claim any
// MAC, as fast as it likes.
type DiscoveryLimits struct {
	// Max caps the records in /herd/discovered/: a new machine beyond it evicts the one seen least
	// recently (counted, and said in an event). Default 1000.
	Max int
	// Every is the least time between two writes of one MAC's record: the first request is written
	// at once, later ones are counted in memory and written with the next. Default 1 min.
	Every time.Duration
	// PerSource bounds the records one remote address may write per second (burst 5). Default 1.
	PerSource float64
	// Rate bounds all writes per second (burst twice that). Default 20.
	Rate float64
}

func (l *DiscoveryLimits) defaults() {
	if l.Max == 0 {
		l.Max = 1000
	}
	if l.Every == 0 {
		l.Every = time.Minute
	}
	if l.PerSource == 0 {
		l.PerSource = 1
	}
	if l.Rate == 0 {
		l.Rate = 20
	}
}

// discovery records unknown machines in /herd/discovered/<mac> at a bounded cost: a record is written
// when a MAC first asks and then at most once per Every (attempts in between are counted and
// carried by the next write), each remote address and the whole server are rate-limited, and the
// number of records is capped, the least recently seen evicted. The records of all bootservers are
// read from a watch-fed cache, so the cap holds across replicas (give or take a race).
type discovery struct {
	client *clientv3.Client
	space  keys.Space
	name   string
	lim    DiscoveryLimits
	inf    *etcdutil.Typed[keys.Discovered]
	events *events.Recorder
	log    hclog.Logger
	global *rate.Limiter

	evicted, dropped prometheus.Counter

	mu      sync.Mutex
	seen    map[string]*seenMAC
	sources map[string]*source
	lease   clientv3.LeaseID
	leaseAt time.Time
}

type seenMAC struct {
	written time.Time
	pending int // attempts since the last write
}

type source struct {
	lim  *rate.Limiter
	used time.Time
}

func newDiscovery(c *clientv3.Client, s keys.Space, name string, lim DiscoveryLimits, ev *events.Recorder, log hclog.Logger, reg prometheus.Registerer) *discovery {
	lim.defaults()
	d := &discovery{client: c, space: s, name: name, lim: lim, events: ev, log: log,
		inf:     etcdutil.NewTyped[keys.Discovered](c, s.DiscoveredPrefix(), nil, log),
		global:  rate.NewLimiter(rate.Limit(lim.Rate), max(1, int(2*lim.Rate))),
		seen:    map[string]*seenMAC{},
		sources: map[string]*source{},
		evicted: prometheus.NewCounter(prometheus.CounterOpts{Name: "herd_bootserver_discovered_evicted_total",
			Help: "Discovered-machine records removed to keep under the cap (the least recently seen)."}),
		dropped: prometheus.NewCounter(prometheus.CounterOpts{Name: "herd_bootserver_discovered_dropped_total",
			Help: "Unknown machines' requests not recorded because a rate limit was reached."}),
	}
	if reg != nil {
		reg.MustRegister(d.evicted, d.dropped)
	}
	return d
}

// record notes an unknown machine's attempt (why: what kept it from being recognised, or "").
func (d *discovery) record(ctx context.Context, m httpboot.Machine, why string) error {
	now := time.Now()
	d.mu.Lock()
	src := d.sources[m.Remote]
	if src == nil {
		src = &source{lim: rate.NewLimiter(rate.Limit(d.lim.PerSource), 5)}
		d.sources[m.Remote] = src
	}
	src.used = now
	s := d.seen[m.MAC]
	if s == nil {
		s = &seenMAC{}
		d.seen[m.MAC] = s
	}
	s.pending++
	due := now.Sub(s.written) >= d.lim.Every
	ok := due && src.lim.Allow() && d.global.Allow()
	pending := s.pending
	if ok {
		// Taken now so that concurrent requests of the MAC do not write too; put back below if
		// the write fails.
		s.written, s.pending = now, 0
	}
	d.forgetLocked(now)
	d.mu.Unlock()
	if !due {
		return nil
	}
	if !ok {
		d.dropped.Inc()
		return nil
	}
	if err := d.write(ctx, m, why, pending, now); err != nil {
		d.mu.Lock()
		s.written, s.pending = time.Time{}, s.pending+pending
		d.mu.Unlock()
		return err
	}
	return nil
}

// forgetLocked bounds the memory a flood of invented MACs and addresses can take: entries older
// than what they limit go once the maps grow past a few times the cap.
func (d *discovery) forgetLocked(now time.Time) {
	if len(d.seen) > 4*d.lim.Max {
		for mac, s := range d.seen {
			if now.Sub(s.written) > d.lim.Every {
				delete(d.seen, mac)
			}
		}
	}
	if len(d.sources) > 4*d.lim.Max {
		for addr, s := range d.sources {
			if now.Sub(s.used) > time.Minute {
				delete(d.sources, addr)
			}
		}
	}
}

// write puts the MAC's record, carrying the attempts counted since the last write; a new record
// beyond the cap evicts the least recently seen one in the same transaction.
func (d *discovery) write(ctx context.Context, m httpboot.Machine, why string, attempts int, now time.Time) error {
	lease, err := d.leaseID(ctx)
	if err != nil {
		return err
	}
	key := d.space.Discovered(m.MAC)
	cur := d.inf.Get(key)
	rec := &keys.Discovered{MAC: m.MAC, FirstSeen: now.UTC()}
	var modRev int64
	if cur != nil {
		modRev = cur.ModRevision
		if cur.OK() {
			cp, err := keys.Decode[keys.Discovered](cur.Raw) // a copy: the cached one is shared
			if err == nil {
				rec = cp
			}
		}
	}
	rec.LastSeen, rec.Attempts, rec.Bootserver, rec.Reason = now.UTC(), rec.Attempts+attempts, d.name, why
	if m.Serial != "" {
		rec.Serial = m.Serial
	}
	if m.UUID != "" {
		rec.UUID = m.UUID
	}
	if m.Arch != "" {
		rec.Arch = m.Arch
	}
	conds := []clientv3.Cmp{etcdutil.ModRev(key, modRev)}
	ops := []clientv3.Op{clientv3.OpPut(key, keys.MustEncode(rec), clientv3.WithLease(lease))}
	var victim *keys.Record[keys.Discovered]
	if cur == nil && d.inf.Len() >= d.lim.Max {
		victim = d.oldest()
		if victim != nil {
			conds = append(conds, etcdutil.ModRev(victim.Key, victim.ModRevision))
			ops = append(ops, clientv3.OpDelete(victim.Key))
		}
	}
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	tx, err := d.client.Txn(cctx).If(conds...).Then(ops...).Commit()
	if err != nil {
		d.mu.Lock()
		d.lease = 0 // perhaps gone (etcd restored): take a new one next time
		d.mu.Unlock()
		return fmt.Errorf("record discovered machine %s: %w", m.MAC, err)
	}
	if !tx.Succeeded {
		return nil // another bootserver wrote it (or the victim) meanwhile: the next attempt writes
	}
	// The cap is judged from the cache: let the next request see this record (briefly; a write
	// the cache has not shown yet only lets the cap be passed by the requests in flight).
	wctx, wcancel := context.WithTimeout(ctx, time.Second)
	_ = d.inf.WaitRev(wctx, tx.Header.Revision)
	wcancel()
	if victim != nil {
		d.evicted.Inc()
		d.log.Warn("discovered machines at their cap: the least recently seen record was removed", "cap", d.lim.Max, "removed", victim.Key)
		d.events.Record("bootserver/"+d.name, "discovered-evicted", "more than %d unknown machines: %s removed (seen least recently); many unknown MACs on the boot network?", d.lim.Max, victim.Key)
	}
	if cur == nil {
		d.log.Info("unknown machine asked to boot; waiting for approval", "mac", m.MAC, "serial", m.Serial, "remote", m.Remote, "reason", why,
			"hint", "herdctl hw approve "+m.MAC)
	}
	return nil
}

// oldest is the cached record seen least recently.
func (d *discovery) oldest() *keys.Record[keys.Discovered] {
	var out *keys.Record[keys.Discovered]
	for _, r := range d.inf.List() {
		switch {
		case out == nil:
			out = r
		case !r.OK():
			return r // unreadable: the first to go
		case out.OK() && r.Value.LastSeen.Before(out.Value.LastSeen):
			out = r
		}
	}
	return out
}

// leaseID is the lease discovered records hang on: shared, rotated hourly, so a record lives about a
// day after its last write without a lease per write.
func (d *discovery) leaseID(ctx context.Context) (clientv3.LeaseID, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.lease != 0 && time.Since(d.leaseAt) < time.Hour {
		return d.lease, nil
	}
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	l, err := d.client.Grant(cctx, int64((discoveredTTL+time.Hour)/time.Second))
	if err != nil {
		return 0, fmt.Errorf("grant discovered lease: %w", err)
	}
	d.lease, d.leaseAt = l.ID, time.Now()
	return l.ID, nil
}
