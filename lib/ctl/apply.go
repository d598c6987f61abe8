package ctl

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

// Batching of `vm apply`: a batch is read in one transaction and written in one, under a
// comparison per key, so that a file of 100,000 specs costs a few thousand round trips instead of
// 200,000, several batches in flight. etcd refuses transactions of more than 128 operations
// (--max-txn-ops) or requests over its size limit (herd's etcd: 1 MiB), hence both bounds.
const (
	applyBatchKeys  = 64
	applyBatchBytes = 256 << 10
	applyInFlight   = 8
)

// applyRace, in tests, runs between a batch's read and its write.
var applyRace func([]specDoc)

// applyResult is what apply did to one VM's spec.
type applyResult struct {
	name, res string
}

// mergeSpec is the value spec becomes when written over old (nil when absent): members of the
// stored spec that this herdctl does not know and spec does not set are kept.
// spec itself is left as it is: a retry merges it again with what is stored then.
func mergeSpec(old []byte, spec *keys.VMSpec) string {
	prev, err := keys.Decode[keys.VMSpec](old)
	if old == nil || err != nil || len(prev.Extra) == 0 {
		return keys.MustEncode(spec)
	}
	merged := *spec
	merged.Extra = keys.Extra{}
	for k, v := range prev.Extra {
		merged.Extra[k] = v
	}
	for k, v := range spec.Extra {
		merged.Extra[k] = v
	}
	return keys.MustEncode(&merged)
}

// batches cuts docs into runs of at most applyBatchKeys keys and about applyBatchBytes of values.
func batches(docs []specDoc) [][]specDoc {
	var out [][]specDoc
	start, size := 0, 0
	for i, d := range docs {
		n := len(keys.MustEncode(d.spec)) + 2*len(d.name) + 64
		if i > start && (i-start == applyBatchKeys || size+n > applyBatchBytes) {
			out = append(out, docs[start:i])
			start, size = i, 0
		}
		size += n
	}
	if start < len(docs) {
		out = append(out, docs[start:])
	}
	return out
}

// applyAll writes every doc's spec, batched and several batches at once; each request gets its own
// --timeout. done is called, from one goroutine at a time, with each batch's results in file order.
// On the first failure no new batch starts and the error names the VMs of the batch that failed.
// With a pacer, a batch starts only once the VMs it may create fit under its bound.
func (e *env) applyAll(ctx context.Context, docs []specDoc, pace *pacer, done func([]applyResult)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		mu       sync.Mutex
		firstErr error
		wg       sync.WaitGroup
		slots    = make(chan struct{}, applyInFlight)
	)
	for _, b := range batches(docs) {
		if pace != nil {
			if err := pace.wait(ctx, len(b)); err != nil {
				break
			}
		}
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		wg.Add(1)
		go func() {
			defer func() { <-slots; wg.Done() }()
			res, err := e.applyBatchPatiently(ctx, b)
			mu.Lock()
			defer mu.Unlock()
			if err != nil && pace != nil {
				pace.created(len(b), nil)
			}
			if err != nil {
				if firstErr == nil {
					firstErr = err
					cancel()
				}
				return
			}
			if pace != nil {
				var made []string
				for _, r := range res {
					if r.res == casCreated {
						made = append(made, r.name)
					}
				}
				pace.created(len(b), made)
			}
			done(res)
		}()
	}
	wg.Wait()
	return firstErr
}

// overloadRetries is how often a batch is tried again when etcd says it is overloaded.
const overloadRetries = 8

// applyBatchPatiently is applyBatch, tried again with backoff while etcd refuses for overload
// ("too many requests": its apply loop is more than 5,000 entries behind): a burst of 100,000
// specs with 10,000 nodes writing statuses meets that on a small etcd, and giving up there left
// a file half applied. A batch is safe to repeat: it reads, compares and writes again, and a
// write that did commit before the refusal reads back as unchanged.
func (e *env) applyBatchPatiently(ctx context.Context, b []specDoc) ([]applyResult, error) {
	backoff := etcdutil.Backoff{Min: 250 * time.Millisecond, Max: 5 * time.Second}
	for try := 0; ; try++ {
		res, err := e.applyBatch(ctx, b)
		if err == nil || try == overloadRetries || !errors.Is(err, rpctypes.ErrTooManyRequests) {
			return res, err
		}
		if !backoff.Wait(ctx) {
			return nil, err
		}
	}
}

