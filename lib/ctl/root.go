// Package ctl is herdctl: a thin CLI over herd's etcd keys. Everything it does can also be done with
// etcdctl on the JSON documented in docs/keyspace.md; herdctl adds validation before writing,
// compare-and-swap updates, units, and readable tables.
//
// One file per noun; each verb is a cobra command whose RunE parses, validates, then acts, and
// returns an error (never exits): main maps errors to exit codes.
package ctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/herdhq/herd/lib/cli"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/termsafe"
	"github.com/herdhq/herd/lib/version"
)

// ErrNotFound marks a named object that does not exist (exit code 3).
var ErrNotFound = errors.New("not found")

// usageError marks bad arguments (exit code 2).
type usageError struct{ error }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

// ExitCode maps an error from Execute to herdctl's documented exit codes.
func ExitCode(err error) int {
	var ue usageError
	switch {
	case err == nil:
		return cli.ExitOK
	case errors.As(err, &ue):
		return cli.ExitUsage
	case errors.Is(err, ErrNotFound):
		return cli.ExitNotFound
	}
	return cli.ExitError
}

// env is what every command needs once flags are parsed. out and errOut escape control characters
// (whatever herdctl prints may come from etcd, where anyone with write access may have put escape
// sequences); rawErr is the terminal itself, for the progress bar alone.
type env struct {
	opts    etcdutil.Options
	timeout time.Duration
	out     io.Writer
	errOut  io.Writer
	rawErr  io.Writer

	client *clientv3.Client
	space  keys.Space
	// shared: the client belongs to someone else (the console runs commands on its own client).
	shared bool
}

// connect opens the etcd client on first use, so `--help` and argument errors need no etcd.
func (e *env) connect() error {
	if e.client != nil {
		return nil
	}
	s, err := e.opts.Space()
	if err != nil {
		return usageError{err}
	}
	c, err := etcdutil.New(e.opts)
	if err != nil {
		return err
	}
	e.client, e.space = c, s
	return nil
}

// forNode starts a command about one node: the normalised hardware id of arg, a connection, and
// the command's context.
func (e *env) forNode(cmd *cobra.Command, arg string) (string, context.Context, context.CancelFunc, error) {
	id, err := keys.NormalizeHWID(arg)
	if err != nil {
		return "", nil, nil, usagef("%v", err)
	}
	if err := e.connect(); err != nil {
		return "", nil, nil, err
	}
	ctx, cancel := e.ctx(cmd.Context())
	return id, ctx, cancel, nil
}

// ctx bounds one command's etcd work by --timeout.
func (e *env) ctx(parent context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(parent, e.timeout)
}

func (e *env) close() {
	if e.client != nil && !e.shared {
		e.client.Close()
		e.client = nil
	}
}

// NewRoot builds the herdctl command tree writing to out and errOut.
func NewRoot(out, errOut io.Writer) *cobra.Command {
	root, _ := newRoot(out, errOut)
	return root
}

func newRoot(out, errOut io.Writer) (*cobra.Command, *env) {
	e := &env{out: termsafe.NewWriter(out), errOut: termsafe.NewWriter(errOut), rawErr: errOut}
	root := &cobra.Command{
		Use:   "herdctl",
		Short: "Operate a herd cluster: VMs, nodes, hardware",
		Long: `herdctl reads and writes herd's keys in etcd. Every command has an etcdctl equivalent on the
JSON documented in docs/keyspace.md.

Exit codes: 0 success, 1 failure, 2 bad usage, 3 the named object does not exist.`,
		Example: `  export HERD_ENDPOINTS=http://127.0.0.1:2379
  herdctl vm create web1 --vcpus 2 --memory 1GiB --disk 10GiB
  herdctl vm list
  herdctl node list`,
		Version:       version.Version,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPostRun: func(*cobra.Command, []string) {
			e.close()
		},
	}
	root.SetOut(out)
	root.SetErr(errOut)
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		//lint:ignore ST1005 cobra prints this as the whole message: the hint is its last line, as git and kubectl end theirs
		return usageError{fmt.Errorf("%w\nSee '%s --help'.", err, c.CommandPath())}
	})
	e.opts.AddFlags(root.PersistentFlags())
	root.PersistentFlags().DurationVar(&e.timeout, "timeout", 10*time.Second, "give up on an etcd request after this long")
	root.AddCommand(vmCmd(e), nodeCmd(e), netCmd(e), hwCmd(e), imageCmd(e), volumeCmd(e), fenceCmd(e), clusterCmd(e), eventsCmd(e), rolloutCmd(e), uiCmd(e))
	return root, e
}

// Main runs herdctl with args and returns the exit code; cmd/herdctl is only this.
func Main(args []string) int {
	root, e := newRoot(os.Stdout, os.Stderr)
	root.SetArgs(cli.NormalizeArgs(root, args))
	err := root.Execute()
	if err != nil {
		fmt.Fprintln(e.errOut, "herdctl:", err)
		if h := e.explain(err); h != "" {
			fmt.Fprintln(e.errOut, "hint:", h)
		}
	}
	e.close()
	return ExitCode(err)
}

