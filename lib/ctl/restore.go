package ctl

import (
	"fmt"

	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

// What an operator decides after an etcd restore (docs/operations.md, "Restoring etcd").

func vmReleaseCmd(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "release NAME",
		Short: "Start a VM held after an etcd restore (it ran nowhere, so it may have been deleted after the backup)",
		Long: `release writes the VM's spec again, unchanged: the leader holds a VM after a restore only while
its spec is the one the restore brought back, so any write by an operator says "start it".
Delete the VM instead if it was deleted after the backup was taken.`,
		Example: `  herdctl vm release web1`,
		Args:    exactArgs("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			resp, err := e.client.Txn(ctx).Then(clientv3.OpGet(e.space.VMSpec(name)), clientv3.OpGet(e.space.Problem(name))).Commit()
			if err != nil {
				return err
			}
			specs, probs := resp.Responses[0].GetResponseRange().Kvs, resp.Responses[1].GetResponseRange().Kvs
			if len(specs) == 0 {
				return fmt.Errorf("vm %s: %w", name, ErrNotFound)
			}
			held := false
			if len(probs) > 0 {
				if p, err := keys.Decode[keys.Problem](probs[0].Value); err == nil && p.Kind == keys.ProblemRestoreHold && p.SpecRev == specs[0].ModRevision {
					held = true
				}
			}
			if !held {
				fmt.Fprintf(e.out, "vm/%s is not held\n", name)
				return nil
			}
			key := e.space.VMSpec(name)
			tx, err := e.client.Txn(ctx).If(etcdutil.ModRev(key, specs[0].ModRevision)).Then(clientv3.OpPut(key, string(specs[0].Value))).Commit()
			if err != nil {
				return err
			}
			if !tx.Succeeded {
				return fmt.Errorf("vm %s changed meanwhile: look again (herdctl vm get %s)", name, name)
			}
			_ = e.record(ctx, "vm/"+name, "released", "held after a restore; started by an operator")
			fmt.Fprintf(e.out, "vm/%s released: the leader places and starts it\n", name)
			return nil
		},
	}
}

func vmForgetCmd(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "forget NAME",
		Short: "Remove an orphan kept after an etcd restore (its domain is destroyed on its node)",
		Long: `forget asks the leader (a request under /herd/requests/forget/NAME) to drop the orphan placement
of a VM that ran when etcd was restored but whose spec the backup did not have. Its node then has
the evidence it waited for and destroys the domain; the disk stays (herdctl volume purge).
To keep the VM instead, leave it: it runs on as an orphan, listed by 'herdctl vm orphans'.`,
		Example: `  herdctl vm orphans
  herdctl vm forget v7`,
		Args: exactArgs("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			resp, err := e.client.Get(ctx, e.space.Placement(name))
			if err != nil {
				return err
			}
			if len(resp.Kvs) == 0 {
				return fmt.Errorf("vm %s has no placement: %w", name, ErrNotFound)
			}
			pl, err := keys.Decode[keys.Placement](resp.Kvs[0].Value)
			if err != nil || !pl.Orphan {
				return fmt.Errorf("vm %s is not an orphan kept after a restore; delete it with 'herdctl vm delete %s'", name, name)
			}
			if _, err := e.request(ctx, e.space.ForgetRequest(name), resp.Kvs[0].CreateRevision); err != nil {
				return err
			}
			_ = e.record(ctx, "vm/"+name, "forget-requested", "orphan on "+pl.Node)
			fmt.Fprintf(e.out, "vm/%s: forgetting the orphan on %s (its node destroys the domain)\n", name, pl.Node)
			return nil
		},
	}
}
