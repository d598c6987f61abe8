package etcdutil

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// KV is one cached key. It is immutable once the Informer publishes it: never modify a KV or its
// Obj; build a new value and write it to etcd instead.
type KV struct {
	Key            string
	Value          []byte
	CreateRevision int64
	ModRevision    int64
	Version        int64
	Lease          int64
	// Size is the value's length in bytes, also when the informer drops values (DropValues).
	Size int
	// Obj and Err are the Informer's Decode result, computed once per revision.
	Obj any
	Err error
	// rec is the typed record a Typed informer builds once per revision.
	rec any
}

// DecodeFunc turns a raw value into a typed object once, when it arrives.
type DecodeFunc func(key string, value []byte) (any, error)

// ChangeFunc is told about every change of a cached key, in revision order, from the Informer's own
// goroutine. cur is nil for a delete. It must not block: enqueue work, don't do it.
type ChangeFunc func(key string, prev, cur *KV)

// Informer keeps an in-memory copy of one prefix: it lists, then watches from the list's revision + 1,
// and on compaction, a lost etcd leader or any watch error it lists again, reporting keys that
// vanished meanwhile as deletes. Nothing else in herd lists a prefix in a loop.
type Informer struct {
	client   *clientv3.Client
	prefix   string
	decode   DecodeFunc
	onChange ChangeFunc
	log      hclog.Logger
	// PageSize bounds one list request, so that a large prefix doesn't need a huge response.
	PageSize int64
	// OnBatch, if set, is told after each list and each watch response how many keys it deleted
	// and how many remain: a way to notice things vanishing wholesale.
	OnBatch func(deleted, remaining int)
	// OnRegress, if set, is told that a list answered at revision now although the cache had seen
	// was: etcd was restored from a backup or replaced. Only a list says so for sure (it is made
	// after every event before it was applied), so only a list calls it, before its changes are
	// handed to the change function: the holder can stop acting on them first. It must not block.
	OnRegress func(was, now int64)
	// wrap, set by a Typed informer, builds each key's typed record once as it arrives.
	wrap func(*KV) any
	// DropValues keeps only each key's metadata (revisions, lease, size) once it is decoded: for
	// prefixes that are large and whose contents the holder never reads (the audit trail).
	DropValues bool

	mu      sync.RWMutex
	items   map[string]*KV
	rev     int64
	synced  bool
	changed chan struct{} // closed and replaced whenever rev advances
	relists int
	// cancelWatch ends the current watch (see CheckRevisions).
	cancelWatch context.CancelCauseFunc
}

// NewInformer prepares an informer; Run starts it. decode and onChange may be nil.
func NewInformer(c *clientv3.Client, prefix string, decode DecodeFunc, onChange ChangeFunc, log hclog.Logger) *Informer {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return &Informer{
		client:   c,
		prefix:   prefix,
		decode:   decode,
		onChange: onChange,
		log:      log.With("prefix", prefix),
		PageSize: 1000,
		items:    map[string]*KV{},
		changed:  make(chan struct{}),
	}
}

// Run keeps the cache current until ctx ends. It never returns an error for etcd trouble; it logs,
// backs off and retries, because a daemon must outlive an etcd outage.
func (i *Informer) Run(ctx context.Context) {
	b := Backoff{Min: 100 * time.Millisecond, Max: 5 * time.Second}
	for ctx.Err() == nil {
		rev, err := i.relist(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			i.log.Warn("list failed; retrying", "error", err)
			b.Wait(ctx)
			continue
		}
		err = i.watch(ctx, rev+1)
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, rpctypes.ErrCompacted) || errors.Is(err, ErrRevisionWentBack) || errors.Is(err, errResync) {
			// History we needed is gone, or etcd's history is another one: list again at once
			// and diff.
			i.log.Info("listing again", "why", err, "from", rev+1)
			b.Reset()
			continue
		}
		i.log.Warn("watch ended; listing again", "error", err)
		if b.Wait(ctx) {
			continue
		}
	}
}

