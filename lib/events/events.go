// Package events writes herd's audit trail: /herd/events/<time>-<id>, one JSON record per thing a
// daemon did or refused to do, kept for about a week.
//
// Every record is attached to a shared lease that lives Retention; a new lease is taken every
// Rotation, so records expire in batches without one lease per record (etcd's lease table stays
// small). Each writer appends under its own prefix (/herd/events/<writer>/), which etcd's RBAC
// confines it to: a node can add and remove its own records only. The leader removes records that
// break the rules (no lease, a lease longer than Retention, larger than MaxBytes, too many from one
// writer), because etcd itself cannot refuse them.
package events

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

// Defaults: records live between Retention-Rotation and Retention.
const (
	Retention = 7 * 24 * time.Hour
	Rotation  = 24 * time.Hour
	// MaxBytes bounds one record as stored; messages are cut to fit.
	MaxBytes = 4096
	// MaxPerWriter bounds the records one writer keeps; beyond it the oldest are removed.
	MaxPerWriter = 20000
)

// Recorder queues records and writes them in the background, so a reconcile loop never waits on
// the audit trail. When etcd is slow and the queue is full, records are dropped and counted.
type Recorder struct {
	client *clientv3.Client
	space  keys.Space
	writer keys.EventWriter
	actor  string
	user   string
	log    hclog.Logger
	ch     chan keys.Event

	lease   clientv3.LeaseID
	leaseAt time.Time
	dropped atomic.Int64
}

// New prepares a recorder writing under writer's prefix for actor (e.g. "coordinator/host-a",
// "agent/52:54:00:..") acting as the etcd user user ("" without TLS).
func New(c *clientv3.Client, space keys.Space, writer keys.EventWriter, actor, user string, log hclog.Logger) *Recorder {
	return &Recorder{client: c, space: space, writer: writer, actor: actor, user: user, log: log.Named("events"), ch: make(chan keys.Event, 1024)}
}

// encode stamps and encodes an event, cutting its message so that the record fits MaxBytes.
func encode(ev *keys.Event) string {
	b := keys.MustEncode(ev)
	for len(b) > MaxBytes && len(ev.Message) > 0 {
		cut := max(0, len(ev.Message)-(len(b)-MaxBytes)-len("…"))
		for cut > 0 && !utf8.RuneStart(ev.Message[cut]) {
			cut--
		}
		ev.Message = ev.Message[:cut] + "…"
		b = keys.MustEncode(ev)
	}
	return b
}

// Record queues one event. object is kind/name, e.g. vm/web1.
func (r *Recorder) Record(object, action, format string, args ...any) {
	if r == nil {
		return
	}
	ev := keys.Event{Time: time.Now().UTC(), Actor: r.actor, User: r.user, Object: object, Action: action, Message: fmt.Sprintf(format, args...)}
	select {
	case r.ch <- ev:
	default:
		r.dropped.Add(1)
	}
}

// Dropped counts records lost to a full queue.
func (r *Recorder) Dropped() int64 { return r.dropped.Load() }

// Run writes queued records until ctx ends.
func (r *Recorder) Run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-r.ch:
			if err := r.write(ctx, ev); err != nil && ctx.Err() == nil {
				r.log.Warn("event not recorded", "object", ev.Object, "action", ev.Action, "error", err)
			}
		}
	}
}

func (r *Recorder) write(ctx context.Context, ev keys.Event) error {
	if r.lease == 0 || time.Since(r.leaseAt) > Rotation {
		cctx, cancel := etcdutil.WithTimeout(ctx)
		l, err := r.client.Grant(cctx, int64(Retention/time.Second))
		cancel()
		if err != nil {
			return fmt.Errorf("grant event lease: %w", err)
		}
		r.lease, r.leaseAt = l.ID, time.Now()
	}
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	_, err := r.client.Put(cctx, r.space.Event(r.writer, ev.Time, randomID()), encode(&ev), clientv3.WithLease(r.lease))
	if err != nil {
		r.lease = 0 // the lease may have expired (etcd restored, clock jump): take a new one
	}
	return err
}

func randomID() string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// RecordNow writes one event synchronously under its own lease; for short-lived processes such as
// herdctl, whose operator actions are rare enough that a lease each costs nothing.
func RecordNow(ctx context.Context, c *clientv3.Client, space keys.Space, writer keys.EventWriter, actor, user, object, action, msg string) error {
	ev := keys.Event{Time: time.Now().UTC(), Actor: actor, User: user, Object: object, Action: action, Message: msg}
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	l, err := c.Grant(cctx, int64(Retention/time.Second))
	if err != nil {
		return fmt.Errorf("grant event lease: %w", err)
	}
	_, err = c.Put(cctx, space.Event(writer, ev.Time, randomID()), encode(&ev), clientv3.WithLease(l.ID))
	return err
}

// Flush waits, at most timeout, until the queue is empty: before an action that may end the
// process (a reboot), so its record is not lost. Best effort: the last record may still be in flight.
func (r *Recorder) Flush(ctx context.Context, timeout time.Duration) {
	if r == nil {
		return
	}
	deadline := time.Now().Add(timeout)
	for len(r.ch) > 0 && time.Now().Before(deadline) {
		if !etcdutil.Sleep(ctx, 20*time.Millisecond) {
			return
		}
	}
	etcdutil.Sleep(ctx, 50*time.Millisecond) // the one being written
}
