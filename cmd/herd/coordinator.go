package main

import (
	"fmt"
	"net/http"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"golang.org/x/sync/errgroup"

	"github.com/herdhq/herd/coordinator"
	"github.com/herdhq/herd/coordinator/fence"
	"github.com/herdhq/herd/coordinator/join"
	"github.com/herdhq/herd/coordinator/scheduler"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/logging"
	"github.com/herdhq/herd/lib/statusserver"
)

// failoverFlags are shared by `herd coordinator` and `herd dev`.
type failoverFlags struct {
	fenceCeph     bool
	cephExpire    time.Duration
	fenceExec     string
	fenceTimeout  time.Duration
	unsafeNoFence bool
	grace         time.Duration
	rate          float64
	massFraction  float64
	massMin       int
	massWindow    time.Duration
	recoveryWait  time.Duration
	revisionFile  string
}

func (f *failoverFlags) addFlags(fs *pflag.FlagSet) {
	fs.BoolVar(&f.fenceCeph, "fence-ceph", false, "fence lost nodes from Ceph: blocklist their storage_ip (needs --ceph-conf with a user allowed 'osd blocklist'); combines with --fence-exec")
	fs.DurationVar(&f.cephExpire, "fence-ceph-expire", 24*time.Hour, "lifetime of a blocklist entry, renewed while the fence stands")
	fs.StringVar(&f.fenceExec, "fence-exec", "", "command that fences a lost node (sh -c; HERD_HWID, HERD_BOOT_ID, HERD_MGMT_ADDR, HERD_STORAGE_IP, HERD_LABEL_* in its environment; exit 0 = fenced)")
	fs.DurationVar(&f.fenceTimeout, "fence-timeout", time.Minute, "how long one fence command may run")
	fs.BoolVar(&f.unsafeNoFence, "unsafe-no-fencing", false, "move a lost node's VMs without fencing it: a node that is only cut off may still run them (labs only)")
	fs.DurationVar(&f.grace, "grace", 5*time.Second, "how long a node's lease must be gone before it is fenced")
	fs.Float64Var(&f.rate, "reschedule-rate", 20, "VM moves off fenced nodes per second")
	fs.Float64Var(&f.massFraction, "mass-failure-fraction", 0.5, "hold failover when more than this fraction of nodes ...")
	fs.IntVar(&f.massMin, "mass-failure-min", 2, "... and more than this many nodes are lost within the window")
	fs.DurationVar(&f.massWindow, "mass-failure-window", 10*time.Minute, "window of the mass-failure guard")
	fs.DurationVar(&f.recoveryWait, "recovery-wait", time.Minute, "after an etcd restore, how long to wait for live nodes' inventories before adopting what the others run")
	fs.StringVar(&f.revisionFile, "revision-file", "", "file keeping the newest etcd revision this replica saw, so that a restart still notices etcd restored from a backup, e.g. /var/lib/herd/coordinator-revision.json; empty: none")
}

// apply fills the failover part of a coordinator config. admin is the Ceph connection the ceph
// fencer uses (the coordinator's volume backend when it is RBD).
func (f *failoverFlags) apply(c *coordinator.Config, admin fence.CephAdmin) error {
	var fs fence.All
	if f.fenceExec != "" {
		fs = append(fs, fence.Exec{Command: f.fenceExec, Timeout: f.fenceTimeout})
	}
	if f.fenceCeph {
		if admin == nil {
			return fmt.Errorf("--fence-ceph needs --ceph-conf (and a user allowed 'osd blocklist')")
		}
		fs = append(fs, fence.Ceph{Admin: admin, Expire: f.cephExpire})
	}
	switch {
	case f.unsafeNoFence && len(fs) > 0:
		return fmt.Errorf("--unsafe-no-fencing and --fence-exec contradict each other")
	case f.unsafeNoFence:
		c.Fencer = fence.None{}
	default:
		c.Fencer = fs // none configured: lost nodes' VMs stay placed, with a problem
	}
	if f.massFraction <= 0 || f.massFraction > 1 {
		return fmt.Errorf("--mass-failure-fraction %v: want a fraction in (0, 1]", f.massFraction)
	}
	c.Grace, c.RescheduleRate = f.grace, f.rate
	c.MassFailureFraction, c.MassFailureMin, c.MassFailureWindow = f.massFraction, f.massMin, f.massWindow
	c.RecoveryWait, c.RevisionFile = f.recoveryWait, f.revisionFile
	return nil
}

