// Package etcdutil holds the etcd patterns every herd process uses: the client flags, a list+watch
// cache (Informer) that survives compaction and leader loss, the leader-guarded transaction, and
// backoff.
package etcdutil

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"

	"github.com/spf13/pflag"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/pki"
)

// Timeout bounds every single etcd request a herd process makes; a reconcile loop never waits on
// etcd longer than this for one call.
const Timeout = 5 * time.Second

// Options are the flags every herd process and herdctl share to reach etcd.
type Options struct {
	Endpoints   []string
	Prefix      string
	DialTimeout time.Duration
	// CACert, Cert and Key enable TLS, like etcdctl's flags: the cluster CA, and a client
	// certificate whose common name is the etcd user.
	CACert, Cert, Key string
}

// AddFlags registers --endpoints and --prefix with their environment defaults.
func (o *Options) AddFlags(fs *pflag.FlagSet) {
	def := []string{"http://127.0.0.1:2379"}
	if v := strings.TrimSpace(os.Getenv("HERD_ENDPOINTS")); v != "" {
		def = strings.Split(v, ",")
	}
	prefix := keys.DefaultPrefix
	if v := strings.TrimSpace(os.Getenv("HERD_PREFIX")); v != "" {
		prefix = v
	}
	fs.StringSliceVar(&o.Endpoints, "endpoints", def, "etcd endpoints, comma-separated (env HERD_ENDPOINTS)")
	fs.StringVar(&o.Prefix, "prefix", prefix, "root of herd's keys in etcd (env HERD_PREFIX)")
	fs.DurationVar(&o.DialTimeout, "dial-timeout", 5*time.Second, "how long to wait for an etcd connection")
	fs.StringVar(&o.CACert, "cacert", os.Getenv("HERD_CACERT"), "CA certificate to verify etcd with (env HERD_CACERT)")
	fs.StringVar(&o.Cert, "cert", os.Getenv("HERD_CERT"), "client certificate; its CN is the etcd user (env HERD_CERT)")
	fs.StringVar(&o.Key, "key", os.Getenv("HERD_KEY"), "client key (env HERD_KEY)")
}

// User is the etcd user the options authenticate as: the client certificate's CN, or "" without TLS.
func (o Options) User() string {
	if o.Cert == "" {
		return ""
	}
	return pki.CommonName(o.Cert)
}

// Space returns the keyspace the --prefix flag names.
func (o Options) Space() (keys.Space, error) { return keys.NewSpace(o.Prefix) }

// New connects to etcd. It does not wait for a connection: daemons must start, log and retry while
// etcd is down, not exit.
func New(o Options) (*clientv3.Client, error) {
	eps := make([]string, 0, len(o.Endpoints))
	for _, e := range o.Endpoints {
		if e = strings.TrimSpace(e); e != "" {
			eps = append(eps, e)
		}
	}
	if len(eps) == 0 {
		return nil, fmt.Errorf("no etcd endpoints: set --endpoints or HERD_ENDPOINTS")
	}
	dt := o.DialTimeout
	if dt == 0 {
		dt = 5 * time.Second
	}
	var tlsCfg *tls.Config
	if o.CACert != "" || o.Cert != "" {
		if o.CACert == "" {
			return nil, fmt.Errorf("--cert needs --cacert")
		}
		var err error
		if tlsCfg, err = pki.ClientTLS(o.CACert, o.Cert, o.Key, pki.EtcdServer); err != nil {
			return nil, err
		}
	}
	c, err := clientv3.New(clientv3.Config{
		TLS:                  tlsCfg,
		Endpoints:            eps,
		DialTimeout:          dt,
		DialKeepAliveTime:    5 * time.Second,
		DialKeepAliveTimeout: 3 * time.Second,
		// etcd's client logs through zap; herd reports what matters itself through hclog.
		Logger: zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("etcd client for %s: %w", strings.Join(eps, ","), err)
	}
	return c, nil
}

// WithTimeout is context.WithTimeout(ctx, Timeout), for the one-call contexts that surround every
// etcd request.
func WithTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, Timeout)
}

// NoSpace says whether etcd refused a write because its database is full (the NOSPACE alarm):
// nothing herd does can fix that, an operator must (docs/operations.md, "etcd out of space").
func NoSpace(err error) bool {
	return err != nil && (errors.Is(err, rpctypes.ErrNoSpace) || strings.Contains(err.Error(), "database space exceeded"))
}

// NoSpaceHint is what daemons log beside a NOSPACE refusal.
const NoSpaceHint = "etcd is out of space (NOSPACE alarm): guests keep running, nothing is decided or reported until an operator compacts, defragments and disarms (docs/operations.md, \"etcd out of space\")"

// SpaceGauge follows whether etcd refuses this daemon's writes for want of space: set on a
// refusal (logged once per episode), cleared by the next write that succeeds.
type SpaceGauge struct {
	g    prometheus.Gauge
	log  hclog.Logger
	full atomic.Bool
}

// NewSpaceGauge registers the gauge name with reg.
func NewSpaceGauge(reg prometheus.Registerer, name string, log hclog.Logger) *SpaceGauge {
	g := prometheus.NewGauge(prometheus.GaugeOpts{Name: name,
		Help: "1 while etcd refuses this daemon's writes because its database is full (NOSPACE alarm)."})
	reg.MustRegister(g)
	return &SpaceGauge{g: g, log: log}
}

// Observe records one write's outcome.
func (s *SpaceGauge) Observe(err error) {
	switch {
	case NoSpace(err):
		if !s.full.Swap(true) {
			s.log.Error("etcd refuses writes: it is out of space", "hint", NoSpaceHint, "error", err)
		}
		s.g.Set(1)
	case err == nil:
		if s.full.Swap(false) {
			s.log.Info("etcd accepts writes again")
		}
		s.g.Set(0)
	}
}
