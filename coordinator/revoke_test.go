package coordinator

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"

	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
	"github.com/herdhq/herd/lib/rbac"
)

// TestRemovedHardwareRevokesNode: with TLS and RBAC on, the leader deletes the etcd user of a node
// whose hardware record was removed, and that node's certificate stops working at once; enrolled
// nodes keep theirs.
func TestRemovedHardwareRevokesNode(t *testing.T) {
	m := etcdtest.StartTLS(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	root := m.ClientAs(t, rbac.Root)
	if err := rbac.Apply(ctx, root, space); err != nil {
		t.Fatal(err)
	}
	for _, hw := range []string{"52:54:00:00:00:01", "52:54:00:00:00:02"} {
		if _, err := root.Put(ctx, space.Hardware(hw), `{"v":1}`); err != nil {
			t.Fatal(err)
		}
		if _, err := rbac.EnsureNode(ctx, root, space, hw); err != nil {
			t.Fatal(err)
		}
	}
	gone := m.ClientAs(t, rbac.NodeUser("52:54:00:00:00:02"))
	if _, err := gone.Put(ctx, space.Node("52:54:00:00:00:02"), "{}"); err != nil {
		t.Fatal(err)
	}
	if _, err := root.Delete(ctx, space.Hardware("52:54:00:00:00:02")); err != nil {
		t.Fatal(err)
	}

	co, err := New(Config{Client: root, Space: space, Name: "c1", SessionTTL: 2 * time.Second, Interval: time.Second, RevokeNodeUsers: true,
		Log: hclog.New(&hclog.LoggerOptions{Name: "c1", Output: testWriter{t}, Level: hclog.Debug})})
	if err != nil {
		t.Fatal(err)
	}
	rctx, rcancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { _ = co.Run(rctx); close(done) }()
	defer func() { rcancel(); <-done }()

	// hasUser reports whether the node's etcd user exists.
	hasUser := func(hwid string) (bool, error) {
		users, err := root.UserList(ctx)
		if err != nil {
			return false, err
		}
		return slices.Contains(users.Users, rbac.NodeUser(hwid)), nil
	}
	goneUser := func(hwid string) func() error {
		return func() error {
			if has, err := hasUser(hwid); err != nil || has {
				return fmt.Errorf("still there (%v)", err)
			}
			return nil
		}
	}
	eventually(t, "the removed node's user deleted", goneUser("52:54:00:00:00:02"))
	if has, err := hasUser("52:54:00:00:00:01"); err != nil || !has {
		t.Fatalf("the enrolled node's user was deleted too (%v)", err)
	}
	if _, err := gone.Put(ctx, space.Node("52:54:00:00:00:02"), "{}"); err == nil || !(errors.Is(err, rpctypes.ErrPermissionDenied) || errors.Is(err, rpctypes.ErrAuthFailed) || errors.Is(err, rpctypes.ErrUserNotFound)) {
		t.Fatalf("the revoked node can still write: %v", err)
	}

	// Removed while the leader runs: revoked when the deletion is seen, well before the periodic
	// pass (eventually gives up long before revokeInterval).
	if _, err := root.Delete(ctx, space.Hardware("52:54:00:00:00:01")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the second removed node's user deleted", goneUser("52:54:00:00:00:01"))
}

// testWriter sends a daemon's log to the test's, so a failure in CI shows what the daemon saw.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
