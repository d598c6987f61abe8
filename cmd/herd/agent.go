package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/herdhq/herd/agent"
	"github.com/herdhq/herd/agent/hypervisor"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/logging"
	"github.com/herdhq/herd/lib/statusserver"
	"github.com/herdhq/herd/lib/units"
	"github.com/herdhq/herd/lib/version"
)

func agentCmd() *cobra.Command {
	var (
		eo        etcdutil.Options
		lo        logging.Options
		hwid      string
		bootID    string
		uri       string
		leaseTTL  time.Duration
		resync    time.Duration
		cpus      int
		memory    string
		reserved  string
		storage   storageFlags
		listen    string
		image     string
		addrMgmt  string
		addrStore string
		addrMig   string
		domType   string
		console   string
		bootDir   string
		migURI    string
		maxMig    int
		shutdownT time.Duration
		migT      time.Duration
		jf        joinClientFlags
		migTLS    bool
		migTLSDir string
		rebootCmd string
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
			memMiB, err := parseOptionalMiB("--memory", memory)
			if err != nil {
				return err
			}
			resMiB, err := parseOptionalMiB("--reserved-memory", reserved)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			if migTLS && len(jf.urls) > 0 {
				// QEMU's certificate names the migration address the leader vouches for; the node
				// asks for it once registered (RunMigrationCert).
				jf.qemuDir = migTLSDir
			}
			creds, err := jf.bootstrap(ctx, hwid, &eo, &storage, log)
			if err != nil {
				return err
			}
			client, err := etcdutil.New(eo)
			if err != nil {
				return err
			}
			defer client.Close()
			hv, err := hypervisor.Open(ctx, uri, domType, log)
			if err != nil {
				return err
			}
			defer hv.Close()
			hv.MigrateTLS = migTLS
			reg := statusserver.NewRegistry()
			mux := http.NewServeMux()
			srv, err := statusserver.Listen(listen, reg, mux)
			if err != nil {
				return err
			}
			vols, err := storage.backend(nil)
			if err != nil {
				return err
			}
			cephKey, err := storage.key()
			if err != nil {
				return err
			}
			host, _ := os.Hostname()
			a, err := agent.New(agent.Config{
				Client: client, EtcdUser: eo.User(), Space: space, HWID: hwid, BootID: bootID,
				Hypervisor: hv, Volumes: vols, CephUser: storage.user, CephKey: cephKey,
				LeaseTTL: leaseTTL, Resync: resync,
				CPUs: cpus, MemoryMiB: memMiB, ReservedMemoryMiB: resMiB,
				Addresses:    keys.Addresses{Management: addrMgmt, Storage: addrStore, Migration: addrMig},
				MigrationURI: migURI, ConsoleDir: console, BootDir: bootDir, MaxMigrations: maxMig,
				ShutdownTimeout: shutdownT, MigrationTimeout: migT, RebootCommand: rebootCmd,
				Hostname: host, Image: image, Version: version.Version,
				StatusURL: srv.URL, Log: log, Registry: reg,
			})
			if err != nil {
				return err
			}
			mux.HandleFunc("GET /v1/domains", domainsHandler(a.Domains))
			g, gctx := errgroup.WithContext(ctx)
			g.Go(func() error { return srv.Serve(gctx) })
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
	f.DurationVar(&leaseTTL, "lease-ttl", 10*time.Second, "node lease TTL: how long the node outlives a silent agent")
	f.DurationVar(&resync, "resync", 30*time.Second, "period of the full libvirt/etcd comparison")
	f.IntVar(&cpus, "cpus", 0, "CPUs to offer (default: what libvirt reports)")
	f.StringVar(&memory, "memory", "", "memory to offer, e.g. 64GiB (default: what libvirt reports)")
	f.StringVar(&reserved, "reserved-memory", "", "memory kept for the host, never given to VMs, e.g. 2GiB")
	storage.add(f, "herd-agent", true)
	f.StringVar(&listen, "listen", ":9480", "status endpoint (metrics, /v1/domains)")
	f.StringVar(&image, "image", "", "hypervisor image version this node booted")
	f.StringVar(&addrMgmt, "address-management", "", "management address to advertise")
	f.StringVar(&addrStore, "address-storage", "", "storage network address to advertise")
	f.StringVar(&addrMig, "address-migration", "", "live-migration address to advertise")
	f.StringVar(&domType, "domain-type", "auto", "libvirt domain type: auto (kvm if /dev/kvm opens, else qemu), kvm, or qemu (TCG)")
	f.StringVar(&bootDir, "boot-dir", "/var/lib/herd/boot", "the only directory direct kernel boot files (a spec's boot.kernel, boot.initrd) may come from, symlinks resolved; empty: none")
	f.StringVar(&console, "console-dir", "/var/log/herd/console", "serial console logs, <dir>/<vm>.log (same path on every node to keep one log across migrations)")
	f.StringVar(&migURI, "migration-uri", "", "libvirt URI other nodes migrate to, e.g. qemu+tcp://10.0.0.17/system (empty: this node takes no live migrations)")
	f.IntVar(&maxMig, "max-migrations", 2, "concurrent outgoing live migrations")
	f.DurationVar(&shutdownT, "shutdown-timeout", time.Minute, "how long a guest gets to power off through ACPI before it is destroyed")
	f.DurationVar(&migT, "migration-timeout", 10*time.Minute, "abort a live migration that takes longer")
	jf.add(f)
	f.StringVar(&rebootCmd, "reboot-command", "systemctl reboot", "what a rollout's reboot command runs (sh -c); the netboot image uses 'reboot -f'")
	f.BoolVar(&migTLS, "migrate-tls", false, "encrypt live migrations with TLS (VIR_MIGRATE_TLS): qemu.conf must set migrate_tls_x509_cert_dir on every node (docs/security.md)")
	f.StringVar(&migTLSDir, "migrate-tls-dir", "/etc/pki/qemu", "with --join and --migrate-tls: where to write this node's migration certificate (qemu.conf's migrate_tls_x509_cert_dir)")
	return cmd
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