// explain is the hint herdctl prints under an error: what to do about it.
func (e *env) explain(err error) string {
	h := hint(err, e.opts)
	if t := e.etcdTrouble(err); t != "" {
		h = t
	} else if errors.Is(err, context.DeadlineExceeded) && e.etcdAnswers() {
		h = fmt.Sprintf("etcd answers at %s, but not within --timeout %s this time: a busy cluster or a big read; retry, or raise --timeout",
			strings.Join(e.opts.Endpoints, ","), e.timeout)
	}
	return h
}

// noSpaceHint is what to do about etcd's NOSPACE alarm.
const noSpaceHint = "etcd is out of space (NOSPACE alarm: its database reached --quota-backend-bytes) and refuses every write; " +
	"guests keep running. Compact, defragment and disarm: docs/operations.md, \"etcd out of space\""

// etcdTrouble names what is wrong with etcd itself when a request failed: it has no quorum, or it is
// out of space. "" when it cannot tell (or etcd is fine).
func (e *env) etcdTrouble(err error) string {
	if errors.Is(err, rpctypes.ErrNoSpace) {
		return noSpaceHint
	}
	timeout := errors.Is(err, context.DeadlineExceeded) || errors.Is(err, rpctypes.ErrNoLeader) || errors.Is(err, rpctypes.ErrTimeout) ||
		errors.Is(err, rpctypes.ErrTimeoutDueToLeaderFail) || errors.Is(err, rpctypes.ErrTimeoutDueToConnectionLost) ||
		status.Code(err) == codes.DeadlineExceeded || status.Code(err) == codes.Unavailable
	if e.client == nil || !timeout {
		return ""
	}
	answered, led := 0, 0
	noSpace := false
	for _, ep := range e.opts.Endpoints {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		st, err := e.client.Status(ctx, ep)
		cancel()
		if err != nil {
			continue
		}
		answered++
		if st.Leader != 0 {
			led++
		}
		for _, m := range st.Errors {
			noSpace = noSpace || strings.Contains(m, "NOSPACE")
		}
	}
	switch {
	case noSpace:
		return noSpaceHint
	case answered > 0 && led == 0:
		return fmt.Sprintf("etcd has no quorum: %d of %d endpoints answer, and none has a raft leader (most members are down or cut off from each other); "+
			"guests keep running and herd's daemons wait. Bring members back: docs/operations.md, \"etcd lost quorum\"", answered, len(e.opts.Endpoints))
	}
	return ""
}

// etcdAnswers asks etcd once more, briefly, after a timeout, so that the hint blames etcd only
// when it is silent. Any answer counts, a refusal too.
func (e *env) etcdAnswers() bool {
	if e.client == nil {
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	_, err := e.client.Get(ctx, e.space.ImageCurrent(), clientv3.WithCountOnly())
	return err == nil || !(errors.Is(err, context.DeadlineExceeded) || status.Code(err) == codes.DeadlineExceeded || status.Code(err) == codes.Unavailable)
}

// hint says what to do about the errors that come from who the caller is rather than what it asked.
func hint(err error, o etcdutil.Options) string {
	secure := false
	for _, ep := range o.Endpoints {
		secure = secure || strings.HasPrefix(ep, "https://")
	}
	switch {
	case errors.Is(err, rpctypes.ErrPermissionDenied):
		if u := o.User(); u != "" {
			return fmt.Sprintf("etcd user %s (from --cert) may not do this: changes need the operator role (herd pki issue --role operator)", u)
		}
		return "etcd has authentication on: pass a client certificate (--cacert/--cert/--key or HERD_CACERT/HERD_CERT/HERD_KEY)"
	case errors.Is(err, rpctypes.ErrUserEmpty), errors.Is(err, rpctypes.ErrInvalidAuthToken):
		return "etcd has authentication on: pass a client certificate (--cert/--key or HERD_CERT/HERD_KEY)"
	case errors.Is(err, context.DeadlineExceeded) && secure && o.Cert == "":
		return "no answer from etcd over TLS: it likely requires a client certificate (--cert/--key or HERD_CERT/HERD_KEY)"
	case errors.Is(err, context.DeadlineExceeded) && !secure:
		return "no answer from etcd: is it running at " + strings.Join(o.Endpoints, ",") + "? (an https:// cluster needs https endpoints and --cacert)"
	}
	return ""
}

// exactArgs is cobra.ExactArgs returning a usage error that names what is missing.
func exactArgs(names ...string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != len(names) {
			return usagef("%s takes %d argument(s): %v; got %d\nSee '%s --help'.", cmd.CommandPath(), len(names), names, len(args), cmd.CommandPath())
		}
		return nil
	}
}
