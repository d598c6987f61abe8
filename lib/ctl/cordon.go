package ctl

import (
	"context"
	"fmt"
	"os"
	"os/user"
	"time"

	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/events"
	"github.com/herdhq/herd/lib/keys"
)

// actor names the operator in events: herdctl/<user>@<host>.
func actor() string {
	name := "unknown"
	if u, err := user.Current(); err == nil {
		name = u.Username
	}
	host, _ := os.Hostname()
	return "herdctl/" + name + "@" + host
}

func nodeCordonCmd(e *env, cordon bool) *cobra.Command {
	var reason string
	use, short := "cordon HWID", "Stop placing new VMs on a node (its VMs keep running)"
	example := `  herdctl node cordon 52:54:00:00:00:01 --reason "RAM errors"`
	if !cordon {
		use, short = "uncordon HWID", "Allow new VMs on a node again"
		example = `  herdctl node uncordon 52:54:00:00:00:01`
	}
	cmd := &cobra.Command{
		Use:     use,
		Short:   short,
		Example: example,
		Args:    exactArgs("HWID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, ctx, cancel, err := e.forNode(cmd, args[0])
			if err != nil {
				return err
			}
			defer cancel()
			changed, err := e.updateNodeState(ctx, id, func(ns *keys.NodeState) bool {
				if ns.Cordoned == cordon && !ns.Draining && !ns.Drained && (!cordon || reason == "" || ns.Reason == reason) {
					return false
				}
				ns.Cordoned = cordon
				if !cordon {
					ns.Draining, ns.Drained = false, false // uncordon also cancels or ends a drain
				}
				ns.Reason = reason
				ns.Since = time.Now().UTC()
				if !cordon {
					ns.Reason, ns.Since = "", time.Time{}
				}
				return true
			})
			if err != nil {
				return err
			}
			verb := map[bool]string{true: "cordoned", false: "uncordoned"}[cordon]
			if !changed {
				fmt.Fprintf(e.out, "node/%s already %s\n", id, verb)
				return nil
			}
			_ = events.RecordNow(ctx, e.client, e.space, actor(), e.opts.User(), "node/"+id, verb, reason)
			fmt.Fprintf(e.out, "node/%s %s\n", id, verb)
			return nil
		},
	}
	if cordon {
		cmd.Flags().StringVar(&reason, "reason", "", "why, shown in node get and events")
	}
	return cmd
}

// updateNodeState applies mutate to the node's state by compare-and-swap, retrying on conflicts.
// The node must be enrolled. mutate returns false when nothing needs writing.
func (e *env) updateNodeState(ctx context.Context, hwid string, mutate func(*keys.NodeState) bool) (bool, error) {
	key := e.space.NodeState(hwid)
	for attempt := 0; attempt < 10; attempt++ {
		resp, err := e.client.Txn(ctx).Then(clientv3.OpGet(e.space.Hardware(hwid)), clientv3.OpGet(key)).Commit()
		if err != nil {
			return false, err
		}
		if len(resp.Responses[0].GetResponseRange().Kvs) == 0 {
			return false, fmt.Errorf("node %s is not enrolled (see 'herdctl hw list'): %w", hwid, ErrNotFound)
		}
		ns := &keys.NodeState{}
		var modRev int64
		if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) > 0 {
			modRev = kvs[0].ModRevision
			if ns, err = keys.Decode[keys.NodeState](kvs[0].Value); err != nil {
				return false, fmt.Errorf("node state %s is unreadable (%v); fix or delete it with etcdctl", key, err)
			}
		}
		if !mutate(ns) {
			return false, nil
		}
		tx, err := e.client.Txn(ctx).If(etcdutil.ModRev(key, modRev)).Then(clientv3.OpPut(key, keys.MustEncode(ns))).Commit()
		if err != nil {
			return false, err
		}
		if tx.Succeeded {
			return true, nil
		}
	}
	return false, fmt.Errorf("node state %s kept changing under us; try again", hwid)
}
