package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/herdhq/herd/agent"
	"github.com/herdhq/herd/agent/hypervisor"
	"github.com/herdhq/herd/lib/console"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/logging"
	"github.com/herdhq/herd/lib/statusserver"
	"github.com/herdhq/herd/lib/units"
	"github.com/herdhq/herd/lib/version"
)

func agentCmd() *cobra.Command {
	var (
		eo     etcdutil.Options
		lo     logging.Options
		p      agentParams
		hwid   string
		bootID string
		uri    string
		jf     joinClientFlags
	)
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the node agent: register this hypervisor and run the VMs assigned to it",
		Example: `  # on a hypervisor (hardware id from the kernel command line, the boot NIC or DMI)
  herd agent --endpoints http://10.0.0.5:2379 --libvirt-uri qemu:///system

  # a netbooted node: credentials from a one-time token (the image's init passes these)
  herd agent --endpoints https://10.0.0.5:2379 --join https://10.0.0.7:9443 \
    --join-token "$TOKEN" --ca-hash sha256:3f5c...

  # a simulated node on libvirt's test driver
  herd agent --hwid 52:54:00:00:00:01 --libvirt-uri test:///tmp/node1.xml --volume-dir /tmp/vols`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := lo.New("herd-agent", nil)
			if err != nil {
				return err
			}
			space, err := eo.Space()
			if err != nil {
				return err
			}
			if hwid == "" {
				id, source, err := agent.LocalHost().HWID()
				if err != nil {
					return err
				}
				log.Info("hardware id detected", "hwid", id, "source", source)
				hwid = id
			}
			if bootID == "" {
				if strings.HasPrefix(uri, "test:") {
					// The test driver's domains live in this process: every start is a new boot.
					bootID = uuid.NewString()
				} else if bootID, err = agent.BootID(); err != nil {
					return err
				}
			}
			ctx := cmd.Context()
			if p.migTLS && len(jf.urls) > 0 {
				// QEMU's certificate names the migration address the leader vouches for; the node
				// asks for it once registered (RunMigrationCert).
				jf.qemuDir = p.migTLSDir
			}
			creds, err := jf.bootstrap(ctx, hwid, &eo, &p.storage, log)
			if err != nil {
				return err
			}
			client, err := etcdutil.New(eo)
			if err != nil {
				return err
			}
			defer client.Close()
			host, _ := os.Hostname()
			hv, err := openHypervisor(ctx, uri, p.domType, log, agent.Unready{Client: client, Space: space, HWID: hwid, BootID: bootID,
				Hostname: host, Addresses: keys.Addresses{Management: p.addrMgmt, Storage: p.addrStore, Migration: p.addrMig},
				Image: p.image, Version: version.Version, LeaseTTL: p.leaseTTL, Log: log})
			if err != nil {
				return err
			}
			defer hv.Close()
			hv.MigrateTLS = p.migTLS
			reg := statusserver.NewRegistry()
			mux := http.NewServeMux()
			srv, err := statusserver.Listen(p.listen, reg, mux)
			if err != nil {
				return err
			}
			vols, err := p.storage.backend(nil)
			if err != nil {
				return err
			}
			cephKey, err := p.storage.key()
			if err != nil {
				return err
			}
			cons, err := listenConsole(eo, p.consoleL, p.addrMgmt, srv.URL)
			if err != nil {
				return err
			}
			cfg, err := p.config(agentConns{client: client, user: eo.User(), space: space, hwid: hwid, bootID: bootID,
				hypervisor: hv, volumes: vols, cephKey: cephKey, hostname: host, version: version.Version,
				statusURL: srv.URL, consoleURL: cons.url, log: log, registry: reg})
			if err != nil {
				return err
			}
			a, err := agent.New(cfg)
			if err != nil {
				return err
			}
			mux.HandleFunc("GET /v1/domains", domainsHandler(a.Domains))
			cs := &console.Server{Opener: hv, LogDir: p.console, Running: a.RunsHere, Record: a.Record,
				Secure: cons.tls != nil, Ticket: a.ConsoleTicket, Log: log.Named("console")}
			g, gctx := errgroup.WithContext(ctx)
			g.Go(func() error { return srv.Serve(gctx) })
			switch {
			case cons.tls != nil:
				g.Go(func() error { return cons.serve(gctx, cs.Handler()) })
				log.Info("console endpoint", "url", cons.url)
			case cons.url != "":
				mux.Handle("/v1/vms/", cs.Handler())
			}
			g.Go(func() error { return a.Run(gctx) })
			if creds != nil {
				g.Go(func() error { creds.RunRenewal(gctx); return nil })
				g.Go(func() error { creds.RunMigrationCert(gctx); return nil })
			}
			log.Info("status endpoint", "url", srv.URL)
			return g.Wait()
		},
	}
	eo.AddFlags(cmd.Flags())
	lo.AddFlags(cmd.Flags())
	f := cmd.Flags()
	f.StringVar(&hwid, "hwid", "", "hardware id (MAC or serial) this node is enrolled under; default: detect")
	f.StringVar(&bootID, "boot-id", "", "id of this boot; default: the kernel's (random for test:// URIs)")
	f.StringVar(&uri, "libvirt-uri", "qemu:///system", "libvirt connection URI")
	p.addFlags(f)
	jf.add(f)
	return cmd
}

