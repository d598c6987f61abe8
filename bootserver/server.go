package bootserver

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/net/netutil"
	"golang.org/x/sync/errgroup"

	"github.com/herdhq/herd/bootserver/dhcp"
	"github.com/herdhq/herd/bootserver/httpboot"
	"github.com/herdhq/herd/bootserver/tftp"
	"github.com/herdhq/herd/lib/images"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/pki"
)

// Config of one bootserver replica. Bootservers are stateless: any number can run, everything they
// share lives in etcd.
type Config struct {
	Client *clientv3.Client
	// EtcdUser is the etcd user Client authenticates as, recorded in events.
	EtcdUser string
	Space    keys.Space
	Name     string
	// Discovery bounds what unknown machines cost etcd.
	Discovery DiscoveryLimits

	// HTTPListen serves scripts and images; Advertise is the base URL nodes reach it at.
	HTTPListen string
	Advertise  string
	// TFTPListen serves the iPXE binaries of IPXEDir; empty disables TFTP.
	TFTPListen string
	IPXEDir    string
	TFTPLimits tftp.Limits
	ImageDir   string
	// ImageRehash: every verified image is hashed again at least this often (default 1 h).
	ImageRehash time.Duration

	// Interface enables DHCP on that interface; empty disables DHCP.
	Interface string
	DHCP      dhcp.Config
	// RangeStart and RangeEnd bound full mode's address pool; NewClientRate bounds how many new
	// clients per second take an address from it (default 50).
	RangeStart, RangeEnd net.IP
	NewClientRate        float64

	// NodeParams are kernel parameters every node gets: herd.endpoints=..., herd.syslog=...
	NodeParams []string
	Retry      time.Duration

	// Join lists the coordinators' join endpoints; set, every boot script carries a one-time join
	// token (herd.token=), the endpoints (herd.join=) and the CA fingerprint CAHash (herd.ca=).
	Join     []string
	CAHash   string
	TokenTTL time.Duration

	// HTTPTimeouts bound what one HTTP client may hold (zero fields: defaults).
	HTTPTimeouts HTTPTimeouts
	// HTTPSListen also serves scripts and images over TLS with TLSCert and TLSKey, so the token
	// does not cross the network in clear (iPXE must trust the cluster CA: docs/security.md).
	HTTPSListen     string
	TLSCert, TLSKey string

	Log      hclog.Logger
	Registry prometheus.Registerer
}

// Run serves until ctx ends.
func Run(ctx context.Context, cfg Config) error {
	if cfg.Log == nil {
		cfg.Log = hclog.NewNullLogger()
	}
	if cfg.Registry == nil {
		cfg.Registry = prometheus.NewRegistry()
	}
	if cfg.Advertise == "" {
		return errors.New("bootserver: the advertised URL (--advertise) is required: nodes must reach it")
	}
	cfg.Advertise = strings.TrimRight(cfg.Advertise, "/")
	cfg.HTTPTimeouts.defaults()
	reqs := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "herd_bootserver_requests_total", Help: "Boot requests by stage (dhcp, tftp, chain, script, image) and outcome.",
	}, []string{"stage", "outcome"})
	cfg.Registry.MustRegister(reqs)

	store := images.NewStore(cfg.ImageDir)
	if len(cfg.Join) > 0 && cfg.CAHash == "" {
		return errors.New("bootserver: join endpoints without a CA fingerprint: nodes could not trust them (--cacert or --node-ca-hash)")
	}
	b := newBackend(cfg.Client, cfg.Space, backendConfig{name: cfg.Name, user: cfg.EtcdUser, store: store, tokenTTL: cfg.TokenTTL, rehash: cfg.ImageRehash,
		limits: cfg.Discovery, log: cfg.Log, registry: cfg.Registry})
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { b.run(gctx); return nil })
	if err := b.synced(gctx); err != nil {
		return err
	}
	g.Go(func() error { b.advertise(gctx, cfg.Advertise); return nil })

	// HTTP.
	mux := http.NewServeMux()
	httpboot.New(httpboot.Config{Base: cfg.Advertise, Params: cfg.NodeParams, Retry: cfg.Retry, Join: cfg.Join, CAHash: cfg.CAHash}, b, store, cfg.Log, reqs).Register(mux)
	hl, err := net.Listen("tcp", cfg.HTTPListen)
	if err != nil {
		return fmt.Errorf("bootserver http: %w", err)
	}
	srv := newHTTPServer(mux, cfg.HTTPTimeouts)
	hl = netutil.LimitListener(hl, cfg.HTTPTimeouts.MaxConns)
	g.Go(func() error {
		<-gctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return srv.Shutdown(sctx)
	})
	g.Go(func() error {
		if err := srv.Serve(hl); !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	})
	cfg.Log.Info("http serving", "listen", hl.Addr(), "advertise", cfg.Advertise)
	if cfg.HTTPSListen != "" {
		kp, err := pki.NewKeyPair(cfg.TLSCert, cfg.TLSKey)
		if err != nil {
			return fmt.Errorf("bootserver https: %w", err)
		}
		tl, err := net.Listen("tcp", cfg.HTTPSListen)
		if err != nil {
			return fmt.Errorf("bootserver https: %w", err)
		}
		tsrv := newHTTPServer(mux, cfg.HTTPTimeouts)
		tsrv.TLSConfig = &tls.Config{
			MinVersion:     tls.VersionTLS12,
			GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return kp.Get() },
		}
		tl = netutil.LimitListener(tl, cfg.HTTPTimeouts.MaxConns)
		g.Go(func() error {
			<-gctx.Done()
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			return tsrv.Shutdown(sctx)
		})
		g.Go(func() error {
			if err := tsrv.ServeTLS(tl, "", ""); !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		})
		cfg.Log.Info("https serving", "listen", tl.Addr())
	}

	// TFTP.
	checkIPXEBinaries(cfg)
	fetched := tftp.NewFetched(10 * time.Minute)
	if cfg.TFTPListen != "" {
		conn, err := net.ListenPacket("udp4", cfg.TFTPListen)
		if err != nil {
			return fmt.Errorf("bootserver tftp: %w", err)
		}
		ts := tftp.New(cfg.IPXEDir, fetched, cfg.TFTPLimits, cfg.Log, reqs)
		g.Go(func() error { <-gctx.Done(); ts.Shutdown(); return nil })
		g.Go(func() error { return ts.Serve(conn) })
		cfg.Log.Info("tftp serving", "listen", conn.LocalAddr(), "dir", cfg.IPXEDir)
	}

	// DHCP.
	if cfg.Interface != "" {
		dc := cfg.DHCP
		dc.ScriptURL = cfg.Advertise + "/boot.ipxe"
		var ls dhcp.Leases
		if dc.Mode == dhcp.Full {
			if cfg.NewClientRate == 0 {
				cfg.NewClientRate = 50
			}
			l, err := newLeases(cfg.Client, cfg.Space, cfg.Name, cfg.RangeStart, cfg.RangeEnd, dc.LeaseTime, cfg.NewClientRate, cfg.Log.Named("dhcp"))
			if err != nil {
				return err
			}
			g.Go(func() error { l.run(gctx); return nil })
			if err := l.synced(gctx); err != nil {
				return err
			}
			ls = l
		}
		h, err := dhcp.NewHandler(dc, ls, fetched)
		if err != nil {
			return err
		}
		// Port 4011 in both modes: PXE firmware asks there for the boot file when an offer sends it to
		// boot server discovery.
		for _, port := range []int{67, 4011} {
			conn, err := dhcp.Listen(cfg.Interface, port)
			if err != nil {
				return err
			}
			s := &dhcp.Server{Handler: h, Log: cfg.Log.Named("dhcp"), Reqs: reqs}
			g.Go(func() error { return s.Serve(gctx, conn, port) })
		}
		cfg.Log.Info("dhcp serving", "interface", cfg.Interface, "mode", dc.Mode, "server_ip", dc.ServerIP.String(), "chainload", dc.Chainload)
	}
	return g.Wait()
}

