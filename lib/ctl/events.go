package ctl

import (
	"fmt"
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
			from := e.space.EventPrefix()
			if since > 0 {
				from = e.space.Event(time.Now().Add(-since), "")
			}
			end := clientv3.GetPrefixRangeEnd(e.space.EventPrefix())
			ctx, cancel := e.ctx(cmd.Context())
			resp, err := e.client.Get(ctx, from, clientv3.WithRange(end))
			cancel()
			if err != nil {
				return err
			}
			match := func(ev *keys.Event) bool {
				return object == "" || ev.Object == object || strings.HasPrefix(ev.Object, object+"/")
			}
			var evs []*keys.Event
			for _, kv := range resp.Kvs {
				if ev, err := keys.Decode[keys.Event](kv.Value); err == nil && match(ev) {
					evs = append(evs, ev)
				}
			}
			if limit > 0 && len(evs) > limit {
				evs = evs[len(evs)-limit:]
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
			wch := e.client.Watch(clientv3.WithRequireLeader(cmd.Context()), e.space.EventPrefix(), clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
			for wr := range wch {
				if err := wr.Err(); err != nil {
					return fmt.Errorf("follow events: %w", err)
				}
				var batch []*keys.Event
				for _, we := range wr.Events {
					if we.Type != clientv3.EventTypePut {
						continue
					}
					if ev, err := keys.Decode[keys.Event](we.Kv.Value); err == nil && match(ev) {
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