// openHypervisor connects to libvirt, waiting for it as long as it takes. A libvirtd that is not
// up within half a minute (an image whose libvirtd cannot start) is a problem the node reports in
// its registration, without capacity, until the connection succeeds: the node is never silently
// missing, and never offers what it cannot run.
func openHypervisor(ctx context.Context, uri, domType string, log hclog.Logger, u agent.Unready) (*hypervisor.Libvirt, error) {
	var (
		mu       sync.Mutex
		last     error
		reported chan struct{}
	)
	rctx, stopReport := context.WithCancel(ctx)
	defer func() {
		stopReport()
		if reported != nil {
			<-reported
		}
	}()
	problem := func() string {
		mu.Lock()
		defer mu.Unlock()
		return fmt.Sprintf("cannot connect to libvirt at %s: %v", uri, last)
	}
	start := time.Now()
	for {
		hv, err := hypervisor.Open(ctx, uri, domType, log)
		if err == nil {
			if reported != nil {
				log.Info("libvirt reachable again: registering the node's capacity")
			}
			return hv, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		mu.Lock()
		last = err
		mu.Unlock()
		if time.Since(start) > 30*time.Second && reported == nil && u.Client != nil {
			reported = make(chan struct{})
			go func() { defer close(reported); _ = agent.ReportUnready(rctx, u, problem) }()
		}
		log.Warn("libvirt not reachable yet; retrying", "uri", uri, "error", err)
		if !etcdutil.Sleep(ctx, 3*time.Second) {
			return nil, ctx.Err()
		}
	}
}

func parseOptionalMiB(flag, s string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	v, err := units.ParseIn(s, units.MiB)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", flag, err)
	}
	return v, nil
}

func domainsHandler(list func(context.Context) ([]hypervisor.Domain, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		doms, err := list(r.Context())
		if err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		if doms == nil {
			doms = []hypervisor.Domain{}
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(doms)
	}
}

// consoleEndpoint is where an agent serves its VMs' consoles.
type consoleEndpoint struct {
	url string
	tls net.Listener // nil: on the status endpoint (no TLS), or none
}

// listenConsole binds the console endpoint. With TLS it is a listener of its own that asks every
// caller for a certificate; without, the cluster authenticates nobody and the console is served on
// the status endpoint like the rest of what the agent reports. The advertised host is the listen
// address's, else the management address (the listener usually binds every address).
func listenConsole(eo etcdutil.Options, listen, mgmt, statusURL string) (consoleEndpoint, error) {
	if eo.Cert == "" {
		return consoleEndpoint{url: statusURL}, nil
	}
	if listen == "" {
		return consoleEndpoint{}, nil
	}
	cfg, err := console.ServerTLS(eo.CACert, eo.Cert, eo.Key)
	if err != nil {
		return consoleEndpoint{}, fmt.Errorf("console endpoint: %w", err)
	}
	l, err := net.Listen("tcp", listen)
	if err != nil {
		return consoleEndpoint{}, fmt.Errorf("console endpoint %s: %w", listen, err)
	}
	host, port, _ := net.SplitHostPort(l.Addr().String())
	if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		host = mgmt
		if host == "" {
			host, _ = os.Hostname()
		}
	}
	return consoleEndpoint{url: "https://" + net.JoinHostPort(host, port), tls: tls.NewListener(l, cfg)}, nil
}

// serve runs the console endpoint until ctx ends. Sessions in progress end with the process.
func (c consoleEndpoint) serve(ctx context.Context, h http.Handler) error {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(c.tls) }()
	select {
	case err := <-errc:
		return fmt.Errorf("console endpoint: %w", err)
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
		return nil
	}
}
