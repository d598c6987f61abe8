// Package etcdembed runs an etcd member inside a herd process, for `herd dev`, `herd etcd` and tests.
// Production clusters run etcd as its own service; this package exists so that a laptop and a test
// need nothing but the herd binary.
package etcdembed

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

// Config describes one member. The zero value of every optional field gives a single-member cluster.
type Config struct {
	Name    string
	Dir     string
	Clients []string // e.g. http://127.0.0.1:2379
	Peers   []string // e.g. http://127.0.0.1:2380
	Metrics []string // optional extra listener for /metrics, e.g. http://127.0.0.1:2381
	// InitialCluster is name=peerURL,...; empty means this member alone.
	InitialCluster string
	// Existing joins a cluster that already exists (restart or replacement of a member).
	Existing bool
	// AutoCompaction keeps this much history (periodic mode); etcd's default keeps everything,
	// which a long-running dev cluster fills up.
	AutoCompaction time.Duration
	// UnsafeNoFsync trades durability for speed: for throwaway dev clusters and tests only.
	UnsafeNoFsync bool
	// LogLevel for etcd's own log, which goes to Dir/etcd.log.
	LogLevel string
	// CertFile, KeyFile and TrustedCAFile serve clients over TLS and require a client certificate
	// signed by the CA (whose CN is the etcd user once auth is on). Client URLs are then https.
	CertFile, KeyFile, TrustedCAFile string
	// MaxRequestBytes bounds one request (a value, a transaction); 0 means DefaultMaxRequestBytes.
	MaxRequestBytes uint
	// QuotaBackendBytes is the size at which etcd refuses writes; 0 means DefaultQuotaBackendBytes.
	QuotaBackendBytes int64
}

// Limits herd runs etcd with (docs/security.md says how to set them on an etcd run by hand). No
// herd value comes near MaxRequestBytes, so a writer that fills it is refused by etcd itself; the
// quota is etcd's own recommended maximum, so that a flood of small writes is refused long
// before the disk fills.
const (
	DefaultMaxRequestBytes   = 1 << 20 // 1 MiB (etcd's own default is 1.5 MiB)
	DefaultQuotaBackendBytes = 8 << 30 // 8 GiB
)

// Server is a running member.
type Server struct {
	etcd *embed.Etcd
	// Endpoints are the client URLs, ready for clientv3.
	Endpoints []string
}

func urls(ss []string) ([]url.URL, error) {
	out := make([]url.URL, 0, len(ss))
	for _, s := range ss {
		u, err := url.Parse(s)
		if err != nil {
			return nil, fmt.Errorf("url %q: %w", s, err)
		}
		out = append(out, *u)
	}
	return out, nil
}

// Start starts the member and waits until it serves clients, timeout passes or ctx ends. A member
// of a multi-member cluster is ready only once a quorum is up.
func Start(ctx context.Context, c Config, timeout time.Duration) (*Server, error) {
	if c.Name == "" {
		c.Name = "herd-dev"
	}
	if c.Dir == "" {
		return nil, fmt.Errorf("etcd: a data directory is required")
	}
	if err := os.MkdirAll(c.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("etcd data dir: %w", err)
	}
	cfg := embed.NewConfig()
	cfg.Name = c.Name
	cfg.Dir = MemberDir(c.Dir)
	var err error
	if cfg.ListenClientUrls, err = urls(c.Clients); err != nil {
		return nil, err
	}
	cfg.AdvertiseClientUrls = cfg.ListenClientUrls
	if len(c.Peers) > 0 {
		if cfg.ListenPeerUrls, err = urls(c.Peers); err != nil {
			return nil, err
		}
		cfg.AdvertisePeerUrls = cfg.ListenPeerUrls
	}
	if len(c.Metrics) > 0 {
		if cfg.ListenMetricsUrls, err = urls(c.Metrics); err != nil {
			return nil, err
		}
	}
	if c.InitialCluster != "" {
		cfg.InitialCluster = c.InitialCluster
	} else {
		cfg.InitialCluster = cfg.InitialClusterFromName(c.Name)
	}
	// Every member of one cluster must share the token; it only keeps separate clusters apart.
	cfg.InitialClusterToken = "herd"
	if c.Existing {
		cfg.ClusterState = embed.ClusterStateFlagExisting
	}
	if c.AutoCompaction > 0 {
		cfg.AutoCompactionMode = "periodic"
		cfg.AutoCompactionRetention = c.AutoCompaction.String()
	}
	cfg.UnsafeNoFsync = c.UnsafeNoFsync
	cfg.MaxRequestBytes = c.MaxRequestBytes
	if cfg.MaxRequestBytes == 0 {
		cfg.MaxRequestBytes = DefaultMaxRequestBytes
	}
	cfg.QuotaBackendBytes = c.QuotaBackendBytes
	if cfg.QuotaBackendBytes == 0 {
		cfg.QuotaBackendBytes = DefaultQuotaBackendBytes
	}
	if c.CertFile != "" {
		for _, u := range c.Clients {
			if !strings.HasPrefix(u, "https://") {
				return nil, fmt.Errorf("client URL %s: with a certificate, client URLs must be https://", u)
			}
		}
		cfg.ClientTLSInfo.CertFile = c.CertFile
		cfg.ClientTLSInfo.KeyFile = c.KeyFile
		cfg.ClientTLSInfo.TrustedCAFile = c.TrustedCAFile
		cfg.ClientTLSInfo.ClientCertAuth = true
	}
	cfg.Logger = "zap"
	cfg.LogLevel = c.LogLevel
	if cfg.LogLevel == "" {
		cfg.LogLevel = "warn"
	}
	cfg.LogOutputs = []string{filepath.Join(c.Dir, "etcd.log")}
	// "extensive" adds per-method gRPC counters (Range, Txn, Watch) that tests use to show the
	// system's read load does not grow with the number of VMs.
	cfg.Metrics = "extensive"

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("start etcd %s: %w", c.Name, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("etcd %s failed while starting: %w", c.Name, err)
	case <-time.After(timeout):
		e.Server.Stop() // Close waits for a ready server; stop the raft loop first
		e.Close()
		return nil, fmt.Errorf("etcd %s not ready after %s (see %s)", c.Name, timeout, filepath.Join(c.Dir, "etcd.log"))
	case <-ctx.Done():
		e.Server.Stop()
		e.Close()
		return nil, ctx.Err()
	}
	s := &Server{etcd: e}
	scheme := "http://"
	if c.CertFile != "" {
		scheme = "https://"
	}
	for _, l := range e.Clients {
		s.Endpoints = append(s.Endpoints, scheme+l.Addr().String())
	}
	return s, nil
}

// Err reports a fatal error of the running member.
func (s *Server) Err() <-chan error { return s.etcd.Err() }

// Close stops the member and waits for it.
func (s *Server) Close() { s.etcd.Close() }

// FreeLoopbackURL picks a free port on 127.0.0.1 for tests. Another process may take it before
// it's used; tests that start many members take that small risk.
func FreeLoopbackURL() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return "http://" + l.Addr().String(), nil
}

// MemberDir is where etcd's own data lives inside a herd etcd data directory (the directory a
// snapshot is restored into).
func MemberDir(dir string) string { return filepath.Join(dir, "member-data") }