// checkIPXEBinaries says, once at start, which firmware families cannot boot because their iPXE
// binary is not in the iPXE directory (Debian's ipxe package has no arm64 build, for one).
func checkIPXEBinaries(cfg Config) {
	if cfg.TFTPListen == "" {
		return
	}
	for _, b := range []struct{ file, def, firmware, flag string }{
		{cfg.DHCP.BIOSFile, dhcp.DefaultBIOSFile, "legacy BIOS", "--ipxe-bios"},
		{cfg.DHCP.EFIx64File, dhcp.DefaultEFIx64File, "x86-64 UEFI", "--ipxe-efi"},
		{cfg.DHCP.EFIArm64File, dhcp.DefaultEFIArm64File, "arm64 UEFI", "--ipxe-efi-arm64"},
	} {
		f := b.file
		if f == "" {
			f = b.def
		}
		if _, err := os.Stat(filepath.Join(cfg.IPXEDir, f)); err != nil {
			cfg.Log.Warn("iPXE binary missing: "+b.firmware+" machines cannot PXE-boot from this server until it is there (or "+b.flag+" names another)",
				"file", filepath.Join(cfg.IPXEDir, f))
		}
	}
}

// HTTPTimeouts bound the HTTP(S) server: a client that opens connections and says nothing, or
// reads nothing, must not hold them.
type HTTPTimeouts struct {
	// ReadHeader bounds the wait for a request's headers (default 10 s); Idle a kept-alive
	// connection without a request (default 30 s); Write a script answer (default 30 s; image
	// files extend it by their size, at 1 MB/s, see httpboot).
	ReadHeader, Idle, Write time.Duration
	// MaxConns caps connections open at once (default 1024).
	MaxConns int
}

func (t *HTTPTimeouts) defaults() {
	if t.ReadHeader == 0 {
		t.ReadHeader = 10 * time.Second
	}
	if t.Idle == 0 {
		t.Idle = 30 * time.Second
	}
	if t.Write == 0 {
		t.Write = 30 * time.Second
	}
	if t.MaxConns == 0 {
		t.MaxConns = 1024
	}
}

func newHTTPServer(h http.Handler, t HTTPTimeouts) *http.Server {
	t.defaults()
	return &http.Server{Handler: h, ReadHeaderTimeout: t.ReadHeader, ReadTimeout: t.ReadHeader, IdleTimeout: t.Idle,
		WriteTimeout: t.Write, MaxHeaderBytes: 16 << 10}
}
