package ctl

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/join"
)

func hwTokenCmd(e *env) *cobra.Command {
	var ttl time.Duration
	cmd := &cobra.Command{
		Use:   "token HWID",
		Short: "Mint a one-time join token for an enrolled machine that does not netboot through herd",
		Long: `token prints a fresh one-time token with which the agent on HWID gets its node certificate
(herd agent --join URL --join-token TOKEN --ca-hash ...). The bootserver mints one for every netboot
by itself; this is for machines booted some other way, and for labs. Only the token's hash is
stored (/herd/jointokens/<sha256>), under a lease of --ttl.`,
		Example: `  TOKEN=$(herdctl hw token 52:54:00:12:34:56 --ttl 10m)
  HERD_JOIN_TOKEN=$TOKEN herd agent --join https://10.0.0.7:9443 --ca-hash sha256:... --endpoints https://10.0.0.5:2379`,
		Args: exactArgs("HWID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, ctx, cancel, err := e.forNode(cmd, args[0])
			if err != nil {
				return err
			}
			defer cancel()
			hw, err := e.client.Get(ctx, e.space.Hardware(id), clientv3.WithCountOnly())
			if err != nil {
				return err
			}
			if hw.Count == 0 {
				return fmt.Errorf("hardware %s: %w: enrol it first (herdctl hw add %s)", id, ErrNotFound, id)
			}
			tok, err := join.Mint(ctx, e.client, e.space, join.Grant{HWID: id, TTL: ttl, IssuedBy: actor()})
			if err != nil {
				return err
			}
			_ = e.record(ctx, "node/"+id, "join-token-minted", "valid "+ttl.String())
			fmt.Fprintln(e.out, tok)
			return nil
		},
	}
	cmd.Flags().DurationVar(&ttl, "ttl", join.DefaultTokenTTL, "how long the token stays valid")
	return cmd
}