// schedulerFlags are shared by `herd coordinator` and `herd dev`.
type schedulerFlags struct {
	strategy   string
	overcommit float64
}

func (s *schedulerFlags) options() (scheduler.Options, error) {
	st := scheduler.Strategy(s.strategy)
	if st != scheduler.Spread && st != scheduler.Binpack {
		return scheduler.Options{}, fmt.Errorf("--strategy %q: want spread or binpack", s.strategy)
	}
	if s.overcommit < 1 {
		return scheduler.Options{}, fmt.Errorf("--cpu-overcommit %v: want at least 1", s.overcommit)
	}
	return scheduler.Options{Strategy: st, CPUOvercommit: s.overcommit}, nil
}

func coordinatorCmd() *cobra.Command {
	var (
		eo etcdutil.Options
		lo logging.Options
		p  coordinatorParams
		jf joinServerFlags
	)
	cmd := &cobra.Command{
		Use:   "coordinator",
		Short: "Run a coordinator replica: one leader, elected through etcd, schedules VMs",
		Example: `  # run two or three, anywhere that reaches etcd
  herd coordinator --endpoints http://10.0.0.5:2379 --session-ttl 5s \
    --fence-exec 'ipmitool -I lanplus -H "$HERD_LABEL_BMC" -U admin -f /etc/herd/bmc-pass chassis power off'

  # with TLS and RBAC, serving node joins (docs/security.md)
  herd coordinator --endpoints https://10.0.0.5:2379 --cacert /etc/herd/pki/ca.crt \
    --cert /etc/herd/pki/coord-a.crt --key /etc/herd/pki/coord-a.key \
    --ca-dir /etc/herd/pki --join-listen :9443 --node-ceph-keyring /etc/ceph/ceph.client.herd-agent.keyring`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := lo.New("herd-coordinator", nil)
			if err != nil {
				return err
			}
			space, err := eo.Space()
			if err != nil {
				return err
			}
			client, err := etcdutil.New(eo)
			if err != nil {
				return err
			}
			defer client.Close()
			reg := statusserver.NewRegistry()
			mux := http.NewServeMux()
			if p.pprof {
				statusserver.Profiles(mux)
			}
			srv, err := statusserver.Listen(p.listen, reg, mux)
			if err != nil {
				return err
			}
			vols, err := p.storage.backend(p.pools)
			if err != nil {
				return err
			}
			cfg, err := p.config(coordinatorConns{client: client, user: eo.User(), space: space, volumes: vols,
				revoke: jf.listen != "" && eo.Cert != "", log: log, registry: reg})
			if err != nil {
				return err
			}
			if p.failover.unsafeNoFence {
				log.Warn("UNSAFE: --unsafe-no-fencing: lost nodes' VMs move without fencing; a partitioned node may run them twice")
			}
			c, err := coordinator.New(cfg)
			if err != nil {
				return err
			}
			mux.HandleFunc("GET /v1/leader", func(w http.ResponseWriter, _ *http.Request) {
				fmt.Fprintf(w, "%v\n", c.IsLeader())
			})
			js, jln, err := jf.server(eo, join.Config{Client: client, Space: space, Events: c.Events(), Log: log.Named("join"), Registry: reg})
			if err != nil {
				return err
			}
			log.Info("status endpoint", "url", srv.URL)
			g, gctx := errgroup.WithContext(cmd.Context())
			if js != nil {
				g.Go(func() error { return js.Serve(gctx, jln, jf.cert, jf.key) })
			}
			g.Go(func() error { return srv.Serve(gctx) })
			g.Go(func() error { return c.Run(gctx) })
			return g.Wait()
		},
	}
	eo.AddFlags(cmd.Flags())
	lo.AddFlags(cmd.Flags())
	p.addFlags(cmd.Flags())
	jf.add(cmd.Flags())
	return cmd
}

func (s *schedulerFlags) addFlags(fs *pflag.FlagSet) {
	fs.StringVar(&s.strategy, "strategy", "spread", "placement strategy: spread or binpack")
	fs.Float64Var(&s.overcommit, "cpu-overcommit", 4, "vCPUs allowed per host CPU")
}
