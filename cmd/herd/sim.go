//go:build !agentonly

package main

import (
	"context"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"

	"github.com/herdhq/herd/agent"
	"github.com/herdhq/herd/agent/hypervisor"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/logging"
	"github.com/herdhq/herd/lib/statusserver"
	"github.com/herdhq/herd/lib/version"
	"github.com/herdhq/herd/lib/volume"
)

func init() { extraCmds = append(extraCmds, simCmd()) }

// simHWID is the hardware id of simulated node i: a locally administered MAC, 02:<set>:<i>.
func simHWID(set, i int) string {
	return fmt.Sprintf("02:%02x:00:%02x:%02x:%02x", set&0xff, (i>>16)&0xff, (i>>8)&0xff, i&0xff)
}

func simCmd() *cobra.Command {
	var (
		eo      etcdutil.Options
		lo      logging.Options
		p       agentParams
		nodes   int
		set     int
		clients int
		enrol   bool
	)
	cmd := &cobra.Command{
		Use:   "sim",
		Short: "Run many real agents in one process on in-memory hypervisors (the scale rig)",
		Long: `sim runs --nodes agents, the same code as herd agent: each registers its own node under its own
lease, watches its own assignments and writes its own statuses. Their hypervisors are in-memory
books (no libvirt, no guest), so thousands fit in one process; agents of one process migrate to each
other. Node i of set S has the hardware id 02:SS:00:ii:ii:ii. For the scale rig (just scale), never
for production.`,
		Example: `  herd etcd --data-dir /tmp/e &
  herd coordinator --endpoints http://127.0.0.1:2379 --fence-exec true &
  herd sim --endpoints http://127.0.0.1:2379 --nodes 1000 --set 1 --cpus 64 --memory 256GiB`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if nodes < 1 || clients < 1 {
				return fmt.Errorf("--nodes and --clients must be at least 1")
			}
			log, err := lo.New("herd-sim", nil)
			if err != nil {
				return err
			}
			space, err := eo.Space()
			if err != nil {
				return err
			}
			memMiB, err := parseOptionalMiB("--memory", p.memory)
			if err != nil {
				return err
			}
			if p.cpus == 0 || memMiB == 0 {
				return fmt.Errorf("sim needs --cpus and --memory (in-memory hypervisors report what they are told)")
			}
			// Agents share clients, as they would share nothing in production; one gRPC connection
			// per few hundred agents keeps this process's sockets in bounds.
			cs := make([]*clientv3.Client, clients)
			for i := range cs {
				if cs[i], err = etcdutil.New(eo); err != nil {
					return err
				}
				defer cs[i].Close()
			}
			if enrol {
				if err := simEnrol(cmd.Context(), cs[0], space, set, nodes, p.cpus, memMiB); err != nil {
					return err
				}
			}
			reg := statusserver.NewRegistry()
			srv, err := statusserver.Listen(p.listen, reg, nil)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			g, gctx := errgroup.WithContext(ctx)
			g.Go(func() error { return srv.Serve(gctx) })
			var up atomic.Int64
			for i := range nodes {
				hwid := simHWID(set, i)
				hv, err := hypervisor.NewMemory(hwid, p.cpus, memMiB)
				if err != nil {
					return err
				}
				defer hv.Close()
				q := p
				q.migURI = hv.URI()
				cfg, err := q.config(agentConns{client: cs[i%clients], user: eo.User(), space: space, hwid: hwid,
					bootID: uuid.NewString(), hypervisor: hv, volumes: volume.Dir{Root: os.TempDir()}, hostname: hwid,
					version: version.Version, log: log.With("hwid", hwid)})
				if err != nil {
					return err
				}
				cfg.Workers = 1
				a, err := agent.New(cfg)
				if err != nil {
					return err
				}
				g.Go(func() error {
					up.Add(1)
					defer up.Add(-1)
					return a.Run(gctx)
				})
			}
			log.Info("simulated nodes running", "nodes", nodes, "set", set, "clients", clients, "status", srv.URL)
			g.Go(func() error {
				t := time.NewTicker(30 * time.Second)
				defer t.Stop()
				for {
					select {
					case <-gctx.Done():
						return nil
					case <-t.C:
						log.Info("simulated nodes", "running", up.Load())
					}
				}
			})
			return g.Wait()
		},
	}
	eo.AddFlags(cmd.Flags())
	lo.AddFlags(cmd.Flags())
	f := cmd.Flags()
	p.addFlags(f)
	f.IntVar(&nodes, "nodes", 100, "how many nodes this process runs")
	f.IntVar(&set, "set", 1, "which set of hardware ids (0-255): give each sim process its own")
	f.IntVar(&clients, "clients", 4, "etcd clients the agents share")
	f.BoolVar(&enrol, "enrol", false, "write the hardware records of this process's nodes first (where missing), as herdctl hw add would")
	// Several sim processes run side by side: the status endpoint picks a free port by default.
	f.Lookup("listen").DefValue = "127.0.0.1:0"
	_ = f.Set("listen", "127.0.0.1:0")
	return cmd
}

// simEnrol writes the hardware records of set's nodes that are missing, 64 to a transaction.
func simEnrol(ctx context.Context, c *clientv3.Client, space keys.Space, set, nodes, cpus int, memMiB int64) error {
	for start := 0; start < nodes; start += 64 {
		var cmps []clientv3.Cmp
		var puts []clientv3.Op
		for i := start; i < min(nodes, start+64); i++ {
			hwid := simHWID(set, i)
			key := space.Hardware(hwid)
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(key), "=", 0))
			puts = append(puts, clientv3.OpPut(key, keys.MustEncode(&keys.Hardware{MAC: hwid, CPUs: cpus, MemoryMiB: memMiB})))
		}
		tctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		resp, err := c.Txn(tctx).If(cmps...).Then(puts...).Commit()
		cancel()
		if err != nil {
			return fmt.Errorf("enrol simulated nodes %s..: %w", simHWID(set, start), err)
		}
		if !resp.Succeeded { // some exist already: one at a time
			for i, op := range puts {
				tctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				_, err := c.Txn(tctx).If(cmps[i]).Then(op).Commit()
				cancel()
				if err != nil {
					return fmt.Errorf("enrol simulated node %s: %w", simHWID(set, start+i), err)
				}
			}
		}
	}
	return nil
}
