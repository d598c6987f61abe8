package main

import (
	"fmt"
	"net/http"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/herdhq/herd/coordinator"
	"github.com/herdhq/herd/coordinator/scheduler"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/logging"
	"github.com/herdhq/herd/lib/statusserver"
)

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
		eo       etcdutil.Options
		lo       logging.Options
		sf       schedulerFlags
		name     string
		ttl      time.Duration
		pools    []string
		listen   string
		parallel int
	)
	cmd := &cobra.Command{
		Use:   "coordinator",
		Short: "Run a coordinator replica: one leader, elected through etcd, schedules VMs",
		Example: `  # run two or three, anywhere that reaches etcd
  herd coordinator --endpoints http://10.0.0.5:2379 --session-ttl 5s`,
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
			so, err := sf.options()
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
			srv, err := statusserver.Listen(listen, reg, mux)
			if err != nil {
				return err
			}
			c, err := coordinator.New(coordinator.Config{
				Client: client, Space: space, Name: name, SessionTTL: ttl, Pools: pools,
				Scheduler: so, Parallel: parallel, Log: log, Registry: reg,
			})
			if err != nil {
				return err
			}
			mux.HandleFunc("GET /v1/leader", func(w http.ResponseWriter, _ *http.Request) {
				fmt.Fprintf(w, "%v\n", c.IsLeader())
			})
			log.Info("status endpoint", "url", srv.URL)
			g, gctx := errgroup.WithContext(cmd.Context())
			g.Go(func() error { return srv.Serve(gctx) })
			g.Go(func() error { return c.Run(gctx) })
			return g.Wait()
		},
	}
	eo.AddFlags(cmd.Flags())
	lo.AddFlags(cmd.Flags())
	sf.addFlags(cmd)
	f := cmd.Flags()
	f.StringVar(&name, "name", "", "this replica's name in the election and events (default host-pid)")
	f.DurationVar(&ttl, "session-ttl", 5*time.Second, "election session TTL: how long a dead leader blocks a new one")
	f.StringSliceVar(&pools, "pools", []string{"default"}, "disk pools, recorded when this coordinator creates the cluster")
	f.StringVar(&listen, "listen", ":9481", "status endpoint (metrics, /v1/leader)")
	f.IntVar(&parallel, "parallel", 64, "leader transactions in flight at once")
	return cmd
}

func (s *schedulerFlags) addFlags(cmd *cobra.Command) {
	cmd.Flags().StringVar(&s.strategy, "strategy", "spread", "placement strategy: spread or binpack")
	cmd.Flags().Float64Var(&s.overcommit, "cpu-overcommit", 4, "vCPUs allowed per host CPU")
}
