package etcdutil

import (
	"context"
	"errors"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"
)

var (
	// ErrNotLeader means a leader-guarded write found the election key gone or replaced: this process
	// is no longer the leader and must stop acting at once.
	ErrNotLeader = errors.New("coordinator: not leader")
	// ErrConflict means the guard held but a compare of the write itself failed: someone changed the
	// object since it was read. Re-read and decide again.
	ErrConflict = errors.New("etcd: conflict")
)

// Guard is the fencing token of one leadership term: the election key and the revision at which it
// was created (concurrency.Election's Key() and Rev()). A key re-created by a later term has a
// different CreateRevision, so a deposed leader's guarded writes can never commit.
type Guard struct {
	Key string
	Rev int64
}

// Cmp is the compare every leader write carries.
func (g Guard) Cmp() clientv3.Cmp {
	return clientv3.Compare(clientv3.CreateRevision(g.Key), "=", g.Rev)
}

// GuardedTxn commits ops if the guard holds and every cond holds. It tells the two failures apart:
// ErrNotLeader (the guard failed) and ErrConflict (a cond failed). It returns the commit revision.
func GuardedTxn(ctx context.Context, kv clientv3.KV, g Guard, conds []clientv3.Cmp, ops []clientv3.Op) (int64, error) {
	if g.Key == "" || g.Rev == 0 {
		return 0, ErrNotLeader
	}
	cctx, cancel := WithTimeout(ctx)
	defer cancel()
	// The inner transaction lets one round trip distinguish "not leader" from "conflict".
	resp, err := kv.Txn(cctx).If(g.Cmp()).Then(clientv3.OpTxn(conds, ops, nil)).Commit()
	if err != nil {
		return 0, err
	}
	if !resp.Succeeded {
		return 0, ErrNotLeader
	}
	inner := resp.Responses[0].GetResponseTxn()
	if inner == nil {
		return 0, fmt.Errorf("guarded txn: no inner response")
	}
	if !inner.Succeeded {
		return resp.Header.Revision, ErrConflict
	}
	return resp.Header.Revision, nil
}

// ModRev is the compare "key unchanged since I read it at modRev"; modRev 0 means "key absent".
func ModRev(key string, modRev int64) clientv3.Cmp {
	return clientv3.Compare(clientv3.ModRevision(key), "=", modRev)
}

// CreateRev is the compare "key is the incarnation created at rev"; rev 0 means "key absent".
func CreateRev(key string, rev int64) clientv3.Cmp {
	return clientv3.Compare(clientv3.CreateRevision(key), "=", rev)
}

// Short names for the clientv3 types guarded writes are built from.
type (
	Cmp = clientv3.Cmp
	Op  = clientv3.Op
)

// OpPut and OpDelete re-export clientv3's constructors so callers building guarded writes need one
// import.
var (
	OpPut    = clientv3.OpPut
	OpDelete = clientv3.OpDelete
)
