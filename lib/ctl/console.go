package ctl

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/term"

	"github.com/herdhq/herd/lib/console"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/termsafe"
)

// detachKey is Ctrl+], telnet's and virsh console's: a byte no shell or editor binds.
const detachKey = 0x1d

func vmConsoleCmd(e *env) *cobra.Command {
	var (
		logOnly, follow, force bool
		n                      int64
	)
	cmd := &cobra.Command{
		Use:   "console NAME",
		Short: "Attach to a running VM's serial console, or print its console log",
		Long: `Attach to the serial console of a running VM: what the guest prints appears here, what you type
goes to the guest (Ctrl+C included). Detach with Ctrl+] (the guest does not notice).

herdctl reaches the agent of the node the VM runs on directly, at the console address the node
advertises. On a cluster with TLS it shows your certificate (--cert), and the agent checks it against
the cluster's CA: operators may type, viewers may only read the log (--log). Every session is an
event naming the user (herdctl events --object vm/NAME).

One session holds a console at a time; --force takes it from whoever has it (their session ends).
The log is the node's record of everything the guest printed, also while nobody was attached.`,
		Example: `  herdctl vm console web1             # attach; detach with Ctrl+]
  herdctl vm console web1 --log       # the last 64 KiB the guest printed
  herdctl vm console web1 --log -f    # ... and what it prints from now on (Ctrl+C ends)
  herdctl vm console web1 --log --bytes 0 > web1-console.log   # the whole log`,
		Args: exactArgs("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if err := keys.ValidateName(name); err != nil {
				return usagef("%v", err)
			}
			if (follow || cmd.Flags().Changed("bytes")) && !logOnly {
				return usagef("--follow and --bytes go with --log")
			}
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			cl, hwid, err := e.consoleClient(ctx, name)
			cancel()
			if err != nil {
				return err
			}
			sctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			if logOnly {
				lctx, cancel := sctx, context.CancelFunc(func() {})
				if !follow {
					lctx, cancel = e.ctx(sctx)
				}
				defer cancel()
				return consoleErr(name, hwid, cl.Log(lctx, name, n, follow, e.logWriter()))
			}
			return e.attachConsole(sctx, cmd.InOrStdin(), cl, name, hwid, force)
		},
	}
	f := cmd.Flags()
	f.BoolVar(&logOnly, "log", false, "print the console log instead of attaching (viewers may)")
	f.BoolVarP(&follow, "follow", "f", false, "with --log: keep printing what the guest prints")
	f.Int64Var(&n, "bytes", console.DefaultLogBytes, "with --log: print the last this many bytes; 0: the whole log")
	f.BoolVar(&force, "force", false, "take the console from the session that holds it")
	return cmd
}

// consoleClient finds the node vm runs on and how to reach that node's console endpoint.
func (e *env) consoleClient(ctx context.Context, name string) (*console.Client, string, error) {
	resp, err := e.client.Get(ctx, e.space.Placement(name))
	if err != nil {
		return nil, "", fmt.Errorf("read placement of vm %s: %w", name, err)
	}
	if len(resp.Kvs) == 0 {
		sp, err := e.client.Get(ctx, e.space.VMSpec(name), clientv3.WithCountOnly())
		if err == nil && sp.Count == 0 {
			return nil, "", fmt.Errorf("vm %s: %w", name, ErrNotFound)
		}
		return nil, "", fmt.Errorf("vm/%s is not placed on a node, so it has no console (herdctl vm get %s says why)", name, name)
	}
	pl, err := keys.Decode[keys.Placement](resp.Kvs[0].Value)
	if err != nil {
		return nil, "", fmt.Errorf("placement of vm %s: %w", name, err)
	}
	resp, err = e.client.Get(ctx, e.space.Node(pl.Node))
	if err != nil {
		return nil, "", fmt.Errorf("read node %s: %w", pl.Node, err)
	}
	if len(resp.Kvs) == 0 {
		return nil, "", fmt.Errorf("vm/%s is placed on node %s, which is not registered (down?): no console to reach", name, pl.Node)
	}
	nd, err := keys.Decode[keys.Node](resp.Kvs[0].Value)
	if err != nil {
		return nil, "", fmt.Errorf("node %s: %w", pl.Node, err)
	}
	if nd.ConsoleURL == "" {
		return nil, "", fmt.Errorf("node %s serves no consoles: its agent runs with --console-listen '' or is older than this herdctl (herd dev's simulated nodes run no guests to attach to)", pl.Node)
	}
	cl := &console.Client{URL: nd.ConsoleURL}
	if strings.HasPrefix(nd.ConsoleURL, "https://") {
		if e.opts.CACert == "" || e.opts.Cert == "" {
			return nil, "", usagef("node %s serves consoles over TLS: give --cacert, --cert and --key (or HERD_CACERT, HERD_CERT, HERD_KEY)", pl.Node)
		}
		if cl.TLS, err = console.ClientTLS(e.opts.CACert, e.opts.Cert, e.opts.Key, pl.Node); err != nil {
			return nil, "", err
		}
	}
	return cl, pl.Node, nil
}

