// Package etcdtest starts a real, embedded etcd member for a test and stops it when the test ends.
package etcdtest

import (
	"bufio"
	"context"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/herdhq/herd/lib/etcdembed"
	"github.com/herdhq/herd/lib/pki"
)

// Start runs a single-member etcd on free loopback ports in t.TempDir() and returns its client
// endpoints. The member is closed by t.Cleanup, also when the test fails.
func Start(t testing.TB) *etcdembed.Server {
	t.Helper()
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		cu, err1 := etcdembed.FreeLoopbackURL()
		pu, err2 := etcdembed.FreeLoopbackURL()
		mu, err3 := etcdembed.FreeLoopbackURL()
		if err1 != nil || err2 != nil || err3 != nil {
			t.Fatalf("free ports: %v %v %v", err1, err2, err3)
		}
		s, err := etcdembed.Start(context.Background(), etcdembed.Config{
			Name:          "test",
			Dir:           t.TempDir(),
			Clients:       []string{cu},
			Peers:         []string{pu},
			Metrics:       []string{mu},
			UnsafeNoFsync: true,
		}, 30*time.Second)
		if err != nil {
			lastErr = err // most likely a port taken between pick and bind; try others
			continue
		}
		t.Cleanup(s.Close)
		return s
	}
	t.Fatalf("embedded etcd: %v", lastErr)
	return nil
}

// Client starts etcd (see Start) and returns a client to it, closed at cleanup.
func Client(t testing.TB) *clientv3.Client {
	t.Helper()
	s := Start(t)
	return NewClient(t, s.Endpoints)
}

// NewClient connects to endpoints; the client is closed at cleanup.
func NewClient(t testing.TB, endpoints []string) *clientv3.Client {
	t.Helper()
	c, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TLSMember is an embedded etcd serving TLS with client-certificate authentication, with its CA.
type TLSMember struct {
	*etcdembed.Server
	CA  *pki.CA
	Dir string
}

// StartTLS runs an etcd member that requires client certificates from a fresh CA in a temporary
// directory. Auth (users and roles) is not enabled yet: the caller applies RBAC as root.
func StartTLS(t testing.TB) *TLSMember {
	t.Helper()
	dir := t.TempDir()
	ca, err := pki.InitCA(dir, "test CA", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	crt, key, err := ca.IssueFiles(dir, "server", "etcd-server", pki.RoleEtcd, []string{"127.0.0.1", "localhost"}, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cu, _ := etcdembed.FreeLoopbackURL()
	pu, _ := etcdembed.FreeLoopbackURL()
	s, err := etcdembed.Start(context.Background(), etcdembed.Config{
		Name: "tls", Dir: filepath.Join(dir, "etcd"),
		Clients: []string{strings.Replace(cu, "http://", "https://", 1)}, Peers: []string{pu},
		UnsafeNoFsync: true, CertFile: crt, KeyFile: key, TrustedCAFile: filepath.Join(dir, pki.CACert),
	}, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return &TLSMember{Server: s, CA: ca, Dir: dir}
}

// ClientAs connects as the etcd user cn (a certificate issued on the spot); closed at cleanup.
func (m *TLSMember) ClientAs(t testing.TB, cn string) *clientv3.Client {
	t.Helper()
	role := pki.RoleOperator
	if strings.HasPrefix(cn, "herd-node:") {
		role = pki.RoleNode
	}
	crt, key, err := m.CA.IssueFiles(m.Dir, strings.NewReplacer(":", "_", "/", "_").Replace(cn), cn, role, nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	tlsCfg, err := pki.ClientTLS(filepath.Join(m.Dir, pki.CACert), crt, key, pki.EtcdServer)
	if err != nil {
		t.Fatal(err)
	}
	c, err := clientv3.New(clientv3.Config{Endpoints: m.Endpoints, TLS: tlsCfg, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// Metric sums the samples of one metric etcd exports at endpoint/metrics (plain HTTP).
func Metric(t testing.TB, endpoint, name string) float64 {
	t.Helper()
	resp, err := http.Get(strings.TrimRight(endpoint, "/") + "/metrics")
	if err != nil {
		t.Fatalf("etcd metrics: %v", err)
	}
	defer resp.Body.Close()
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	found := false
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name) || (len(line) > len(name) && line[len(name)] != ' ' && line[len(name)] != '{') {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			t.Fatalf("etcd metric %q: %v", line, err)
		}
		sum += v
		found = true
	}
	if !found {
		t.Fatalf("etcd exports no %s", name)
	}
	return sum
}
