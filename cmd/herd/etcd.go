//go:build !agentonly

package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/herdhq/herd/lib/etcdembed"
	"github.com/herdhq/herd/lib/logging"
)

func init() { extraCmds = append(extraCmds, etcdCmd()) }

func etcdCmd() *cobra.Command {
	var (
		lo         logging.Options
		c          etcdembed.Config
		existing   bool
		compaction time.Duration
	)
	cmd := &cobra.Command{
		Use:   "etcd",
		Short: "Run an embedded etcd member (labs and tests; production runs etcd itself)",
		Example: `  # a single member
  herd etcd --data-dir /tmp/etcd1

  # one member of three on loopback
  herd etcd --name m1 --data-dir /tmp/m1 --listen-client http://127.0.0.1:2379 \
    --listen-peer http://127.0.0.1:2380 \
    --initial-cluster m1=http://127.0.0.1:2380,m2=http://127.0.0.2:2380,m3=http://127.0.0.3:2380

  # with TLS and client certificates from herd's CA (herd pki init --dir /etc/herd/pki)
  herd etcd --data-dir /var/lib/herd/etcd --listen-client https://10.0.0.5:2379 \
    --cert-file /etc/herd/pki/etcd-server.crt --key-file /etc/herd/pki/etcd-server.key \
    --trusted-ca-file /etc/herd/pki/ca.crt`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := lo.New("herd-etcd", nil)
			if err != nil {
				return err
			}
			if (c.CertFile == "") != (c.TrustedCAFile == "") || (c.CertFile == "") != (c.KeyFile == "") {
				return fmt.Errorf("--cert-file, --key-file and --trusted-ca-file go together")
			}
			c.Existing = existing
			c.AutoCompaction = compaction
			s, err := etcdembed.Start(cmd.Context(), c, 5*time.Minute)
			if errors.Is(err, context.Canceled) {
				return nil // stopped by a signal while waiting for the other members
			}
			if err != nil {
				return err
			}
			defer s.Close()
			log.Info("etcd member serving", "name", c.Name, "endpoints", s.Endpoints, "log", c.Dir+"/etcd.log")
			fmt.Fprintln(os.Stdout, "ready", s.Endpoints[0])
			select {
			case <-cmd.Context().Done():
				log.Info("stopping")
				return nil
			case err := <-s.Err():
				return fmt.Errorf("etcd member failed: %w", err)
			}
		},
	}
	lo.AddFlags(cmd.Flags())
	f := cmd.Flags()
	f.StringVar(&c.Name, "name", "herd-etcd", "member name")
	f.StringVar(&c.Dir, "data-dir", "", "data directory (required)")
	f.StringSliceVar(&c.Clients, "listen-client", []string{"http://127.0.0.1:2379"}, "client URLs")
	f.StringSliceVar(&c.Peers, "listen-peer", []string{"http://127.0.0.1:2380"}, "peer URLs")
	f.StringSliceVar(&c.Metrics, "listen-metrics", nil, "extra URLs serving /metrics")
	f.StringVar(&c.InitialCluster, "initial-cluster", "", "name=peerURL,... (default: this member alone)")
	f.BoolVar(&existing, "existing", false, "join an existing cluster (a restarted or replaced member)")
	f.DurationVar(&compaction, "auto-compaction", 5*time.Minute, "history kept before compaction")
	f.BoolVar(&c.UnsafeNoFsync, "unsafe-no-fsync", false, "skip fsync: faster, loses data on power failure (tests only)")
	f.StringVar(&c.CertFile, "cert-file", "", "server certificate for client connections (enables TLS; use https:// --listen-client URLs)")
	f.StringVar(&c.KeyFile, "key-file", "", "server key")
	f.StringVar(&c.TrustedCAFile, "trusted-ca-file", "", "CA that client certificates must be signed by (required with --cert-file)")
	f.UintVar(&c.MaxRequestBytes, "max-request-bytes", etcdembed.DefaultMaxRequestBytes, "largest request (value, transaction) etcd accepts")
	f.Int64Var(&c.QuotaBackendBytes, "quota-backend-bytes", etcdembed.DefaultQuotaBackendBytes, "database size at which etcd refuses writes")
	_ = cmd.MarkFlagRequired("data-dir")
	cmd.AddCommand(etcdSnapshotCmd())
	return cmd
}
