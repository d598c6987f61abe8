// Command herd runs herd's daemons: agent, coordinator and dev (plus etcd, an embedded etcd member
// for labs and tests). Operators use herdctl.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/herdhq/herd/lib/cli"
	"github.com/herdhq/herd/lib/version"
)

// extraCmds are the subcommands that embed an etcd server (dev, etcd). The netboot image builds
// with -tags agentonly and leaves them out: they would double the binary every node downloads.
var extraCmds []*cobra.Command

func newRoot() *cobra.Command {
	root := &cobra.Command{
		Use:           "herd",
		Short:         "herd turns bare hypervisors into one pool of capacity",
		Version:       version.Version,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(agentCmd(), coordinatorCmd(), bootserverCmd(), pkiCmd(), rbacCmd())
	root.AddCommand(extraCmds...)
	return root
}

func main() {
	root := newRoot()
	root.SetArgs(cli.NormalizeArgs(root, os.Args[1:]))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "herd:", err)
		stop()
		os.Exit(cli.ExitError)
	}
}
