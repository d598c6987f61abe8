package ctl

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

func vmMigrateCmd(e *env) *cobra.Command {
	var (
		to      string
		wait    bool
		waitFor time.Duration
	)
	cmd := &cobra.Command{
		Use:   "migrate NAME",
		Short: "Move a VM to another node (live, unless its policy says restart)",
		Example: `  herdctl vm migrate web1
  herdctl vm migrate web1 --to 52:54:00:00:00:02 --wait`,
		Args: exactArgs("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if to != "" {
				id, err := keys.NormalizeHWID(to)
				if err != nil {
					return usagef("--to: %v", err)
				}
				to = id
			}
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			v, err := e.readCluster(ctx)
			if err != nil {
				return err
			}
			vm := v.vms[name]
			if vm == nil || vm.UID == 0 {
				return fmt.Errorf("vm %s: %w", name, ErrNotFound)
			}
			if vm.Placement == nil || vm.Placement.UID != vm.UID {
				return fmt.Errorf("vm %s is not placed yet; nothing to migrate", name)
			}
			if vm.Placement.Node == to {
				return fmt.Errorf("vm %s already runs on %s", name, to)
			}
			if to != "" && v.nodes[to] == nil {
				return fmt.Errorf("node %s is not registered: %w", to, ErrNotFound)
			}
			from, epoch := vm.Placement.Node, vm.Placement.Epoch
			req := keys.MigrateRequest{To: to, Requested: time.Now().UTC()}
			key := e.space.VMMigrate(name)
			resp, err := e.client.Txn(ctx).If(etcdutil.CreateRev(e.space.VMSpec(name), vm.UID)).Then(clientv3.OpPut(key, keys.MustEncode(&req))).Commit()
			if err != nil {
				return err
			}
			if !resp.Succeeded {
				return fmt.Errorf("vm %s changed meanwhile; try again", name)
			}
			_ = e.record(ctx, "vm/"+name, "migrate-requested", "from "+from+" to "+orDash(to))
			fmt.Fprintf(e.out, "vm/%s migration requested (from %s)\n", name, from)
			if !wait {
				return nil
			}
			return e.waitMoved(cmd.Context(), name, vm.UID, epoch, waitFor)
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "target node (default: the scheduler's choice)")
	cmd.Flags().BoolVar(&wait, "wait", false, "wait until the VM runs on its new node")
	cmd.Flags().DurationVar(&waitFor, "wait-timeout", 10*time.Minute, "how long --wait waits")
	return cmd
}

