package join

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
	"github.com/herdhq/herd/lib/join"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/pki"
	"github.com/herdhq/herd/lib/rbac"
)

var space = keys.MustSpace("/herd")

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type rig struct {
	t    *testing.T
	m    *etcdtest.TLSMember
	root *clientv3.Client
	url  string
	logs *syncBuffer
	now  time.Time
	mu   sync.Mutex
}

// newRig: etcd with TLS and auth on, RBAC applied, hardware a and b enrolled, and a join endpoint.
func newRig(t *testing.T) *rig {
	r := &rig{t: t, m: etcdtest.StartTLS(t), logs: &syncBuffer{}, now: time.Now()}
	ctx := context.Background()
	r.root = r.m.ClientAs(t, rbac.Root)
	if err := rbac.Apply(ctx, r.root, space); err != nil {
		t.Fatal(err)
	}
	for _, hw := range []string{"52:54:00:00:00:0a", "52:54:00:00:00:0b"} {
		if _, err := r.root.Put(ctx, space.Hardware(hw), `{"v":1}`); err != nil {
			t.Fatal(err)
		}
	}
	crt, key, err := r.m.CA.IssueFiles(r.m.Dir, "coord", "coord", pki.RoleCoordinator, []string{"127.0.0.1"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	s := New(Config{Client: r.root, Space: space, CA: r.m.CA, CertTTL: time.Hour,
		Ceph: func() (*join.CephCredentials, error) {
			return &join.CephCredentials{User: "herd-node", Key: "AQBsecret==", Conf: "[global]\nmon_host = 10.0.0.1\n"}, nil
		},
		Log: hclog.New(&hclog.LoggerOptions{Output: r.logs, Level: hclog.Info}),
		Now: func() time.Time { r.mu.Lock(); defer r.mu.Unlock(); return r.now }})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(sctx, ln, crt, key) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	r.url = "https://" + ln.Addr().String()
	return r
}

func (r *rig) mint(hwid string) string {
	tok, err := join.Mint(context.Background(), r.root, space, join.Grant{HWID: hwid, TTL: time.Minute, IssuedBy: "test"})
	if err != nil {
		r.t.Fatal(err)
	}
	return tok
}

func (r *rig) client(hwid string) *join.Client {
	return &join.Client{URLs: []string{r.url}, CAHash: pki.Fingerprint(r.m.CA.Cert), Dir: r.t.TempDir(), HWID: hwid, Log: hclog.NewNullLogger()}
}

func (r *rig) etcdAs(c *join.Client) *clientv3.Client {
	tlsCfg, err := pki.ClientTLS(c.CAPath(), c.CertPath(), c.KeyPath(), pki.EtcdServer)
	if err != nil {
		r.t.Fatal(err)
	}
	ec, err := clientv3.New(clientv3.Config{Endpoints: r.m.Endpoints, TLS: tlsCfg, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		r.t.Fatal(err)
	}
	r.t.Cleanup(func() { ec.Close() })
	return ec
}

func refused(t *testing.T, err error, want string) {
	t.Helper()
	var rf *join.RefusedError
	if !errors.As(err, &rf) || !strings.Contains(rf.Message, want) {
		t.Fatalf("got %v, want a refusal saying %q", err, want)
	}
}

// TestJoinTokenOnce: a token yields credentials once; the node's certificate then acts as its own
// etcd user and nothing else; reuse is refused with a clear message in the coordinator's log.
func TestJoinTokenOnce(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	a := r.client("52:54:00:00:00:0a")
	tok := r.mint(a.HWID)
	start := time.Now()
	if err := a.Ensure(ctx, tok); err != nil {
		t.Fatal(err)
	}
	t.Logf("join (CA fetch, CSR, token check, signing, etcd user, consume) took %s", time.Since(start).Round(time.Millisecond))
	if pki.CommonName(a.CertPath()) != "herd-node:52:54:00:00:00:0a" {
		t.Fatalf("certificate CN %q", pki.CommonName(a.CertPath()))
	}
	if a.CephKeyring() == "" || a.CephConf() == "" {
		t.Fatal("ceph credentials were not written")
	}
	ec := r.etcdAs(a)
	if _, err := ec.Put(ctx, space.Node(a.HWID), "{}"); err != nil {
		t.Fatalf("node writing its own key: %v", err)
	}
	if _, err := ec.Put(ctx, space.Node("52:54:00:00:00:0b"), "{}"); !errors.Is(err, rpctypes.ErrPermissionDenied) {
		t.Fatalf("node writing another node's key: %v", err)
	}
	if n, _ := r.root.Get(ctx, space.JoinTokenPrefix(), clientv3.WithPrefix(), clientv3.WithCountOnly()); n.Count != 0 {
		t.Fatalf("%d tokens left after the join", n.Count)
	}

	// Reuse: another machine (or a replay) with the same token.
	b := r.client(a.HWID)
	refused(t, b.Join(ctx, tok), "unknown, already used or expired")
	if !strings.Contains(r.logs.String(), "join refused") {
		t.Fatalf("no log of the refusal:\n%s", r.logs)
	}

	// A restart without a reboot keeps the certificate, without a token.
	if err := a.Ensure(ctx, ""); err != nil {
		t.Fatalf("restart with existing credentials: %v", err)
	}
	// Renewal works with the certificate alone and yields a fresh one.
	before := pki.CommonName(a.CertPath())
	if err := a.Renew(ctx); err != nil {
		t.Fatalf("renew: %v", err)
	}
	if pki.CommonName(a.CertPath()) != before {
		t.Fatal("renewal changed the user")
	}
	// Revocation: without its hardware record, the node cannot renew.
	if _, err := r.root.Delete(ctx, space.Hardware(a.HWID)); err != nil {
		t.Fatal(err)
	}
	refused(t, a.Renew(ctx), "not enrolled")
}

// TestJoinRefusals: expiry, the wrong hwid, unknown hardware, no token, and a CA that does not
// match the pin are all refused, and leave no credentials behind.
func TestJoinRefusals(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()

	// Wrong hwid: a token minted for a, used by b. The token survives for a.
	tokA := r.mint("52:54:00:00:00:0a")
	b := r.client("52:54:00:00:00:0b")
	refused(t, b.Join(ctx, tokA), "minted for 52:54:00:00:00:0a")

	// A token the boot server bound to a boot NIC: spent only by a join naming that MAC. Enrolled
	// hardware is needed for the good join: 0a is (the rig enrols it).
	bound, err := join.Mint(ctx, r.root, space, join.Grant{HWID: "52:54:00:00:00:0a", MAC: "52:54:00:00:00:0a", TTL: time.Minute, IssuedBy: "test"})
	if err != nil {
		t.Fatal(err)
	}
	thief := r.client("52:54:00:00:00:0a")
	thief.MAC = "52:54:00:00:00:66"
	refused(t, thief.Join(ctx, bound), "was served to the machine with boot NIC 52:54:00:00:00:0a")
	thief.MAC = ""
	refused(t, thief.Join(ctx, bound), "was served to the machine with boot NIC")
	owner := r.client("52:54:00:00:00:0a")
	owner.MAC = "52-54-00-00-00-0A"
	if err := owner.Join(ctx, bound); err != nil {
		t.Fatalf("the machine the token was served to: %v", err)
	}

	// Unknown hardware.
	c := r.client("52:54:00:00:00:0c")
	refused(t, c.Join(ctx, r.mint(c.HWID)), "not enrolled")

	// No token and no certificate.
	if err := c.Ensure(ctx, ""); err == nil || !strings.Contains(err.Error(), "no join token") {
		t.Fatalf("ensure without a token: %v", err)
	}

	// A CA that does not match the pin: the node refuses to talk, whatever the endpoint says.
	bad := r.client("52:54:00:00:00:0a")
	bad.CAHash = "sha256:" + strings.Repeat("0", 64)
	if err := bad.Join(ctx, tokA); err == nil || !strings.Contains(err.Error(), "fingerprint") {
		t.Fatalf("join with the wrong pin: %v", err)
	}

	// Expiry: the endpoint's clock passes the token's end (etcd's lease would remove it soon after).
	r.mu.Lock()
	r.now = r.now.Add(2 * time.Minute)
	r.mu.Unlock()
	a := r.client("52:54:00:00:00:0a")
	refused(t, a.Join(ctx, tokA), "expired")
	for _, cl := range []*join.Client{b, c, bad, a} {
		if _, err := os.Stat(cl.CertPath()); !os.IsNotExist(err) {
			t.Fatalf("%s got a certificate (%v)", cl.HWID, err)
		}
	}
	for _, want := range []string{"minted for", "not enrolled", "expired"} {
		if !strings.Contains(r.logs.String(), want) {
			t.Fatalf("log does not say %q:\n%s", want, r.logs)
		}
	}
}

// TestNodeCertificatesCannotServe is the impersonation attack: node A's certificate (and later its
// migration certificate) serves a fake join endpoint on the very address the real one had. A real
// agent of node B, pinned to the cluster CA, refuses the TLS handshake, so its one-time token never
// leaves it, and the token still works at the real endpoint. A node certificate is client-only and
// names no address, whatever its request asked for; a migration certificate names only the address
// the leader vouched for.
func TestNodeCertificatesCannotServe(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	a := r.client("52:54:00:00:00:0a")
	if err := a.Ensure(ctx, r.mint(a.HWID)); err != nil {
		t.Fatal(err)
	}
	cb, err := os.ReadFile(a.CertPath())
	if err != nil {
		t.Fatal(err)
	}
	cert, err := pki.ParseCert(cb)
	if err != nil {
		t.Fatal(err)
	}
	if len(cert.IPAddresses)+len(cert.DNSNames) > 0 || pki.RoleOf(cert) != pki.RoleNode {
		t.Fatalf("node certificate names %v %v, role %q", cert.IPAddresses, cert.DNSNames, pki.RoleOf(cert))
	}
	for _, u := range cert.ExtKeyUsage {
		if u != x509.ExtKeyUsageClientAuth {
			t.Fatalf("node certificate has usage %v besides client auth", u)
		}
	}

	// The leader vouches for A's migration address; A gets a certificate naming that one only.
	a.QEMUDir = t.TempDir()
	refused(t, a.MigrationCert(ctx), "no migration address is vouched")
	if _, err := r.root.Put(ctx, space.NodeState(a.HWID), `{"migration_ip":"127.0.0.1"}`); err != nil {
		t.Fatal(err)
	}
	if err := a.MigrationCert(ctx); err != nil {
		t.Fatal(err)
	}
	mb, _ := os.ReadFile(filepath.Join(a.QEMUDir, "server-cert.pem"))
	mcert, err := pki.ParseCert(mb)
	if err != nil {
		t.Fatal(err)
	}
	if len(mcert.IPAddresses) != 1 || mcert.IPAddresses[0].String() != "127.0.0.1" || pki.RoleOf(mcert) != pki.RoleMigration {
		t.Fatalf("migration certificate names %v, role %q", mcert.IPAddresses, pki.RoleOf(mcert))
	}

	tokB := r.mint("52:54:00:00:00:0b")
	for _, stolen := range []struct{ what, crt, key string }{
		{"node certificate", a.CertPath(), a.KeyPath()},
		{"migration certificate", filepath.Join(a.QEMUDir, "server-cert.pem"), filepath.Join(a.QEMUDir, "server-key.pem")},
	} {
		pair, err := tls.LoadX509KeyPair(stolen.crt, stolen.key)
		if err != nil {
			t.Fatal(err)
		}
		var got atomic.Int32
		fake := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
			if req.URL.Path == join.PathCA {
				_, _ = w.Write(r.m.CA.CertPEM) // the real CA: the pin matches
				return
			}
			got.Add(1) // a join request: the token would be the attacker's now
			w.WriteHeader(http.StatusForbidden)
		}))
		fake.TLS = &tls.Config{Certificates: []tls.Certificate{pair}}
		fake.StartTLS()
		b := r.client("52:54:00:00:00:0b")
		b.URLs = []string{fake.URL}
		err = b.Join(ctx, tokB)
		fake.Close()
		if err == nil || got.Load() != 0 {
			t.Fatalf("%s served a join endpoint: err %v, %d join requests reached it", stolen.what, err, got.Load())
		}
		t.Logf("agent refused a fake join endpoint with a %s: %v", stolen.what, err)
	}
	b := r.client("52:54:00:00:00:0b")
	if err := b.Ensure(ctx, tokB); err != nil {
		t.Fatalf("the token does not work at the real endpoint after the attempts: %v", err)
	}
}