func (i *Informer) relist(ctx context.Context) (int64, error) {
	got := map[string]*KV{}
	var rev int64
	key := i.prefix
	end := clientv3.GetPrefixRangeEnd(i.prefix)
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(i.PageSize)}
		if rev != 0 {
			// Later pages read the first page's revision, so the list is one consistent snapshot.
			opts = append(opts, clientv3.WithRev(rev))
		}
		cctx, cancel := WithTimeout(ctx)
		resp, err := i.client.Get(cctx, key, opts...)
		cancel()
		if err != nil {
			return 0, fmt.Errorf("list %s: %w", i.prefix, err)
		}
		if rev == 0 {
			rev = resp.Header.Revision
		}
		for _, kv := range resp.Kvs {
			got[string(kv.Key)] = i.newKV(kv)
		}
		if !resp.More || len(resp.Kvs) == 0 {
			break
		}
		key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}

	type change struct{ prev, cur *KV }
	var changes []change
	var names []string
	i.mu.Lock()
	for k, old := range i.items {
		if _, ok := got[k]; !ok {
			changes = append(changes, change{old, nil})
			names = append(names, k)
		}
	}
	for k, kv := range got {
		old := i.items[k]
		if old == nil || old.ModRevision != kv.ModRevision {
			changes = append(changes, change{old, kv})
			names = append(names, k)
		}
	}
	i.items = got
	i.synced = true
	i.relists++
	was := i.rev
	if rev < i.rev {
		i.rev = 0 // a restored or replaced etcd: its revisions start over
	}
	i.advance(rev)
	i.mu.Unlock()
	if rev < was && i.OnRegress != nil {
		i.OnRegress(was, rev)
	}

	if i.OnBatch != nil {
		deleted := 0
		for _, ch := range changes {
			if ch.cur == nil {
				deleted++
			}
		}
		defer i.OnBatch(deleted, len(got))
	}
	if i.onChange != nil {
		// Deterministic order helps logs and tests; the handlers only enqueue.
		idx := make([]int, len(changes))
		for n := range idx {
			idx[n] = n
		}
		sort.Slice(idx, func(a, b int) bool { return names[idx[a]] < names[idx[b]] })
		for _, n := range idx {
			i.onChange(names[n], changes[n].prev, changes[n].cur)
		}
	}
	return rev, nil
}

// ErrRevisionWentBack means etcd answered with a revision older than one the cache already
// reflects: it was restored from a backup or replaced by an empty cluster. The cache lists again,
// and whatever vanished is reported as deleted.
var ErrRevisionWentBack = errors.New("etcd revision went backwards (etcd restored or replaced)")

// CheckRevisions is told a revision etcd answered a request with elsewhere (a lease keepalive, a
// write) and floor, the newest revision any of the caches reflected before the request was made
// (MaxRev). A revision below floor means etcd may have been restored or replaced, and then every
// cache lists again, not only those that had seen more than rev: a watch resumed on the new history
// waits for revisions past the old one's and misses every key written below them (found by a
// cluster-record cache that sat at revision 5 while etcd, replaced, had created the new cluster's
// record at revision 3: the agent never saw the new cluster and stayed frozen). Only a list decides
// that etcd really went back (and tells OnRegress): a request answered by a lagging member is
// relisted for nothing, never acted on. It reports whether the caches list again.
func CheckRevisions(infs []*Informer, floor, rev int64) bool {
	if rev <= 0 || rev >= floor {
		return false
	}
	for _, i := range infs {
		i.listAgain(fmt.Errorf("%w: etcd answered at revision %d, after the caches had seen %d", ErrRevisionWentBack, rev, floor))
	}
	return true
}

// CheckAnswer is CheckRevisions for the answer to a request whose sending the caller does not
// control: a lease keepalive. clientv3's lessor sends keepalives on its own schedule, so a floor
// taken after the previous answer was read can be newer than the next request (a reader slowed by
// a loaded machine, an answer that waited in the channel), and that request's answer then lies
// below it with etcd in perfect health. Every cache listing again for that cost a leader of
// 100,000 VMs seconds of a starved machine (seen in the 10,000-node rig). An answer below floor is
// only a suspicion: a read sent now, after a fresh floor, confirms it, and only a confirmed
// regress makes the caches list again. rev is the revision to note when the answer is sound (the
// confirming read's when there was one); ok is false when etcd went back or could not confirm.
func CheckAnswer(ctx context.Context, c *clientv3.Client, infs []*Informer, floor, rev int64) (now int64, ok bool) {
	if rev <= 0 || rev >= floor || len(infs) == 0 {
		return rev, true
	}
	floor = MaxRev(infs)
	cctx, cancel := WithTimeout(ctx)
	// A key of the first cache's own prefix: whoever reads the prefix may read it, and it is one
	// key (the prefix itself, usually absent), not a range.
	resp, err := c.Get(cctx, infs[0].Prefix())
	cancel()
	if err != nil {
		return 0, false // unconfirmed: the next answer asks again
	}
	if CheckRevisions(infs, floor, resp.Header.Revision) {
		return 0, false
	}
	return resp.Header.Revision, true
}

