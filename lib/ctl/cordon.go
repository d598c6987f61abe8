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

// record writes an audit event of this operator's action. Best effort: the action itself is done.
func (e *env) record(ctx context.Context, object, action, msg string) error {
	return events.RecordNow(ctx, e.client, e.space, keys.EventsByOperator, actor(), e.opts.User(), object, action, msg)
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
			changed, err := e.updateNodeSpec(ctx, id, func(ns *keys.NodeSpec) bool {
				if ns.Cordoned == cordon && !ns.Drain && (!cordon || reason == "" || ns.Reason == reason) {
					return false
				}
				ns.Cordoned = cordon
				if !cordon {
					ns.Drain = false // uncordon also cancels or ends a drain
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
			_ = e.record(ctx, "node/"+id, verb, reason)
			fmt.Fprintf(e.out, "node/%s %s\n", id, verb)
			return nil
		},
	}
	if cordon {
		cmd.Flags().StringVar(&reason, "reason", "", "why, shown in node get and events")
	}
	return cmd
}

// updateNodeSpec applies mutate to the node's spec (what operators want of it) by
// compare-and-swap, retrying on conflicts. The node must be enrolled. mutate returns false when
// nothing needs writing. The leader acts on the spec and records what it did in the node's state.
func (e *env) updateNodeSpec(ctx context.Context, hwid string, mutate func(*keys.NodeSpec) bool) (bool, error) {
	hw, err := e.client.Get(ctx, e.space.Hardware(hwid), clientv3.WithCountOnly())
	if err != nil {
		return false, err
	}
	if hw.Count == 0 {
		return false, fmt.Errorf("node %s is not enrolled (see 'herdctl hw list'): %w", hwid, ErrNotFound)
	}
	key := e.space.NodeSpec(hwid)
	res, err := e.casPut(ctx, key, func(old []byte) (string, bool, error) {
		ns := &keys.NodeSpec{}
		if old != nil {
			var err error
			if ns, err = keys.Decode[keys.NodeSpec](old); err != nil {
				return "", false, fmt.Errorf("node spec %s is unreadable (%v); fix or delete it with etcdctl", key, err)
			}
		}
		if !mutate(ns) {
			return "", false, nil
		}
		if err := ns.Validate(); err != nil {
			return "", false, usagef("%v", err)
		}
		return keys.MustEncode(ns), true, nil
	})
	return res == casCreated || res == casUpdated, err
}

// request writes an operator request about the record created at revision of (see keys.Request).
// It reports false when the same request is there already.
func (e *env) request(ctx context.Context, key string, of int64) (bool, error) {
	return e.requestWith(ctx, key, keys.Request{Of: of})
}

// requestWith is request with the request's other members set (By and At are filled in).
func (e *env) requestWith(ctx context.Context, key string, req keys.Request) (bool, error) {
	of := req.Of
	resp, err := e.client.Get(ctx, key)
	if err != nil {
		return false, err
	}
	var rev int64
	if len(resp.Kvs) > 0 {
		rev = resp.Kvs[0].ModRevision
		if r, err := keys.Decode[keys.Request](resp.Kvs[0].Value); err == nil && r.Of == of {
			return false, nil
		}
	}
	req.By, req.At = actor(), time.Now().UTC()
	tx, err := e.client.Txn(ctx).If(etcdutil.ModRev(key, rev)).Then(clientv3.OpPut(key, keys.MustEncode(&req))).Commit()
	if err != nil {
		return false, err
	}
	if !tx.Succeeded {
		return false, fmt.Errorf("request %s changed meanwhile; try again", key)
	}
	return true, nil
}
