package rbac

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
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

var update = flag.Bool("update", false, "rewrite the permission matrix in docs/security.md")

// TestMatrixEnforcedByEtcd applies the roles to a real etcd with TLS and auth on and tries every
// cell of Matrix with every verb: read (a range read), write (a put) and delete. Each must be
// allowed exactly where the matrix says so and refused by etcd everywhere else.
func TestMatrixEnforcedByEtcd(t *testing.T) {
	m := etcdtest.StartTLS(t)
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	root := m.ClientAs(t, Root)
	// Something from an older herd to revoke: Apply converges, it does not only add.
	if _, err := root.RoleAdd(ctx, Operator); err != nil {
		t.Fatal(err)
	}
	if _, err := root.RoleGrantPermission(ctx, Operator, space.FenceRoot(), clientv3.GetPrefixRangeEnd(space.FenceRoot()), clientv3.PermissionType(clientv3.PermReadWrite)); err != nil {
		t.Fatal(err)
	}
	if err := Apply(ctx, root, space); err != nil {
		t.Fatal(err)
	}
	if err := Apply(ctx, root, space); err != nil {
		t.Fatalf("Apply is not idempotent: %v", err)
	}
	for _, hw := range []string{SampleNode, OtherNode} {
		if _, err := EnsureNode(ctx, root, space, hw); err != nil {
			t.Fatal(err)
		}
	}
	clients := map[string]*clientv3.Client{}
	for _, subj := range Subjects {
		role := SubjectRole(subj)
		user := role
		if strings.HasPrefix(subj, "node") {
			user = NodeUser(SampleNode)
		} else if err := EnsureUser(ctx, root, "matrix-"+subj, role); err != nil {
			t.Fatal(err)
		} else {
			user = "matrix-" + subj
		}
		if clients[user] == nil {
			clients[user] = m.ClientAs(t, user)
		}
		clients[subj] = clients[user]
	}
	cells := 0
	for _, a := range Matrix {
		for i, subj := range Subjects {
			c, key, want := clients[subj], a.KeyFor(space, subj), a.Access[i]
			try := func(verb string, allowed bool, op func() error) {
				t.Helper()
				cells++
				err := op()
				switch {
				case allowed && err != nil:
					t.Errorf("%s may %s %s (%s), but etcd said: %v", subj, verb, key, a.Name, err)
				case !allowed && !errors.Is(err, rpctypes.ErrPermissionDenied):
					t.Errorf("%s may not %s %s (%s), but etcd said: %v", subj, verb, key, a.Name, err)
				}
			}
			try("read", want >= Read, func() error { _, err := c.Get(ctx, key); return err })
			try("write", want == ReadWrite, func() error { _, err := c.Put(ctx, key, "{}"); return err })
			try("delete", want == ReadWrite, func() error { _, err := c.Delete(ctx, key); return err })
		}
	}
	t.Logf("%d cells of %d areas x %d subjects tried", cells, len(Matrix), len(Subjects))

	// A node's status write guarded by its own assignment works; a read of another node's
	// assignments is refused.
	node := clients["node (own)"]
	if _, err := node.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(space.Assign(SampleNode, "x")), "=", 0)).
		Then(clientv3.OpPut(space.Status(SampleNode, "x"), "{}")).Commit(); err != nil {
		t.Errorf("guarded status write: %v", err)
	}
	if _, err := node.Get(ctx, space.AssignPrefix(OtherNode), clientv3.WithPrefix()); !errors.Is(err, rpctypes.ErrPermissionDenied) {
		t.Errorf("a node reading another node's assignments: %v", err)
	}
	unknown := m.ClientAs(t, "nobody")
	if _, err := unknown.Put(ctx, space.VMSpec("web3"), "{}"); !errors.Is(err, rpctypes.ErrPermissionDenied) {
		t.Errorf("a certified user without a role wrote a spec: %v", err)
	}

	// No certificate at all: the TLS handshake fails.
	pool, _ := pki.ClientTLS(filepath.Join(m.Dir, pki.CACert), "", "", pki.EtcdServer)
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

// TestMatrixDoc: docs/security.md shows the matrix the code enforces. go test ./lib/rbac -update
// rewrites it.
func TestMatrixDoc(t *testing.T) {
	const begin, end = "<!-- rbac-matrix:begin (generated: go test ./lib/rbac -update) -->\n", "<!-- rbac-matrix:end -->"
	path := filepath.Join("..", "..", "docs", "security.md")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	doc := string(b)
	i, j := strings.Index(doc, begin), strings.Index(doc, end)
	if i < 0 || j < i {
		t.Fatalf("%s has no %q ... %q section", path, begin, end)
	}
	want := doc[:i+len(begin)] + MatrixMarkdown() + doc[j:]
	if want == doc {
		return
	}
	if *update {
		if err := os.WriteFile(path, []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	t.Fatalf("the permission matrix in %s is out of date: run go test ./lib/rbac -update", path)
}

// TestMatrixCoversTheKeyspace: every prefix the keyspace has is in the matrix, so a new prefix
// cannot arrive without someone deciding who may write it.
func TestMatrixCoversTheKeyspace(t *testing.T) {
	covered := func(key string) bool {
		for _, a := range Matrix {
			k := a.Key(space, SampleNode)
			if k == key || strings.HasPrefix(k, key) || strings.HasPrefix(key, strings.TrimSuffix(k, "x")) {
				return true
			}
		}
		return false
	}
	for _, p := range []string{space.Cluster(), space.HardwarePrefix(), space.NodeSpecPrefix(), space.NodePrefix(), space.NodeStatePrefix(),
		space.VMPrefix(), space.PlacementPrefix(), space.ProblemPrefix(), space.AssignRoot(), space.StatusRoot(), space.FenceRoot(),
		space.LossGuard(), space.RequestPrefix(), space.Rollout(), space.RolloutStatus(), space.ImagePrefix(), space.VolumeRoot(),
		space.NodeCmdRoot(), space.JoinTokenPrefix(), space.DiscoveredPrefix(), space.DHCPLeasePrefix(), space.BootserverPrefix(),
		space.EventPrefix(), space.Election()} {
		if !covered(p) {
			t.Errorf("%s is not in rbac.Matrix", p)
		}
	}
}
