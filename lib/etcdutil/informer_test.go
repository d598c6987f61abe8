package etcdutil

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"

	"github.com/herdhq/herd/lib/etcdembed"
	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
)

type recorder struct {
	mu  sync.Mutex
	ops []string
}

func (r *recorder) change(key string, prev, cur *KV) {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case cur == nil:
		r.ops = append(r.ops, "del "+key)
	default:
		r.ops = append(r.ops, "put "+key+"="+string(cur.Value))
	}
}

func (r *recorder) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := r.ops
	r.ops = nil
	return out
}

func TestInformerListWatchAndRelistAfterCompaction(t *testing.T) {
	c := etcdtest.Client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.Put(ctx, "/p/a", "1"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Put(ctx, "/other", "x"); err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	inf := NewInformer(c, "/p/", nil, rec.change, nil)
	inf.PageSize = 2 // exercise pagination
	for _, k := range []string{"/p/b", "/p/c", "/p/d"} {
		if _, err := c.Put(ctx, k, "1"); err != nil {
			t.Fatal(err)
		}
	}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { inf.Run(runCtx); close(done) }()
	if err := inf.WaitRev(ctx, 0); err != nil {
		t.Fatal(err)
	}
	if got := inf.Len(); got != 4 {
		t.Fatalf("listed %d keys, want 4", got)
	}
	rec.take()

	resp, err := c.Put(ctx, "/p/a", "2")
	if err != nil {
		t.Fatal(err)
	}
	if err := inf.WaitRev(ctx, resp.Header.Revision); err != nil {
		t.Fatal(err)
	}
	if kv := inf.Get("/p/a"); kv == nil || string(kv.Value) != "2" {
		t.Fatalf("watch did not deliver the put: %+v", kv)
	}
	// A write outside the prefix is reached through a progress notification.
	resp, err = c.Put(ctx, "/other", "y")
	if err != nil {
		t.Fatal(err)
	}
	if err := inf.WaitRev(ctx, resp.Header.Revision); err != nil {
		t.Fatal(err)
	}
	stop()
	<-done
	rec.take()

	// While nobody watches: delete one key, add one, compact away the history.
	if _, err := c.Delete(ctx, "/p/b"); err != nil {
		t.Fatal(err)
	}
	resp, err = c.Put(ctx, "/p/e", "1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Compact(ctx, resp.Header.Revision); err != nil {
		t.Fatal(err)
	}
	// A watch from the old revision fails with ErrCompacted...
	wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
	err = inf.watch(wctx, 2)
	wcancel()
	if !errors.Is(err, rpctypes.ErrCompacted) {
		t.Fatalf("watch from a compacted revision: %v", err)
	}
	// ...and the next run lists again, reporting the vanished key as a delete.
	runCtx, stop = context.WithCancel(ctx)
	done = make(chan struct{})
	go func() { inf.Run(runCtx); close(done) }()
	if err := inf.WaitRev(ctx, resp.Header.Revision); err != nil {
		t.Fatal(err)
	}
	stop()
	<-done
	got := rec.take()
	want := []string{"del /p/b", "put /p/e=1"}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("relist changes = %v, want %v", got, want)
	}
	if inf.Relists() != 2 {
		t.Fatalf("relists = %d, want 2", inf.Relists())
	}
}