// listAgain ends the current watch with cause; the cache then lists again.
func (i *Informer) listAgain(cause error) {
	i.mu.Lock()
	cancel := i.cancelWatch
	i.synced = false // WaitRev waits for the new list
	i.mu.Unlock()
	if cancel != nil {
		cancel(cause)
	}
}

// errResync asks the watch to end so that the cache lists again.
var errResync = errors.New("resync requested")

// Resync makes the cache list again now (at the current revision).
func (i *Informer) Resync() { i.listAgain(errResync) }

// Sync waits until the cache reflects rev. A revision that touched no key of the prefix brings no
// event, so after a short wait for events it asks etcd whether anything of the prefix changed
// between the cache's revision and rev; if nothing did, the cache is current at rev. Otherwise it
// waits for the events, and lists again if they do not come.
func (i *Informer) Sync(ctx context.Context, rev int64) error {
	wctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	err := i.WaitRev(wctx, rev)
	cancel()
	if err == nil || ctx.Err() != nil {
		return err
	}
	if ok, err := i.unchangedUntil(ctx, rev); err == nil && ok {
		return nil
	}
	wctx, cancel = context.WithTimeout(ctx, 2*time.Second)
	err = i.WaitRev(wctx, rev)
	cancel()
	if err == nil || ctx.Err() != nil {
		return err
	}
	i.Resync()
	return i.WaitRev(ctx, rev)
}

// unchangedUntil asks etcd whether the prefix at rev holds exactly what the cache holds, judged by
// its revision and size: no key put after the cache's revision, and as many keys as cached (so no
// delete either). If so, the cache is advanced to rev.
func (i *Informer) unchangedUntil(ctx context.Context, rev int64) (bool, error) {
	i.mu.RLock()
	cur, n, synced := i.rev, len(i.items), i.synced
	i.mu.RUnlock()
	if !synced || cur >= rev {
		return synced, nil
	}
	cctx, cancel := WithTimeout(ctx)
	defer cancel()
	// Count is the range's size at rev; Kvs only the keys modified since the cache's revision
	// (etcd filters by modification revision after counting).
	resp, err := i.client.Get(cctx, i.prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly(), clientv3.WithRev(rev),
		clientv3.WithMinModRev(cur+1))
	if err != nil {
		return false, err
	}
	if len(resp.Kvs) > 0 || resp.Count != int64(n) {
		return false, nil
	}
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.rev != cur || len(i.items) != n {
		return false, nil // events arrived meanwhile: let WaitRev judge
	}
	i.advance(rev)
	return true, nil
}

