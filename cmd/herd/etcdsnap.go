//go:build !agentonly

package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/etcdutl/v3/snapshot"
	"go.uber.org/zap"

	"github.com/herdhq/herd/lib/etcdembed"
	"github.com/herdhq/herd/lib/etcdutil"
)

// etcdSnapshotCmd is the backup half of docs/operations.md's restore runbook: a snapshot of the
// keyspace, and a restore of it into a fresh data directory. herd recognises the restore by itself
// (etcd's revision goes back) and recovers from it; see docs/architecture.md.
func etcdSnapshotCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "snapshot",
		Short: "Save etcd's keyspace to a file, or restore one into a new data directory",
		Example: `  herd etcd snapshot save /var/backups/herd-$(date +%F).db --endpoints https://10.0.0.5:2379 ...
  herd etcd snapshot restore /var/backups/herd-2026-12-01.db --data-dir /var/lib/herd/etcd.restored`,
	}
	cmd.AddCommand(etcdSnapshotSaveCmd(), etcdSnapshotRestoreCmd())
	return cmd
}

func etcdSnapshotSaveCmd() *cobra.Command {
	var eo etcdutil.Options
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:     "save FILE",
		Short:   "Stream a snapshot of etcd's database into FILE (written whole, then renamed)",
		Example: `  herd etcd snapshot save /var/backups/herd.db --endpoints http://127.0.0.1:2379`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := etcdutil.New(eo)
			if err != nil {
				return err
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			rc, err := c.Snapshot(ctx)
			if err != nil {
				return fmt.Errorf("snapshot of %s: %w", strings.Join(eo.Endpoints, ","), err)
			}
			defer rc.Close()
			tmp, err := os.CreateTemp(filepath.Dir(args[0]), filepath.Base(args[0])+".part*")
			if err != nil {
				return err
			}
			defer os.Remove(tmp.Name())
			n, err := io.Copy(tmp, rc)
			if err == nil {
				err = tmp.Sync()
			}
			if cerr := tmp.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("write snapshot: %w", err)
			}
			if err := os.Rename(tmp.Name(), args[0]); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "snapshot saved: %s (%d bytes)\n", args[0], n)
			return nil
		},
	}
	eo.AddFlags(cmd.Flags())
	cmd.Flags().DurationVar(&timeout, "timeout", 10*time.Minute, "give up after this long")
	return cmd
}

func etcdSnapshotRestoreCmd() *cobra.Command {
	var cfg snapshot.RestoreConfig
	var peers []string
	cmd := &cobra.Command{
		Use:   "restore FILE",
		Short: "Restore a snapshot into a new data directory (then start etcd on it)",
		Long: `Restore writes a new data directory from a snapshot; start the member on it with the same
client URLs. Do not bump the revision: herd notices the restore because etcd's revision goes back,
and every agent then freezes its domains until the leader has adopted what actually runs.`,
		Example: `  herd etcd snapshot restore /var/backups/herd.db --data-dir /var/lib/herd/etcd.restored
  herd etcd --data-dir /var/lib/herd/etcd.restored --listen-client http://127.0.0.1:2379`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg.SnapshotPath = args[0]
			dir := cfg.OutputDataDir
			cfg.OutputDataDir = etcdembed.MemberDir(dir)
			cfg.PeerURLs = peers
			if cfg.InitialCluster == "" {
				cfg.InitialCluster = cfg.Name + "=" + strings.Join(peers, ",")
			}
			if cfg.InitialClusterToken == "" {
				cfg.InitialClusterToken = "etcd-cluster"
			}
			if _, err := os.Stat(dir); err == nil {
				return fmt.Errorf("%s exists: restore into a new directory (etcd's data is never overwritten)", dir)
			}
			if err := snapshot.NewV3(zap.NewNop()).Restore(cfg); err != nil {
				return fmt.Errorf("restore %s: %w", args[0], err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "restored into %s: start herd etcd on it (--data-dir %s)\n", dir, dir)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.OutputDataDir, "data-dir", "", "new herd etcd data directory (must not exist; for an etcd you run yourself use etcdutl snapshot restore)")
	f.StringVar(&cfg.Name, "name", "herd-etcd", "member name (as herd etcd --name)")
	f.StringSliceVar(&peers, "listen-peer", []string{"http://127.0.0.1:2380"}, "peer URLs (as herd etcd --listen-peer)")
	f.StringVar(&cfg.InitialCluster, "initial-cluster", "", "name=peerURL,... (default: this member alone)")
	f.StringVar(&cfg.InitialClusterToken, "initial-cluster-token", "", "the cluster token etcd was started with (default etcd's)")
	_ = cmd.MarkFlagRequired("data-dir")
	return cmd
}
