package ctl

import (
	"fmt"
	"time"

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

func vmAdoptCmd(e *env) *cobra.Command {
	var (
		sf      specFlags
		wait    bool
		waitFor time.Duration
	)
	cmd := &cobra.Command{
		Use:   "adopt NAME",
		Short: "Take over an orphan kept after an etcd restore: give it a spec again, keeping its domain and disk",
		Long: `adopt writes a spec for an orphan (a VM that ran when etcd was restored but whose spec the
backup did not have) that claims the orphan's uid (adopt_uid). The leader then places the VM where it
runs, and its node keeps the running guest, now managed again: its disk (named by the uid) stays
its own, and it migrates, restarts and is deleted like any VM.

Give the VM's shape as it was created (vcpus, memory, disk, networks): the running guest keeps what
it has until its next restart, which applies the spec. With etcdctl: put the spec JSON with
"adopt_uid" set to the UID 'herdctl vm orphans' shows.`,
		Example: `  herdctl vm orphans
  herdctl vm adopt v7 --vcpus 2 --memory 2GiB --disk 20GiB --wait`,
		Args: exactArgs("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			spec, err := sf.spec()
			if err != nil {
				return err
			}
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			specKey, plKey := e.space.VMSpec(name), e.space.Placement(name)
			resp, err := e.client.Txn(ctx).Then(clientv3.OpGet(specKey), clientv3.OpGet(plKey)).Commit()
			if err != nil {
				return err
			}
			specs, pls := resp.Responses[0].GetResponseRange().Kvs, resp.Responses[1].GetResponseRange().Kvs
			if len(pls) == 0 {
				return fmt.Errorf("vm %s has no placement, so no orphan to adopt (herdctl vm orphans): %w", name, ErrNotFound)
			}
			pl, err := keys.Decode[keys.Placement](pls[0].Value)
			if err != nil {
				return fmt.Errorf("vm %s: unreadable placement: %w", name, err)
			}
			if len(specs) > 0 {
				cur, err := keys.Decode[keys.VMSpec](specs[0].Value)
				if err == nil && cur.AdoptUID == pl.UID {
					fmt.Fprintf(e.out, "vm/%s already adopts uid %d\n", name, pl.UID)
					return nil
				}
				if !pl.Orphan {
					return fmt.Errorf("vm %s is not an orphan kept after a restore; change it with 'herdctl vm apply'", name)
				}
				return fmt.Errorf("vm %s has a spec of another VM (uid %d): delete it first ('herdctl vm delete %s'), then adopt", name, specs[0].CreateRevision, name)
			}
			if !pl.Orphan {
				return fmt.Errorf("vm %s is not an orphan kept after a restore", name)
			}
			spec.AdoptUID = pl.UID
			pools, err := e.pools(ctx)
			if err != nil {
				return err
			}
			if err := spec.Validate(pools); err != nil {
				return usagef("invalid VM: %v", err)
			}
			tx, err := e.client.Txn(ctx).If(etcdutil.CreateRev(specKey, 0), etcdutil.ModRev(plKey, pls[0].ModRevision)).
				Then(clientv3.OpPut(specKey, keys.MustEncode(&spec))).Commit()
			if err != nil {
				return fmt.Errorf("adopt vm %s: %w", name, err)
			}
			if !tx.Succeeded {
				return fmt.Errorf("vm %s changed meanwhile: look again (herdctl vm orphans)", name)
			}
			_ = e.record(ctx, "vm/"+name, "adopt-requested", fmt.Sprintf("orphan uid %d on %s", pl.UID, pl.Node))
			fmt.Fprintf(e.out, "vm/%s: adopting the orphan uid %d on %s (the leader places it where it runs)\n", name, pl.UID, pl.Node)
			if wait {
				return e.waitVM(cmd.Context(), name, pl.UID, waitFor, spec.WantsRunning())
			}
			return nil
		},
	}
	f := cmd.Flags()
	sf.add(f)
	f.BoolVar(&wait, "wait", false, "wait until the adopted VM runs under its spec")
	f.DurationVar(&waitFor, "wait-timeout", 2*time.Minute, "how long --wait waits")
	return cmd
}
