package ctl

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/keys"
)

func eventsCmd(e *env) *cobra.Command {
	var (
		o      outputFlag
		object string
		since  time.Duration
		limit  int
		follow bool
	)
	cmd := &cobra.Command{
		Use:   "events",
		Short: "Show the audit trail: what each daemon and operator did, and why",
		Example: `  herdctl events
  herdctl events --object vm/web1
  herdctl events --since 10m --follow`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := o.validate(); err != nil {
				return err
			}
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			evs, rev, err := e.readEvents(ctx, since, limit, func(ev *keys.Event) bool { return match(object, ev) })
			cancel()
			if err != nil {
				return err
			}
			print := func(evs []*keys.Event, header bool) error {
				if o.format == "json" || o.format == "yaml" {
					for _, ev := range evs {
						if err := o.print(e.out, ev, nil); err != nil {
							return err
						}
					}
					return nil
				}
				t := &table{}
				// USER (the etcd user the writer authenticated as) only where TLS is on.
				users := false
				for _, ev := range evs {
					users = users || ev.User != ""
				}
				cols := []string{"TIME", "OBJECT", "ACTION", "ACTOR", "MESSAGE"}
				if users {
					cols = []string{"TIME", "OBJECT", "ACTION", "ACTOR", "USER", "MESSAGE"}
				}
				for _, c := range cols {
					t.col(c, false)
				}
				for _, ev := range evs {
					row := []string{ev.Time.Local().Format("2006-01-02 15:04:05.000"), ev.Object, ev.Action, ev.Actor}
					if users {
						row = append(row, orDash(ev.User))
					}
					t.row(append(row, ev.Message)...)
				}
				if !header {
					t.header = nil
				}
				return o.print(e.out, nil, t)
			}
			if err := print(evs, true); err != nil {
				return err
			}
			if !follow {
				return nil
			}
			wch := e.client.Watch(clientv3.WithRequireLeader(cmd.Context()), e.space.EventPrefix(), clientv3.WithPrefix(), clientv3.WithRev(rev+1))
			for wr := range wch {
				if err := wr.Err(); err != nil {
					return fmt.Errorf("follow events: %w", err)
				}
				var batch []*keys.Event
				for _, we := range wr.Events {
					if we.Type != clientv3.EventTypePut {
						continue
					}
					if ev, err := keys.Decode[keys.Event](we.Kv.Value); err == nil && match(object, ev) {
						e.writerOf(string(we.Kv.Key), ev)
						batch = append(batch, ev)
					}
				}
				if err := print(batch, false); err != nil {
					return err
				}
			}
			return cmd.Context().Err()
		},
	}
	o.add(cmd)
	f := cmd.Flags()
	f.StringVar(&object, "object", "", "only events of this object, e.g. vm/web1 or node/52:54:00:00:00:01")
	f.DurationVar(&since, "since", 0, "only events newer than this, e.g. 10m")
	f.IntVar(&limit, "limit", 200, "at most this many past events (0: all)")
	f.BoolVarP(&follow, "follow", "f", false, "keep printing new events until interrupted")
	return cmd
}

func match(object string, ev *keys.Event) bool {
	return object == "" || ev.Object == object || strings.HasPrefix(ev.Object, object+"/")
}

// writerOf puts who wrote an event, as its key says (each writer may write only under its own
// prefix), in place of the actor the record claims when the two disagree.
func (e *env) writerOf(key string, ev *keys.Event) {
	w, _, ok := e.space.ParseEvent(key)
	if !ok {
		return
	}
	want := map[keys.EventWriter]string{keys.EventsByCoordinator: "coordinator/", keys.EventsByOperator: "herdctl/", keys.EventsByBootserver: "bootserver/"}[w]
	if node, isNode := strings.CutPrefix(string(w), "node/"); isNode {
		if ev.Actor != "agent/"+node {
			ev.Actor = fmt.Sprintf("agent/%s (claims %s)", node, ev.Actor)
		}
	} else if want != "" && !strings.HasPrefix(ev.Actor, want) {
		ev.Actor = fmt.Sprintf("%s* (claims %s)", want, ev.Actor)
	}
}

// readEvents returns the events of the last since (all when 0) that keep, oldest first, at most
// limit of them (0: all), and the revision it read at. Each writer has its own prefix, so time
// order is made here: first the keys alone (they carry the time), then the values of the newest.
func (e *env) readEvents(ctx context.Context, since time.Duration, limit int, keep func(*keys.Event) bool) ([]*keys.Event, int64, error) {
	type ref struct {
		key string
		at  time.Time
	}
	var refs []ref
	var rev int64
	from, end := e.space.EventPrefix(), clientv3.GetPrefixRangeEnd(e.space.EventPrefix())
	cutoff := time.Time{}
	if since > 0 {
		cutoff = time.Now().Add(-since)
	}
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithKeysOnly(), clientv3.WithLimit(5000)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := e.client.Get(ctx, from, opts...)
		if err != nil {
			return nil, 0, err
		}
		if rev == 0 {
			rev = resp.Header.Revision
		}
		for _, kv := range resp.Kvs {
			if _, at, ok := e.space.ParseEvent(string(kv.Key)); ok && !at.Before(cutoff) {
				refs = append(refs, ref{string(kv.Key), at})
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			break
		}
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
	sort.Slice(refs, func(i, j int) bool {
		if !refs[i].at.Equal(refs[j].at) {
			return refs[i].at.Before(refs[j].at)
		}
		return refs[i].key < refs[j].key
	})
	// Newest first, in batches, until limit events are kept.
	var out []*keys.Event
	const batch = 100
	for hi := len(refs); hi > 0 && (limit <= 0 || len(out) < limit); hi -= batch {
		lo := max(0, hi-batch)
		ops := make([]clientv3.Op, 0, hi-lo)
		for _, r := range refs[lo:hi] {
			ops = append(ops, clientv3.OpGet(r.key, clientv3.WithRev(rev)))
		}
		resp, err := e.client.Txn(ctx).Then(ops...).Commit()
		if err != nil {
			return nil, 0, err
		}
		var got []*keys.Event
		for i, r := range resp.Responses {
			for _, kv := range r.GetResponseRange().Kvs {
				if ev, err := keys.Decode[keys.Event](kv.Value); err == nil && keep(ev) {
					e.writerOf(refs[lo+i].key, ev)
					got = append(got, ev)
				}
			}
		}
		out = append(got, out...)
	}
	if limit > 0 && len(out) > limit {
		out = out[len(out)-limit:]
	}
	return out, rev, nil
}