func TestGuardedTxn(t *testing.T) {
	c := etcdtest.Client(t)
	ctx := context.Background()
	resp, err := c.Put(ctx, "/leader/x", "me")
	if err != nil {
		t.Fatal(err)
	}
	g := Guard{Key: "/leader/x", Rev: resp.Header.Revision}
	if _, err := GuardedTxn(ctx, c, g, []Cmp{ModRev("/obj", 0)}, []Op{OpPut("/obj", "1")}); err != nil {
		t.Fatal(err)
	}
	// The object exists now: the same compare is a conflict, not a leadership loss.
	if _, err := GuardedTxn(ctx, c, g, []Cmp{ModRev("/obj", 0)}, []Op{OpPut("/obj", "2")}); !errors.Is(err, ErrConflict) {
		t.Fatalf("want ErrConflict, got %v", err)
	}
	// A re-created election key (a new term) deposes the old guard.
	if _, err := c.Delete(ctx, "/leader/x"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Put(ctx, "/leader/x", "other"); err != nil {
		t.Fatal(err)
	}
	if _, err := GuardedTxn(ctx, c, g, nil, []Op{OpPut("/obj", "3")}); !errors.Is(err, ErrNotLeader) {
		t.Fatalf("want ErrNotLeader, got %v", err)
	}
	got, _ := c.Get(ctx, "/obj")
	if string(got.Kvs[0].Value) != "1" {
		t.Fatalf("a failed guarded write changed the object: %s", got.Kvs[0].Value)
	}
}

// TestSyncWithoutEvents: a revision that touched nothing of a prefix is confirmed by asking etcd,
// not by listing again; one that touched it (a put, a delete) is not.
func TestSyncWithoutEvents(t *testing.T) {
	srv := etcdtest.Start(t)
	c := etcdtest.NewClient(t, srv.Endpoints)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for _, k := range []string{"/p/a", "/p/b"} {
		if _, err := c.Put(ctx, k, "1"); err != nil {
			t.Fatal(err)
		}
	}
	inf := NewInformer(c, "/p/", nil, nil, nil)
	done := make(chan struct{})
	go func() { inf.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	if err := inf.WaitRev(ctx, 0); err != nil {
		t.Fatal(err)
	}
	resp, err := c.Put(ctx, "/other", "x")
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := inf.unchangedUntil(ctx, resp.Header.Revision); err != nil || !ok {
		t.Fatalf("an unrelated write: unchanged %v, %v", ok, err)
	}
	if inf.Rev() != resp.Header.Revision || inf.Relists() != 1 {
		t.Fatalf("rev %d relists %d", inf.Rev(), inf.Relists())
	}
	// A delete and a put in the prefix are changes, whether or not their events arrived.
	for _, op := range []clientv3.Op{clientv3.OpDelete("/p/a"), clientv3.OpPut("/p/b", "2")} {
		before := inf.Rev()
		tr, err := c.Txn(ctx).Then(op).Commit()
		if err != nil {
			t.Fatal(err)
		}
		inf.mu.Lock()
		inf.rev = before // as if the event had not arrived yet
		if _, ok := inf.items["/p/a"]; !ok {
			inf.items["/p/a"] = &KV{Key: "/p/a"}
		}
		inf.mu.Unlock()
		if ok, _ := inf.unchangedUntil(ctx, tr.Header.Revision); ok {
			t.Fatalf("%v: taken for unchanged", op)
		}
	}
}

// TestWaitRevSeesWholeTransaction: a reader woken for a transaction's revision sees every key the
// transaction wrote, in the cache and in what the change handlers keep: the revision moves only
// once the handlers of its keys have run. The first key's handler is held open a while, which under
// per-event application let WaitRev return with the second key still missing, and with the
// revision moved before the handlers let a leader find its own writes missing from its ledger.
func TestWaitRevSeesWholeTransaction(t *testing.T) {
	srv := etcdtest.Start(t)
	c := etcdtest.NewClient(t, srv.Endpoints)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	handled := map[string]bool{}
	inf := NewInformer(c, "/p/", nil, func(key string, _, _ *KV) {
		if key == "/p/a" {
			time.Sleep(300 * time.Millisecond)
		}
		mu.Lock()
		handled[key] = true
		mu.Unlock()
	}, nil)
	done := make(chan struct{})
	go func() { inf.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	if err := inf.WaitRev(ctx, 0); err != nil {
		t.Fatal(err)
	}
	tr, err := c.Txn(ctx).Then(clientv3.OpPut("/p/a", "1"), clientv3.OpPut("/p/b", "1")).Commit()
	if err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
	defer wcancel()
	if err := inf.WaitRev(wctx, tr.Header.Revision); err != nil {
		t.Fatal(err)
	}
	if inf.Get("/p/a") == nil || inf.Get("/p/b") == nil {
		t.Fatalf("at revision %d the cache holds a=%v b=%v: half a transaction", tr.Header.Revision, inf.Get("/p/a"), inf.Get("/p/b"))
	}
	mu.Lock()
	defer mu.Unlock()
	if !handled["/p/a"] || !handled["/p/b"] {
		t.Fatalf("woken at revision %d before its handlers ran: %v", tr.Header.Revision, handled)
	}
}

// TestReplacedEtcdRelistsEveryCache: etcd is replaced by an empty member at the same URL, whose
// history passes the revision of a quiet cache but not that of a busy one. A request's revision
// below what the caches held makes every cache list again: the quiet one's watch, resumed on the
// new history, would wait past the revision at which the new member wrote its key and never see it.
func TestReplacedEtcdRelistsEveryCache(t *testing.T) {
	start := func(dir string, client, peer string) *etcdembed.Server {
		s, err := etcdembed.Start(context.Background(), etcdembed.Config{
			Name: "test", Dir: dir, Clients: []string{client}, Peers: []string{peer}, UnsafeNoFsync: true,
		}, 30*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	cu, err1 := etcdembed.FreeLoopbackURL()
	pu, err2 := etcdembed.FreeLoopbackURL()
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	old := start(t.TempDir(), cu, pu)
	oldClosed := false
	defer func() {
		if !oldClosed {
			old.Close()
		}
	}()
	// Reconnect promptly to the new member (gRPC's default backoff waits up to 8 s here).
	c, err := clientv3.New(clientv3.Config{Endpoints: []string{cu}, DialTimeout: 5 * time.Second, Logger: zap.NewNop(),
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, MaxDelay: 500 * time.Millisecond}, MinConnectTimeout: time.Second})}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := c.Put(ctx, "/cold", "old"); err != nil {
		t.Fatal(err)
	}
	cold := NewInformer(c, "/cold", nil, nil, nil)
	hot := NewInformer(c, "/hot/", nil, nil, nil)
	var regressed sync.Once
	wentBack := make(chan struct{})
	hot.OnRegress = func(was, now int64) { regressed.Do(func() { close(wentBack) }) }
	runCtx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for _, inf := range []*Informer{cold, hot} {
		wg.Add(1)
		go func() { defer wg.Done(); inf.Run(runCtx) }()
	}
	defer func() { stop(); wg.Wait() }()
	if err := cold.WaitRev(ctx, 0); err != nil {
		t.Fatal(err)
	}
	var last int64
	for n := range 20 {
		resp, err := c.Put(ctx, "/hot/k", fmt.Sprint(n))
		if err != nil {
			t.Fatal(err)
		}
		last = resp.Header.Revision
	}
	if err := hot.WaitRev(ctx, last); err != nil {
		t.Fatal(err)
	}
	caches := []*Informer{cold, hot}
	floor := MaxRev(caches)
	if cold.Rev() >= floor-5 {
		t.Fatalf("the quiet cache is at %d, the busy one at %d: no room for the test", cold.Rev(), floor)
	}

	old.Close() // takes seconds: it waits for the open watches, which are meant to resume
	oldClosed = true
	repl := start(t.TempDir(), cu, pu)
	defer func() { stop(); wg.Wait(); repl.Close() }() // watches first, or Close waits for them
	// The new member's history: its own /cold early, then enough writes to pass the quiet cache's
	// revision but not the busy one's.
	rc := etcdtest.NewClient(t, []string{cu})
	if _, err := rc.Put(ctx, "/cold", "new"); err != nil {
		t.Fatal(err)
	}
	var now int64
	for now <= cold.Rev()+1 {
		resp, err := rc.Put(ctx, "/filler", "x")
		if err != nil {
			t.Fatal(err)
		}
		now = resp.Header.Revision
	}
	if now >= floor {
		t.Fatalf("the new history reached %d, past the busy cache's %d", now, floor)
	}
	// An answer below the floor from the replaced member is confirmed by a read: it went back.
	if _, err := c.Get(ctx, "/filler"); err != nil { // the test's client is on the new member
		t.Fatal(err)
	}
	if _, ok := CheckAnswer(ctx, c, caches, floor, now); ok {
		t.Fatal("a revision below the floor, confirmed by a read, was not taken as a regress")
	}
	select {
	case <-wentBack:
	case <-ctx.Done():
		t.Fatal("the busy cache's list never said etcd went back")
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if kv := cold.Get("/cold"); kv != nil && string(kv.Value) == "new" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the quiet cache still holds %+v: its watch sits on the old history", cold.Get("/cold"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if CheckRevisions(caches, MaxRev(caches), now) {
		t.Fatal("a revision at the floor taken as a regress")
	}
}

// TestStaleKeepaliveAnswerIsConfirmed: a keepalive answered below what the caches hold, with etcd
// in good health (its request was sent before the floor was taken), is confirmed by a fresh read
// and costs no list; taken at its word, as before, every cache listed again (a leader of 100,000
// VMs did so in the 10,000-node rig).
func TestStaleKeepaliveAnswerIsConfirmed(t *testing.T) {
	srv := etcdtest.Start(t)
	c := etcdtest.NewClient(t, srv.Endpoints)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	inf := NewInformer(c, "/p/", nil, nil, nil)
	inf.OnRegress = func(was, now int64) { t.Errorf("etcd taken to have gone back from %d to %d", was, now) }
	done := make(chan struct{})
	go func() { inf.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	var last int64
	for n := range 5 {
		resp, err := c.Put(ctx, "/p/k", fmt.Sprint(n))
		if err != nil {
			t.Fatal(err)
		}
		last = resp.Header.Revision
	}
	if err := inf.WaitRev(ctx, last); err != nil {
		t.Fatal(err)
	}
	caches := []*Informer{inf}
	floor := MaxRev(caches)
	now, ok := CheckAnswer(ctx, c, caches, floor, floor-3)
	if !ok || now < floor {
		t.Fatalf("a stale answer with etcd healthy: ok %v, revision %d (floor %d)", ok, now, floor)
	}
	if n := inf.Relists(); n != 1 {
		t.Fatalf("the cache listed %d times, want 1 (its start)", n)
	}
	if now, ok := CheckAnswer(ctx, c, caches, floor, floor); !ok || now != floor {
		t.Fatalf("an answer at the floor: ok %v, revision %d, want %d", ok, now, floor)
	}
	// The same answer taken at its word lists again: what the confirmation spares.
	if !CheckRevisions(caches, floor, floor-3) {
		t.Fatal("CheckRevisions let a revision below the floor pass")
	}
}
