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
func (e *env) applyAll(ctx context.Context, docs []specDoc, done func([]applyResult)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		mu       sync.Mutex
		firstErr error
		wg       sync.WaitGroup
		slots    = make(chan struct{}, applyInFlight)
	)
	for _, b := range batches(docs) {
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
			if err != nil {
				if firstErr == nil {
					firstErr = err
					cancel()
				}
				return
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
