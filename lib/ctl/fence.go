package ctl

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/keys"
)

func fenceCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{Use: "fence", Short: "Inspect and clear fence records of lost nodes"}
	cmd.AddCommand(fenceListCmd(e), fenceClearCmd(e))
	return cmd
}

func fenceListCmd(e *env) *cobra.Command {
	var o outputFlag
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List fence records: which boot of which node was declared dead, and how fencing went",
		Example: `  herdctl fence list`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel, err := e.startRead(cmd, &o)
			if err != nil {
				return err
			}
			defer cancel()
			resp, err := e.client.Get(ctx, e.space.FenceRoot(), clientv3.WithPrefix())
			if err != nil {
				return err
			}
			var list []*keys.Fence
			t := newTable("NODE", "BOOT-ID", "PHASE", "METHOD", "ATTEMPTS", "STARTED", "ERROR")
			for _, kv := range resp.Kvs {
				f, err := keys.Decode[keys.Fence](kv.Value)
				if err != nil {
					continue
				}
				list = append(list, f)
				t.row(f.HWID, f.BootID, f.Phase, f.Method, fmt.Sprint(f.Attempts), age(f.Started), truncate(orDash(f.Error), 80))
			}
			if len(list) == 0 && o.format == "table" {
				fmt.Fprintln(e.errOut, "no fence records")
				return nil
			}
			return o.print(e.out, list, t)
		},
	}
	o.add(cmd)
	return cmd
}

func fenceClearCmd(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "clear NODE",
		Short: "Clear a node's fence records: a fenced node that came back is schedulable again",
		Long: `clear asks the leader (a request under /herd/requests/fence-clear/NODE/) to undo the node's fences
(Ceph blocklist entries) and delete its records under /herd/fence/NODE/. Do it only once you know the
node's old boot no longer runs any VM that now runs elsewhere (e.g. you checked it, or you
power-cycled it). A node that reboots clears its fence record by itself.`,
		Example: `  herdctl fence clear 52:54:00:00:00:02`,
		Args:    exactArgs("NODE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, ctx, cancel, err := e.forNode(cmd, args[0])
			if err != nil {
				return err
			}
			defer cancel()
			resp, err := e.client.Get(ctx, e.space.FencePrefix(id), clientv3.WithPrefix())
			if err != nil {
				return err
			}
			if len(resp.Kvs) == 0 {
				return fmt.Errorf("node %s has no fence record: %w", id, ErrNotFound)
			}
			// The leader undoes the fence (Ceph blocklist entries) and then deletes the record;
			// until then the boot stays fenced. Operators only ask: the record is the leader's.
			asked := 0
			for _, kv := range resp.Kvs {
				f, err := keys.Decode[keys.Fence](kv.Value)
				if err != nil {
					return fmt.Errorf("fence record %s is unreadable (%v); ask root to delete it with etcdctl", kv.Key, err)
				}
				if f.Phase == keys.FenceClearing {
					continue
				}
				created, err := e.request(ctx, e.space.FenceClearRequest(id, f.BootID), kv.CreateRevision)
				if err != nil {
					return err
				}
				if created {
					asked++
				}
			}
			if asked > 0 {
				_ = e.record(ctx, "node/"+id, "fence-clear-requested", "by hand")
			}
			fmt.Fprintf(e.out, "node/%s: fence being cleared (the leader removes blocklist entries, then the record)\n", id)
			return nil
		},
	}
}

func clusterCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{Use: "cluster", Short: "Cluster-wide state: identity, pools, the failover guard"}
	cmd.AddCommand(clusterShowCmd(e), clusterConfirmLossCmd(e))
	return cmd
}

