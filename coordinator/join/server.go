// Package join is the coordinator's side of node bootstrap (see lib/join): an HTTPS endpoint that
// every replica serves, leader or not, because signing needs no leadership: the one-time token is
// consumed by a compare-and-delete in etcd, so two replicas cannot both honour it.
package join

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/events"
	"github.com/herdhq/herd/lib/join"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/pki"
	"github.com/herdhq/herd/lib/rbac"
)

// DefaultCertTTL is a node certificate's lifetime: short, so a node whose hardware record is removed
// loses access within a day even if nobody deletes its etcd user.
const DefaultCertTTL = 24 * time.Hour

// Config of the endpoint.
type Config struct {
	Client *clientv3.Client
	Space  keys.Space
	CA     *pki.CA
	// CertTTL is the lifetime of node certificates. Default DefaultCertTTL.
	CertTTL time.Duration
	// Ceph, if set, returns the Ceph credentials handed to nodes.
	Ceph   func() (*join.CephCredentials, error)
	Events *events.Recorder
	Log    hclog.Logger
	// Registry receives herd_join_requests_total{kind,outcome}.
	Registry prometheus.Registerer
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Server handles /v1/ca, /v1/join, /v1/renew and /v1/migration.
type Server struct {
	cfg  Config
	reqs *prometheus.CounterVec
}

// New builds the endpoint.
func New(cfg Config) *Server {
	if cfg.CertTTL == 0 {
		cfg.CertTTL = DefaultCertTTL
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	s := &Server{cfg: cfg, reqs: prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "herd_join_requests_total", Help: "Join and renewal requests by outcome.",
	}, []string{"kind", "outcome"})}
	if cfg.Registry != nil {
		cfg.Registry.MustRegister(s.reqs)
	}
	return s
}

// Handler routes the endpoint's requests.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+join.PathCA, func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/x-pem-file")
		_, _ = w.Write(s.cfg.CA.CertPEM)
	})
	mux.HandleFunc("POST "+join.PathJoin, func(w http.ResponseWriter, r *http.Request) { s.serve(w, r, "join") })
	mux.HandleFunc("POST "+join.PathRenew, func(w http.ResponseWriter, r *http.Request) { s.serve(w, r, "renew") })
	mux.HandleFunc("POST "+join.PathMigration, func(w http.ResponseWriter, r *http.Request) { s.serve(w, r, "migration") })
	return mux
}

// TLSConfig serves with the given certificate (reloaded when it changes) and verifies client
// certificates when offered: renewals authenticate with them, joins come without.
func (s *Server) TLSConfig(certFile, keyFile string) (*tls.Config, error) {
	kp, err := pki.NewKeyPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	pool, err := pki.Pool(s.caFile())
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return kp.Get() },
		ClientAuth:     tls.VerifyClientCertIfGiven,
		ClientCAs:      pool,
	}, nil
}

func (s *Server) caFile() string { return filepath.Join(s.cfg.CA.Dir, pki.CACert) }

// Serve serves HTTPS on ln until ctx ends.
func (s *Server) Serve(ctx context.Context, ln net.Listener, certFile, keyFile string) error {
	tlsCfg, err := s.TLSConfig(certFile, keyFile)
	if err != nil {
		ln.Close()
		return fmt.Errorf("join endpoint: %w", err)
	}
	srv := &http.Server{Handler: s.Handler(), TLSConfig: tlsCfg, ReadHeaderTimeout: 10 * time.Second,
		ErrorLog: s.cfg.Log.StandardLogger(&hclog.StandardLoggerOptions{ForceLevel: hclog.Debug})}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	s.cfg.Log.Info("join endpoint", "url", "https://"+ln.Addr().String())
	if err := srv.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// refusal is a request the endpoint turns down, with what the node's operator should do.
type refusal struct {
	status int
	msg    string
}

func (r *refusal) Error() string { return r.msg }

func refuse(status int, format string, args ...any) error {
	return &refusal{status: status, msg: fmt.Sprintf(format, args...)}
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request, kind string) {
	ctx, cancel := context.WithTimeout(r.Context(), 15*time.Second)
	defer cancel()
	var req join.Request
	body, err := io.ReadAll(io.LimitReader(r.Body, 64<<10))
	if err == nil {
		err = json.Unmarshal(body, &req)
	}
	var resp *join.Response
	if err != nil {
		err = refuse(http.StatusBadRequest, "bad request: %v", err)
	} else {
		switch kind {
		case "join":
			resp, err = s.join(ctx, &req)
		case "renew":
			resp, err = s.renew(ctx, r, &req)
		default:
			resp, err = s.migration(ctx, r, &req)
		}
	}
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		var rf *refusal
		status, outcome := http.StatusInternalServerError, "error"
		if errors.As(err, &rf) {
			status, outcome = rf.status, "refused"
		}
		s.reqs.WithLabelValues(kind, outcome).Inc()
		s.cfg.Log.Warn(kind+" refused", "hwid", req.HWID, "remote", r.RemoteAddr, "error", err)
		w.WriteHeader(status)
		_ = json.NewEncoder(w).Encode(join.Error{Error: err.Error()})
		return
	}
	s.reqs.WithLabelValues(kind, "ok").Inc()
	_ = json.NewEncoder(w).Encode(resp)
}