// logWriter is where --log writes: to a file or pipe the log's bytes as they are (a copy of it);
// to a terminal without the guest's escape sequences and carriage returns, which would drive the
// operator's terminal rather than show what the guest printed.
func (e *env) logWriter() io.Writer {
	raw := e.rawOut()
	if f, ok := raw.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		return dropCR{termsafe.NewWriter(f)}
	}
	return raw
}

// rawOut is stdout without the filter that escapes control characters: for the guest's own bytes.
func (e *env) rawOut() io.Writer {
	if tw, ok := e.out.(*termsafe.Writer); ok {
		return tw.Unwrap()
	}
	return e.out
}

// dropCR drops carriage returns (a serial console ends its lines with CR LF).
type dropCR struct{ w io.Writer }

func (d dropCR) Write(p []byte) (int, error) {
	if bytes.IndexByte(p, '\r') < 0 {
		return d.w.Write(p)
	}
	if _, err := d.w.Write(bytes.ReplaceAll(p, []byte("\r"), nil)); err != nil {
		return 0, err
	}
	return len(p), nil
}

// writeTicket writes a console ticket for vm at node hwid with the caller's own credentials, under a
// short lease: etcd's RBAC decides here whether the caller may type into VMs. done deletes it.
func (e *env) writeTicket(ctx context.Context, vm, hwid string) (string, func(), error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", nil, err
	}
	id := hex.EncodeToString(b)
	key := e.space.ConsoleTicket(hwid, id)
	cctx, cancel := e.ctx(ctx)
	defer cancel()
	lease, err := e.client.Grant(cctx, int64(console.TicketTTL/time.Second))
	if err == nil {
		_, err = e.client.Put(cctx, key, keys.MustEncode(&keys.ConsoleTicket{VM: vm, User: e.opts.User(), Created: time.Now()}), clientv3.WithLease(lease.ID))
	}
	if err != nil {
		if strings.Contains(err.Error(), "permission denied") {
			return "", nil, fmt.Errorf("etcd refused the console ticket for vm/%s: your etcd user (%s) may not type into VMs (operators and root may; a viewer may read the log with --log): %w", vm, e.opts.User(), err)
		}
		return "", nil, fmt.Errorf("write console ticket: %w", err)
	}
	return id, func() {
		dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, _ = e.client.Delete(dctx, key)
		_, _ = e.client.Revoke(dctx, lease.ID)
	}, nil
}

// consoleErr words what the node said so that the next step is clear.
func consoleErr(vm, hwid string, err error) error {
	if err == nil {
		return nil
	}
	var r *console.Refused
	if errors.As(err, &r) {
		return fmt.Errorf("node %s: %s", hwid, r.Message)
	}
	return fmt.Errorf("console of vm/%s on node %s: %w", vm, hwid, err)
}

// attachConsole runs an interactive session: raw terminal, the guest's bytes out, the user's in,
// until the detach key, the end of the session on the node's side, or a signal.
func (e *env) attachConsole(ctx context.Context, in io.Reader, cl *console.Client, vm, hwid string, force bool) error {
	ticket := ""
	if cl.TLS != nil {
		id, done, err := e.writeTicket(ctx, vm, hwid)
		if err != nil {
			return err
		}
		defer done()
		ticket = id
	}
	conn, err := cl.Attach(ctx, vm, force, ticket)
	if err != nil {
		return consoleErr(vm, hwid, err)
	}
	defer conn.Close()
	out := e.rawOut() // the guest's own terminal: its escape codes are the point
	nl := "\n"
	if f, ok := in.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		old, err := term.MakeRaw(int(f.Fd()))
		if err != nil {
			return fmt.Errorf("terminal: %w", err)
		}
		defer func() { _ = term.Restore(int(f.Fd()), old) }()
		nl = "\r\n"
	}
	fmt.Fprintf(e.errOut, "Connected to vm/%s on node %s. Detach with Ctrl+] (^]).%s", vm, hwid, nl)

	remote := make(chan error, 1)
	go func() {
		_, err := io.Copy(out, conn)
		remote <- err
	}()
	detached := make(chan struct{})
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := in.Read(buf)
			if n > 0 {
				chunk := buf[:n]
				i := bytes.IndexByte(chunk, detachKey)
				if i >= 0 {
					chunk = chunk[:i]
				}
				if len(chunk) > 0 {
					if _, werr := conn.Write(chunk); werr != nil {
						return
					}
				}
				if i >= 0 {
					close(detached)
					return
				}
			}
			if err != nil {
				// End of input (a pipe): nothing more to type; the session goes on showing what
				// the guest prints until it ends or a signal.
				return
			}
		}
	}()
	select {
	case <-detached:
		_ = conn.Close()
		fmt.Fprintf(e.errOut, "%sDetached from vm/%s.%s", nl, vm, nl)
		return nil
	case <-ctx.Done():
		_ = conn.Close()
		fmt.Fprintf(e.errOut, "%sDetached from vm/%s.%s", nl, vm, nl)
		return nil
	case err := <-remote:
		why := "the VM stopped or moved, or another session took the console (--force)"
		if err != nil {
			why = err.Error()
		}
		return fmt.Errorf("%sthe console of vm/%s ended: %s", nl, vm, why)
	}
}
