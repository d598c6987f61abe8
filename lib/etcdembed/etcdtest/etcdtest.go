// Package etcdtest starts a real, embedded etcd member for a test and stops it when the test ends.
package etcdtest

import (
	"context"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/herdhq/herd/lib/etcdembed"
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