// join checks the token (it exists, so it is unused and unexpired; it names this hwid; the hardware
// is enrolled), signs the request, makes sure the node's etcd user exists, and only then consumes
// the token, so a failure on the way leaves the token usable for a retry.
func (s *Server) join(ctx context.Context, req *join.Request) (*join.Response, error) {
	hwid, err := keys.NormalizeHWID(req.HWID)
	if err != nil {
		return nil, refuse(http.StatusBadRequest, "hwid: %v", err)
	}
	if req.Token == "" {
		return nil, refuse(http.StatusBadRequest, "a join needs a token")
	}
	key := s.cfg.Space.JoinToken(join.Hash(req.Token))
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	got, err := s.cfg.Client.Get(cctx, key)
	if err != nil {
		return nil, fmt.Errorf("read join token: %w", err)
	}
	if len(got.Kvs) == 0 {
		return nil, refuse(http.StatusForbidden, "join token unknown, already used or expired: reboot the node for a new one (or `herdctl hw token %s`)", hwid)
	}
	kv := got.Kvs[0]
	tok, err := keys.Decode[keys.JoinToken](kv.Value)
	if err != nil {
		return nil, refuse(http.StatusForbidden, "join token record is unreadable: %v", err)
	}
	if tok.HWID != hwid {
		return nil, refuse(http.StatusForbidden, "join token was minted for %s, not %s", tok.HWID, hwid)
	}
	if tok.MAC != "" {
		// Bound to the boot NIC it was served to: a token read off another machine's boot script
		// (or the network) is useless elsewhere.
		mac, err := keys.NormalizeMAC(req.MAC)
		if err != nil || mac != tok.MAC {
			return nil, refuse(http.StatusForbidden, "join token for %s was served to the machine with boot NIC %s, and this join names %q (herd.mac= on the kernel command line)", hwid, tok.MAC, req.MAC)
		}
	}
	if !s.cfg.Now().Before(tok.Expires) {
		return nil, refuse(http.StatusForbidden, "join token for %s expired at %s: reboot the node for a new one", hwid, tok.Expires.Format(time.RFC3339))
	}
	if err := s.enrolled(ctx, hwid); err != nil {
		return nil, err
	}
	resp, err := s.issue(ctx, hwid, req)
	if err != nil {
		return nil, err
	}
	del, err := s.cfg.Client.Txn(cctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", kv.ModRevision)).
		Then(clientv3.OpDelete(key)).Commit()
	if err != nil {
		return nil, fmt.Errorf("consume join token: %w", err)
	}
	if !del.Succeeded {
		return nil, refuse(http.StatusForbidden, "join token for %s was used by a concurrent request", hwid)
	}
	s.cfg.Events.Record("node/"+hwid, "joined", "token from %s; certificate valid %s", tok.IssuedBy, s.cfg.CertTTL)
	s.cfg.Log.Info("node joined", "hwid", hwid, "token_from", tok.IssuedBy)
	return resp, nil
}

// caller is the node a request's verified client certificate names: a node certificate (role and
// user both), and nothing else.
func caller(r *http.Request) (string, error) {
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 {
		return "", refuse(http.StatusUnauthorized, "this needs the node's current certificate; an expired node must reboot to join again")
	}
	leaf := r.TLS.VerifiedChains[0][0]
	hwid, ok := strings.CutPrefix(leaf.Subject.CommonName, rbac.NodeUser(""))
	if !ok || pki.RoleOf(leaf) != pki.RoleNode {
		return "", refuse(http.StatusForbidden, "%s is not a node certificate", leaf.Subject.CommonName)
	}
	return hwid, nil
}

// renew re-signs for the node the verified client certificate names, while its hardware stays
// enrolled. Removing the hardware record is how a node is revoked.
func (s *Server) renew(ctx context.Context, r *http.Request, req *join.Request) (*join.Response, error) {
	hwid, err := caller(r)
	if err != nil {
		return nil, err
	}
	req.HWID = hwid
	if err := s.enrolled(ctx, hwid); err != nil {
		return nil, err
	}
	return s.issue(ctx, hwid, req)
}

// migration signs a node's live-migration certificate: QEMU serves incoming migrations with it,
// so it names an address, and only the one the leader vouches for (/herd/nodestate/<hwid>
// migration_ip: the hardware record's, or the node's own if no other node holds it). A node can
// thus never obtain a certificate for another node's address.
func (s *Server) migration(ctx context.Context, r *http.Request, req *join.Request) (*join.Response, error) {
	hwid, err := caller(r)
	if err != nil {
		return nil, err
	}
	if err := s.enrolled(ctx, hwid); err != nil {
		return nil, err
	}
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	got, err := s.cfg.Client.Get(cctx, s.cfg.Space.NodeState(hwid))
	if err != nil {
		return nil, fmt.Errorf("read node state: %w", err)
	}
	ip := ""
	if len(got.Kvs) > 0 {
		if ns, err := keys.Decode[keys.NodeState](got.Kvs[0].Value); err == nil {
			ip = ns.MigrationIP
		}
	}
	if ip == "" {
		return nil, refuse(http.StatusConflict, "no migration address is vouched for %s yet: the leader records it once the node registers with --address-migration, unless another node holds it or the hardware record's migration_ip differs ('herdctl node get %s', 'herdctl events --object node/%s')", hwid, hwid, hwid)
	}
	cert, err := s.cfg.CA.SignCSR([]byte(req.CSR), MigrationUser(hwid), pki.RoleMigration, []string{ip}, s.cfg.CertTTL)
	if err != nil {
		return nil, refuse(http.StatusBadRequest, "certificate request: %v", err)
	}
	s.cfg.Log.Info("migration certificate issued", "hwid", hwid, "address", ip)
	return &join.Response{User: MigrationUser(hwid), Cert: string(cert), CA: string(s.cfg.CA.CertPEM)}, nil
}

// MigrationUser is the common name of a node's migration certificate. It is no etcd user: the
// certificate opens nothing in etcd.
func MigrationUser(hwid string) string { return "herd-migration:" + hwid }

func (s *Server) enrolled(ctx context.Context, hwid string) error {
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	hw, err := s.cfg.Client.Get(cctx, s.cfg.Space.Hardware(hwid), clientv3.WithCountOnly())
	if err != nil {
		return fmt.Errorf("read hardware record: %w", err)
	}
	if hw.Count == 0 {
		return refuse(http.StatusForbidden, "hardware %s is not enrolled (herdctl hw add %s)", hwid, hwid)
	}
	return nil
}

// issue signs a node certificate: client-only, naming no address (whatever the request asks),
// so that it can authenticate the node and never serve as anything.
func (s *Server) issue(ctx context.Context, hwid string, req *join.Request) (*join.Response, error) {
	user := rbac.NodeUser(hwid)
	cert, err := s.cfg.CA.SignCSR([]byte(req.CSR), user, pki.RoleNode, nil, s.cfg.CertTTL)
	if err != nil {
		return nil, refuse(http.StatusBadRequest, "certificate request: %v", err)
	}
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	if _, err := rbac.EnsureNode(cctx, s.cfg.Client, s.cfg.Space, hwid); err != nil {
		return nil, fmt.Errorf("etcd user for %s: %w", hwid, err)
	}
	resp := &join.Response{User: user, Cert: string(cert), CA: string(s.cfg.CA.CertPEM)}
	if s.cfg.Ceph != nil {
		if resp.Ceph, err = s.cfg.Ceph(); err != nil {
			return nil, fmt.Errorf("ceph credentials: %w", err)
		}
	}
	return resp, nil
}
