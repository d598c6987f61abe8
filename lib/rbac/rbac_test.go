package rbac

import (
	"context"
	"crypto/tls"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/pki"
)

var space = keys.MustSpace("/herd")

// TestPermissionsEnforcedByEtcd: with TLS and auth on, etcd itself refuses a node's credentials
// anywhere but its own keys, a viewer any write, and a client without a certificate altogether.
func TestPermissionsEnforcedByEtcd(t *testing.T) {
	m := etcdtest.StartTLS(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	root := m.ClientAs(t, Root)
	// Some keys exist before auth is on.
	for _, k := range []string{space.VMSpec("web1"), space.VMPlacement("web1"), space.Hardware("b")} {
		if _, err := root.Put(ctx, k, "{}"); err != nil {
			t.Fatal(err)
		}
	}
	if err := Apply(ctx, root, space); err != nil {
		t.Fatal(err)
	}
	if err := Apply(ctx, root, space); err != nil {
		t.Fatalf("Apply is not idempotent: %v", err)
	}
	for _, hw := range []string{"a", "b"} {
		if _, err := EnsureNode(ctx, root, space, hw); err != nil {
			t.Fatal(err)
		}
	}
	if err := EnsureUser(ctx, root, "viewer1", Viewer); err != nil {
		t.Fatal(err)
	}
	if err := EnsureUser(ctx, root, "op1", Operator); err != nil {
		t.Fatal(err)
	}

	denied := func(who string, c *clientv3.Client, key string) {
		t.Helper()
		_, err := c.Put(ctx, key, "{}")
		if !errors.Is(err, rpctypes.ErrPermissionDenied) {
			t.Errorf("%s writing %s: %v, want permission denied", who, key, err)
		}
	}
	allowed := func(who string, c *clientv3.Client, key string) {
		t.Helper()
		if _, err := c.Put(ctx, key, "{}"); err != nil {
			t.Errorf("%s writing %s: %v", who, key, err)
		}
	}
	nodeA := m.ClientAs(t, NodeUser("a"))
	allowed("node a", nodeA, space.Node("a"))
	allowed("node a", nodeA, space.Status("a", "web1"))
	denied("node a", nodeA, space.Status("b", "web1"))
	denied("node a", nodeA, space.Node("b"))
	denied("node a", nodeA, space.VMSpec("web1"))
	denied("node a", nodeA, space.VMPlacement("web1"))
	denied("node a", nodeA, space.Hardware("b"))
	denied("node a", nodeA, space.Assign("a", "web1"))
	// A status write guarded by the node's own assignment works; by another node's, it is refused.
	if _, err := nodeA.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(space.Assign("a", "x")), "=", 0)).
		Then(clientv3.OpPut(space.Status("a", "x"), "{}")).Commit(); err != nil {
		t.Errorf("guarded status write: %v", err)
	}
	if _, err := nodeA.Get(ctx, space.AssignPrefix("b"), clientv3.WithPrefix()); !errors.Is(err, rpctypes.ErrPermissionDenied) {
		t.Errorf("node a reading node b's assignments: %v", err)
	}

	viewer := m.ClientAs(t, "viewer1")
	denied("viewer", viewer, space.VMSpec("web2"))
	if _, err := viewer.Get(ctx, space.All(), clientv3.WithPrefix()); err != nil {
		t.Errorf("viewer reading: %v", err)
	}
	op := m.ClientAs(t, "op1")
	allowed("operator", op, space.VMSpec("web2"))
	allowed("operator", op, space.Hardware("c"))
	unknown := m.ClientAs(t, "nobody")
	denied("a certified user without a role", unknown, space.VMSpec("web3"))

	// No certificate at all: the TLS handshake fails.
	pool, _ := pki.ClientTLS(filepath.Join(m.Dir, pki.CACert), "", "")
	bare, err := clientv3.New(clientv3.Config{Endpoints: m.Endpoints, TLS: &tls.Config{RootCAs: pool.RootCAs}, DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err == nil {
		defer bare.Close()
		sctx, scancel := context.WithTimeout(ctx, 3*time.Second)
		_, err = bare.Get(sctx, "x")
		scancel()
	}
	if err == nil {
		t.Fatal("a client without a certificate was served")
	}
}