func clusterShowCmd(e *env) *cobra.Command {
	return &cobra.Command{
		Use:     "show",
		Short:   "Show the cluster record and whether failover is held",
		Example: `  herdctl cluster show`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			resp, err := e.client.Txn(ctx).Then(clientv3.OpGet(e.space.Cluster()), clientv3.OpGet(e.space.LossGuard())).Commit()
			if err != nil {
				return err
			}
			if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
				c, err := keys.Decode[keys.Cluster](kvs[0].Value)
				if err != nil {
					return err
				}
				fmt.Fprintf(e.out, "Cluster:   %s (created %s ago)\nPools:     %s\n", c.ID, age(c.Created), strings.Join(c.Pools, ", "))
				if r := c.Restore; r != nil {
					switch r.Phase {
					case keys.RestoreCollecting:
						fmt.Fprintf(e.out, "Restore:   recovery %d COLLECTING for %s: every node is frozen until the leader has their inventories (at most until %s)\n",
							r.Generation, age(r.Since), r.Until.Local().Format(time.TimeOnly))
					default:
						fmt.Fprintf(e.out, "Restore:   recovery %d done %s ago, took %s (%s)\n", r.Generation, age(r.Done), r.Done.Sub(r.Since).Round(time.Millisecond), r.Why)
						if len(r.Missing) > 0 {
							fmt.Fprintf(e.out, "           no inventory from %s: their VMs were left to the node-loss rules\n", strings.Join(r.Missing, ", "))
						}
					}
				}
			} else {
				fmt.Fprintln(e.out, "Cluster:   no record yet (no coordinator has started)")
			}
			if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) > 0 {
				g, err := keys.Decode[keys.LossGuard](kvs[0].Value)
				if err != nil {
					return err
				}
				state := "HELD: confirm with 'herdctl cluster confirm-loss'"
				if g.Confirmed {
					state = "confirmed by " + g.By + ", in progress"
				}
				fmt.Fprintf(e.out, "Failover:  %s; %d nodes lost at once since %s ago: %s\n", state, len(g.Nodes), age(g.Since), strings.Join(g.Nodes, ", "))
			} else {
				fmt.Fprintln(e.out, "Failover:  automatic")
			}
			// etcd's own alarms (Status needs no admin permission, unlike the alarm list).
			for _, ep := range e.opts.Endpoints {
				st, err := e.client.Status(ctx, ep)
				if err != nil {
					continue
				}
				for _, m := range st.Errors {
					fmt.Fprintf(e.out, "etcd:      %s reports %s\n", ep, m)
					if strings.Contains(m, "NOSPACE") {
						fmt.Fprintf(e.out, "           %s\n", noSpaceHint)
					}
				}
			}
			return nil
		},
	}
}

func clusterConfirmLossCmd(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "confirm-loss",
		Short: "Let failover proceed after the mass-failure guard held it",
		Long: `When more nodes are lost at once than the guard allows, the leader fences and moves nothing
until an operator confirms that the nodes are really gone (not cut off from the coordinators by a
network fault). Confirming lets fencing and rescheduling of the listed nodes proceed. Nodes lost while
failover is held join the list; a confirmation covers the nodes listed when it was written (if the
list grew meanwhile the leader ignores it, with an event: look again and confirm again).`,
		Example: `  herdctl cluster show
  herdctl cluster confirm-loss`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			key := e.space.LossGuard()
			resp, err := e.client.Get(ctx, key)
			if err != nil {
				return err
			}
			if len(resp.Kvs) == 0 {
				return fmt.Errorf("failover is not held: nothing to confirm: %w", ErrNotFound)
			}
			g, err := keys.Decode[keys.LossGuard](resp.Kvs[0].Value)
			if err != nil {
				return err
			}
			if g.Confirmed {
				fmt.Fprintln(e.out, "already confirmed")
				return nil
			}
			created, err := e.requestWith(ctx, e.space.ConfirmLossRequest(), keys.Request{Of: resp.Kvs[0].CreateRevision, Listed: len(g.Nodes)})
			if err != nil {
				return err
			}
			if !created {
				fmt.Fprintln(e.out, "already confirmed; the leader acts on it")
				return nil
			}
			_ = e.record(ctx, "cluster", "loss-confirmed", strings.Join(g.Nodes, ", "))
			fmt.Fprintf(e.out, "confirmed: the leader lets fencing and rescheduling of %s proceed\n", strings.Join(g.Nodes, ", "))
			return nil
		},
	}
}

func vmOrphansCmd(e *env) *cobra.Command {
	var o outputFlag
	cmd := &cobra.Command{
		Use:   "orphans",
		Short: "List domains that run on a node without an assignment (kept, never destroyed by herd)",
		Example: `  herdctl vm orphans
  herdctl vm orphans -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			v, err := e.readView(cmd, &o)
			if err != nil {
				return err
			}
			type orphan struct {
				Node   string         `json:"node"`
				VM     string         `json:"vm"`
				Status *keys.VMStatus `json:"status"`
			}
			var list []orphan
			for hwid, sts := range v.statuses {
				for name, st := range sts {
					if st.State == keys.StateOrphan {
						list = append(list, orphan{Node: hwid, VM: name, Status: st})
					}
				}
			}
			sort.Slice(list, func(i, j int) bool {
				if list[i].Node != list[j].Node {
					return list[i].Node < list[j].Node
				}
				return list[i].VM < list[j].VM
			})
			t := newTable("NODE", "VM", "UID", "EPOCH", "SINCE", "WHY")
			for _, x := range list {
				t.row(x.Node, x.VM, fmt.Sprint(x.Status.UID), fmt.Sprint(x.Status.Epoch), age(x.Status.Since), x.Status.Message)
			}
			if len(list) == 0 && o.format == "table" {
				fmt.Fprintln(e.errOut, "no orphans")
				return nil
			}
			return o.print(e.out, list, t)
		},
	}
	o.add(cmd)
	return cmd
}