// waitMoved waits until the VM runs under a newer epoch than epoch, or its migration failed.
func (e *env) waitMoved(parent context.Context, name string, uid, epoch int64, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(parent, timeout)
	defer cancel()
	for {
		v, err := e.readCluster(ctx)
		if err == nil {
			vm := v.vms[name]
			switch {
			case vm == nil || vm.UID != uid:
				return fmt.Errorf("vm %s was deleted while waiting", name)
			case vm.Placement != nil && vm.Placement.Epoch > epoch && vm.State == keys.StateRunning:
				fmt.Fprintf(e.out, "vm/%s running on %s (epoch %d)\n", name, vm.Placement.Node, vm.Placement.Epoch)
				return nil
			case vm.Problem != nil && vm.Problem.UID == uid && strings.HasPrefix(vm.Problem.Message, "migration to") && vm.Placement != nil && vm.Placement.Migration == nil:
				return fmt.Errorf("vm %s: %s", name, vm.Problem.Message)
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("vm %s did not move within %s (see 'herdctl vm get %s')", name, timeout, name)
		case <-time.After(300 * time.Millisecond):
		}
	}
}

func vmRestartCmd(e *env) *cobra.Command {
	return &cobra.Command{
		Use:     "restart NAME",
		Short:   "Restart a VM: the guest powers off (ACPI) and boots again",
		Example: `  herdctl vm restart web1`,
		Args:    exactArgs("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			_, spec, err := e.editSpec(ctx, name, func(s *keys.VMSpec) bool { s.Restarts++; return true })
			if err != nil {
				return err
			}
			_ = e.record(ctx, "vm/"+name, "restart-requested", fmt.Sprintf("generation %d", spec.Restarts))
			fmt.Fprintf(e.out, "vm/%s restarting (generation %d)\n", name, spec.Restarts)
			return nil
		},
	}
}

// vmPowerCmd is `vm stop` and `vm start`: the spec's power, written by compare-and-swap.
func vmPowerCmd(e *env, verb, power, short string) *cobra.Command {
	return &cobra.Command{
		Use:     verb + " NAME",
		Short:   short,
		Example: fmt.Sprintf("  herdctl vm %s web1", verb),
		Args:    exactArgs("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			want := power == keys.PowerRunning
			changed, _, err := e.editSpec(ctx, name, func(s *keys.VMSpec) bool {
				if s.WantsRunning() == want {
					return false
				}
				s.Power = power
				return true
			})
			if err != nil {
				return err
			}
			if !changed {
				fmt.Fprintf(e.out, "vm/%s is already %s\n", name, power)
				return nil
			}
			_ = e.record(ctx, "vm/"+name, verb+"-requested", "power "+power)
			fmt.Fprintf(e.out, "vm/%s: power %s (its node %s it)\n", name, power, map[bool]string{true: "starts", false: "shuts down"}[want])
			return nil
		},
	}
}

// editSpec changes the VM's stored spec by compare-and-swap, again if someone wrote it meanwhile;
// change says whether it changed anything (nothing is written when not). Members this herdctl
// does not know are kept.
func (e *env) editSpec(ctx context.Context, name string, change func(*keys.VMSpec) bool) (bool, *keys.VMSpec, error) {
	key := e.space.VMSpec(name)
	for attempt := 0; attempt < 5; attempt++ {
		resp, err := e.client.Get(ctx, key)
		if err != nil {
			return false, nil, err
		}
		if len(resp.Kvs) == 0 {
			return false, nil, fmt.Errorf("vm %s: %w", name, ErrNotFound)
		}
		spec, err := keys.Decode[keys.VMSpec](resp.Kvs[0].Value)
		if err != nil {
			return false, nil, fmt.Errorf("vm %s has an unreadable spec: %v", name, err)
		}
		if !change(spec) {
			return false, spec, nil
		}
		tx, err := e.client.Txn(ctx).If(etcdutil.ModRev(key, resp.Kvs[0].ModRevision)).Then(clientv3.OpPut(key, keys.MustEncode(spec))).Commit()
		if err != nil {
			return false, nil, err
		}
		if tx.Succeeded {
			return true, spec, nil
		}
	}
	return false, nil, fmt.Errorf("vm %s kept changing; try again", name)
}

func nodeDrainCmd(e *env) *cobra.Command {
	var (
		wait    bool
		waitFor time.Duration
	)
	cmd := &cobra.Command{
		Use:   "drain NODE",
		Short: "Cordon a node and move every VM away (live migration; restart for VMs whose policy says so)",
		Long: `drain cordons the node and marks it draining: the leader migrates its VMs away, a few at a time,
and marks the node drained when none is left. Cancel with 'herdctl node uncordon'.`,
		Example: `  herdctl node drain 52:54:00:00:00:01 --wait
  herdctl node uncordon 52:54:00:00:00:01     # cancel, or undo after maintenance`,
		Args: exactArgs("NODE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, ctx, cancel, err := e.forNode(cmd, args[0])
			if err != nil {
				return err
			}
			changed, err := e.updateNodeSpec(ctx, id, func(ns *keys.NodeSpec) bool {
				if ns.Drain {
					return false
				}
				ns.Drain = true
				if ns.Reason == "" {
					ns.Reason = "drain"
				}
				ns.Since = time.Now().UTC()
				return true
			})
			if err == nil && changed {
				_ = e.record(ctx, "node/"+id, "drain", "")
			}
			cancel()
			if err != nil {
				return err
			}
			fmt.Fprintf(e.out, "node/%s draining\n", id)
			if !wait {
				return nil
			}
			return e.waitDrained(cmd.Context(), id, waitFor)
		},
	}
	cmd.Flags().BoolVar(&wait, "wait", false, "wait until the node is drained, with a progress bar")
	cmd.Flags().DurationVar(&waitFor, "wait-timeout", 30*time.Minute, "how long --wait waits")
	return cmd
}

// waitDrained shows VMs done/total, the migrations under way and the elapsed time until the node
// is drained.
func (e *env) waitDrained(parent context.Context, id string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(parent, timeout)
	defer cancel()
	total := -1
	var bar *progressbar.ProgressBar
	for {
		v, err := e.readCluster(ctx)
		if err == nil {
			var left, moving []string
			for _, vm := range v.vms {
				p := vm.Placement
				if p == nil || p.UID != vm.UID || p.Node != id {
					continue
				}
				left = append(left, vm.Name)
				if p.Migration != nil {
					moving = append(moving, vm.Name+"->"+p.Migration.To)
				}
			}
			sort.Strings(moving)
			if total < 0 {
				total = len(left)
				bar = e.newBar(max(total, 1), "draining "+id)
			}
			if len(left) > total {
				total = len(left)
				bar.ChangeMax(total)
			}
			desc := "draining " + id
			if len(moving) > 0 {
				desc += ": " + strings.Join(moving, ", ")
			}
			bar.Describe(desc)
			_ = bar.Set(total - len(left))
			if a := v.admin(id); !a.Draining {
				e.endBar()
				return fmt.Errorf("node %s is no longer draining (uncordoned?)", id)
			} else if a.Drained {
				_ = bar.Finish()
				e.endBar()
				fmt.Fprintf(e.errOut, "node/%s drained\n", id)
				return nil
			}
		}
		select {
		case <-ctx.Done():
			e.endBar()
			return fmt.Errorf("node %s not drained after %s (see 'herdctl node get %s' and 'herdctl events --object node/%s')", id, timeout, id, id)
		case <-time.After(500 * time.Millisecond):
		}
	}
}
