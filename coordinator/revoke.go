package coordinator

import (
	"context"
	"fmt"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/rbac"
)

// revokeInterval is how often the leader looks for node users whose hardware is gone, besides at
// once when it sees a hardware record deleted (the periodic pass catches what a new leader missed).
const revokeInterval = 30 * time.Second

// revokeLoop deletes the etcd user and role of every node whose hardware record was removed, so
// `herdctl hw rm` revokes a node at once rather than when its certificate expires. It runs only
// where user administration is allowed (Config.RevokeNodeUsers: the coordinator is root).
func (c *Coordinator) revokeLoop(ctx context.Context) {
	t := time.NewTicker(revokeInterval)
	defer t.Stop()
	retry := etcdutil.Backoff{Min: 500 * time.Millisecond, Max: revokeInterval}
	for {
		if err := c.revokeOrphanUsers(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			// A credential that should be dead must not live a whole interval longer because of
			// one failed call (a timeout, auth data changing under the token): retry soon.
			c.log.Warn("cannot check node users; retrying", "error", err)
			if !retry.Wait(ctx) {
				return
			}
			continue
		}
		retry.Reset()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-c.revokeNow:
		}
	}
}

// onHardware wakes the scheduling round on any change and the revocation on a deletion.
func (c *Coordinator) onHardware(key string, prev, cur *etcdutil.KV) {
	c.poke(key, prev, cur)
	if cur == nil {
		select {
		case c.revokeNow <- struct{}{}:
		default:
		}
	}
}

func (c *Coordinator) revokeOrphanUsers(ctx context.Context) error {
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	users, err := c.cfg.Client.UserList(cctx)
	if err != nil {
		return fmt.Errorf("list etcd users: %w", err)
	}
	for _, u := range users.Users {
		hwid, ok := strings.CutPrefix(u, rbac.NodeUser(""))
		if !ok || c.hwInf.Get(c.space.Hardware(hwid)) != nil {
			continue
		}
		// The cache may lag a hardware record added a moment ago, just before its node joined:
		// only a linearizable read may condemn a user.
		hw, err := c.cfg.Client.Get(cctx, c.space.Hardware(hwid), clientv3.WithCountOnly())
		if err != nil {
			return fmt.Errorf("read hardware %s: %w", hwid, err)
		}
		if hw.Count > 0 {
			continue
		}
		if err := rbac.DeleteNode(cctx, c.cfg.Client, hwid); err != nil {
			return err
		}
		c.log.Info("revoked node credentials: its hardware record is gone", "hwid", hwid, "user", u)
		c.events.Record("node/"+hwid, "revoked", "etcd user %s deleted: hardware record removed", u)
	}
	return nil
}