// applyBatch reads the batch's stored specs in one transaction and writes the changed ones in
// another that holds only if none of them changed in between; if one did (someone else wrote it),
// the batch is redone key by key by compare-and-swap.
func (e *env) applyBatch(ctx context.Context, b []specDoc) ([]applyResult, error) {
	span := b[0].name
	if len(b) > 1 {
		span += " .. " + b[len(b)-1].name
	}
	wrap := func(what string, err error) error {
		if errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("%s vm %s: no answer within --timeout %s: %w", what, span, e.timeout, err)
		}
		return fmt.Errorf("%s vm %s: %w", what, span, err)
	}
	reads := make([]clientv3.Op, len(b))
	for i, d := range b {
		reads[i] = clientv3.OpGet(e.space.VMSpec(d.name))
	}
	rctx, rcancel := context.WithTimeout(ctx, e.timeout)
	got, err := e.client.Txn(rctx).Then(reads...).Commit()
	rcancel()
	if err != nil {
		return nil, wrap("read", err)
	}
	res := make([]applyResult, len(b))
	var cmps []clientv3.Cmp
	var puts []clientv3.Op
	for i, d := range b {
		key := e.space.VMSpec(d.name)
		var old []byte
		var modRev int64
		if kvs := got.Responses[i].GetResponseRange().Kvs; len(kvs) > 0 {
			old, modRev = kvs[0].Value, kvs[0].ModRevision
		}
		val := mergeSpec(old, d.spec)
		switch {
		case old != nil && string(old) == val:
			res[i] = applyResult{d.name, casUnchanged}
			continue
		case old == nil:
			res[i] = applyResult{d.name, casCreated}
		default:
			res[i] = applyResult{d.name, "configured"}
		}
		cmps = append(cmps, etcdutil.ModRev(key, modRev))
		puts = append(puts, clientv3.OpPut(key, val))
	}
	if len(puts) == 0 {
		return res, nil
	}
	if applyRace != nil {
		applyRace(b)
	}
	wctx, wcancel := context.WithTimeout(ctx, e.timeout)
	tx, err := e.client.Txn(wctx).If(cmps...).Then(puts...).Commit()
	wcancel()
	if err != nil {
		return nil, wrap("write", err)
	}
	if tx.Succeeded {
		return res, nil
	}
	for i, d := range b {
		one, cancel := context.WithTimeout(ctx, e.timeout)
		r, err := e.applySpec(one, d.name, d.spec)
		cancel()
		if err != nil {
			return nil, wrap("write", err)
		}
		res[i] = applyResult{d.name, r}
	}
	return res, nil
}

// pacer is `vm apply --max-pending`: admission control. It bounds how many of the VMs this apply
// created still wait for the leader's decision (a placement, or a problem saying why none), so
// that a big file queues here, visibly, instead of in etcd and the leader's backlog, where every
// VM waits behind all the others and etcd, overloaded, slows everyone. It watches placements and
// problems from the revision the apply started at. It fails open: when the leader decides
// nothing for pacerStall (no coordinator leads, or none can keep up) or the watch ends, it says
// so and the rest is written at full speed.
type pacer struct {
	max  int
	warn func(string)

	mu       sync.Mutex
	waiting  map[string]bool // created by this apply, not decided yet
	reserved int             // VMs batches in flight may create
	decided  map[string]bool // decided before this apply heard it created them
	off      bool
	last     time.Time
	changed  chan struct{}
}

// pacerStall is how long the leader may decide nothing before the pacer stops waiting for it.
var pacerStall = 15 * time.Second

func (e *env) startPacer(ctx context.Context, max int, warn func(string)) (*pacer, error) {
	resp, err := e.client.Get(ctx, e.space.PlacementPrefix(), clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		return nil, fmt.Errorf("pace: %w", err)
	}
	p := &pacer{max: max, warn: warn, waiting: map[string]bool{}, decided: map[string]bool{}, last: time.Now(), changed: make(chan struct{}, 1)}
	for _, prefix := range []string{e.space.PlacementPrefix(), e.space.ProblemPrefix()} {
		wch := e.client.Watch(clientv3.WithRequireLeader(ctx), prefix, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1), clientv3.WithFilterDelete())
		go func() {
			for wr := range wch {
				if err := wr.Err(); err != nil {
					break
				}
				for _, ev := range wr.Events {
					if name, ok := keys.ParseLeaf(prefix, string(ev.Kv.Key)); ok {
						p.decide(name)
					}
				}
			}
			if ctx.Err() == nil {
				p.stop("the watch on the leader's decisions ended")
			}
		}()
	}
	return p, nil
}

func (p *pacer) decide(name string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.waiting[name] {
		delete(p.waiting, name)
		p.last = time.Now()
		p.poke()
	} else {
		p.decided[name] = true
	}
}

func (p *pacer) poke() {
	select {
	case p.changed <- struct{}{}:
	default:
	}
}

func (p *pacer) stop(why string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.off {
		p.off = true
		p.warn(why + ": writing the rest without waiting")
		p.poke()
	}
}

// created records what a batch of n reserved VMs created: each waits for a decision unless one
// came already; the rest of the reservation is released.
func (p *pacer) created(n int, names []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.reserved -= n
	p.poke()
	for _, n := range names {
		if p.decided[n] {
			delete(p.decided, n)
			continue
		}
		p.waiting[n] = true
	}
}

// wait returns when a batch may create n more VMs, and reserves them: the waiting and the
// reserved stay within max (a batch bigger than max goes alone), or the pacer is off.
func (p *pacer) wait(ctx context.Context, n int) error {
	for {
		p.mu.Lock()
		pending := len(p.waiting) + p.reserved
		ok := p.off || pending+n <= p.max || pending == 0
		if ok {
			p.reserved += n
		}
		stalled := time.Since(p.last) > pacerStall
		p.mu.Unlock()
		if ok {
			return nil
		}
		if stalled {
			p.stop(fmt.Sprintf("the leader decided none of this apply's VMs for %s (is a coordinator leading? herdctl cluster show)", pacerStall))
			continue
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-p.changed:
		case <-time.After(time.Second):
		}
	}
}
