package ctl

import (
	"context"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdutil"
)

// Outcomes of casPut.
const (
	casCreated   = "created"
	casUpdated   = "updated"
	casUnchanged = "unchanged"
)

// casPut writes, by compare-and-swap, the value next makes of the stored one (nil when the key is
// absent), retrying when someone changed the key meanwhile. next returns write false, or the stored
// bytes, when nothing needs writing. It says what happened: casCreated, casUpdated or casUnchanged.
func (e *env) casPut(ctx context.Context, key string, next func(old []byte) (val string, write bool, err error)) (string, error) {
	for attempt := 0; attempt < 10; attempt++ {
		resp, err := e.client.Get(ctx, key)
		if err != nil {
			return "", err
		}
		var old []byte
		var modRev int64
		if len(resp.Kvs) > 0 {
			old, modRev = resp.Kvs[0].Value, resp.Kvs[0].ModRevision
		}
		val, write, err := next(old)
		if err != nil {
			return "", err
		}
		if !write || (old != nil && string(old) == val) {
			return casUnchanged, nil
		}
		tx, err := e.client.Txn(ctx).If(etcdutil.ModRev(key, modRev)).Then(clientv3.OpPut(key, val)).Commit()
		if err != nil {
			return "", err
		}
		if tx.Succeeded {
			if old == nil {
				return casCreated, nil
			}
			return casUpdated, nil
		}
	}
	return "", fmt.Errorf("%s kept changing under us; try again", key)
}