func (i *Informer) watch(ctx context.Context, from int64) error {
	wctx, cancel := context.WithCancelCause(clientv3.WithRequireLeader(ctx))
	defer cancel(nil)
	i.mu.Lock()
	i.cancelWatch = cancel
	i.mu.Unlock()
	wch := i.client.Watch(wctx, i.prefix, clientv3.WithPrefix(), clientv3.WithRev(from))
	for resp := range wch {
		if err := resp.Err(); err != nil {
			if cause := context.Cause(wctx); errors.Is(cause, ErrRevisionWentBack) || errors.Is(cause, errResync) {
				return cause
			}
			return err
		}
		if resp.CompactRevision != 0 {
			return rpctypes.ErrCompacted
		}
		if resp.Header.Revision != 0 && resp.Header.Revision < i.Rev() {
			return fmt.Errorf("%w: at revision %d, the cache is at %d", ErrRevisionWentBack, resp.Header.Revision, i.Rev())
		}
		deleted := i.apply(resp.Events)
		if i.OnBatch != nil && len(resp.Events) > 0 {
			i.OnBatch(deleted, i.Len())
		}
		if resp.IsProgressNotify() {
			i.mu.Lock()
			i.advance(resp.Header.Revision)
			i.mu.Unlock()
		}
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if cause := context.Cause(wctx); errors.Is(cause, ErrRevisionWentBack) || errors.Is(cause, errResync) {
		return cause
	}
	return errors.New("watch channel closed")
}

// apply takes one watch response's events into the cache as one step: a transaction's keys share
// a revision, and a reader woken by WaitRev for that revision must see all of them, not the first
// put without the delete that came with it (found by a DHCP confirm that saw an address offered
// to a client whose own record was not there yet, four times in a row on a loaded machine). etcd
// never splits one revision across watch responses unless fragmenting is asked for, and it is not.
// It returns how many events were deletes.
func (i *Informer) apply(evs []*clientv3.Event) int {
	type change struct {
		key       string
		prev, cur *KV
	}
	changes := make([]change, len(evs))
	deleted := 0
	for n, ev := range evs {
		changes[n].key = string(ev.Kv.Key)
		if ev.Type == mvccpb.PUT {
			changes[n].cur = i.newKV(ev.Kv) // decoded outside the lock
		} else {
			deleted++
		}
	}
	i.mu.Lock()
	var last int64
	for n := range changes {
		c := &changes[n]
		c.prev = i.items[c.key]
		if c.cur == nil {
			delete(i.items, c.key)
		} else {
			i.items[c.key] = c.cur
		}
		last = max(last, evs[n].Kv.ModRevision)
	}
	i.mu.Unlock()
	if i.onChange != nil {
		for _, c := range changes {
			if c.prev != nil || c.cur != nil {
				i.onChange(c.key, c.prev, c.cur)
			}
		}
	}
	// The revision moves only once the handlers have run: whoever waits for it (WaitRev) then
	// also finds what the handlers keep (the leader's VM records and capacity ledger), not only
	// the cache. A leader that waited for its own writes and then found its ledger without them
	// placed the same VMs again and lost the transactions to conflicts.
	i.mu.Lock()
	i.advance(last)
	i.mu.Unlock()
	return deleted
}

// advance must hold i.mu.
func (i *Informer) advance(rev int64) {
	if rev <= i.rev {
		return
	}
	i.rev = rev
	close(i.changed)
	i.changed = make(chan struct{})
}

func (i *Informer) newKV(kv *mvccpb.KeyValue) *KV {
	out := &KV{
		Key:            string(kv.Key),
		Value:          kv.Value,
		CreateRevision: kv.CreateRevision,
		ModRevision:    kv.ModRevision,
		Version:        kv.Version,
		Lease:          kv.Lease,
		Size:           len(kv.Value),
	}
	if i.decode != nil {
		out.Obj, out.Err = i.decode(out.Key, out.Value)
	}
	if i.DropValues {
		out.Value = nil
	}
	if i.wrap != nil {
		out.rec = i.wrap(out)
	}
	return out
}

// Get returns the cached key, or nil.
func (i *Informer) Get(key string) *KV {
	i.mu.RLock()
	defer i.mu.RUnlock()
	return i.items[key]
}

// List returns every cached key, sorted.
func (i *Informer) List() []*KV {
	out := i.Unsorted()
	sort.Slice(out, func(a, b int) bool { return out[a].Key < out[b].Key })
	return out
}

// Unsorted returns every cached key in no particular order: for callers that file them into maps,
// which at 100,000 keys would otherwise pay for a sort every round.
func (i *Informer) Unsorted() []*KV {
	i.mu.RLock()
	defer i.mu.RUnlock()
	out := make([]*KV, 0, len(i.items))
	for _, kv := range i.items {
		out = append(out, kv)
	}
	return out
}

// Len is the number of cached keys.
func (i *Informer) Len() int {
	i.mu.RLock()
	defer i.mu.RUnlock()
	return len(i.items)
}

// Rev is the etcd revision the cache reflects.
func (i *Informer) Rev() int64 {
	i.mu.RLock()
	defer i.mu.RUnlock()
	return i.rev
}

// Synced reports whether the first list has completed.
func (i *Informer) Synced() bool {
	i.mu.RLock()
	defer i.mu.RUnlock()
	return i.synced
}

// Relists counts the full lists done, for tests and metrics: in a steady system it stays at 1.
func (i *Informer) Relists() int {
	i.mu.RLock()
	defer i.mu.RUnlock()
	return i.relists
}

// WaitRev blocks until the cache reflects at least rev (e.g. the revision of one's own write), or
// ctx ends. rev 0 waits for the first list. When rev touched no key of this prefix no event will
// carry it, so after a short wait WaitRev asks etcd for a progress notification.
func (i *Informer) WaitRev(ctx context.Context, rev int64) error {
	nudge := time.NewTimer(200 * time.Millisecond)
	defer nudge.Stop()
	for {
		i.mu.RLock()
		ok := i.synced && i.rev >= rev
		ch := i.changed
		i.mu.RUnlock()
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %s at revision %d: %w", i.prefix, rev, ctx.Err())
		case <-ch:
		case <-nudge.C:
			// The progress request must travel on the watch's own stream, which is keyed by the
			// context's metadata: hence the same WithRequireLeader.
			_ = i.client.RequestProgress(clientv3.WithRequireLeader(ctx))
			nudge.Reset(time.Second)
		}
	}
}

// Prefix is the key prefix the informer caches.
func (i *Informer) Prefix() string { return i.prefix }

// MaxRev is the newest revision any of the caches reflects: what a request made now must answer
// at or after, unless etcd went back in time.
func MaxRev(infs []*Informer) int64 {
	var m int64
	for _, i := range infs {
		m = max(m, i.Rev())
	}
	return m
}
