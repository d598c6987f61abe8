package schema

import (
	"context"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

var space = keys.MustSpace("/herd")

// v1 is a schema-1 keyspace as herd wrote it before the authority split (values copied from a
// cluster of that herd): a placed VM with a problem, an operator's cordon and drain, a rollout under
// way with a node it cordoned, a disk marked for purging.
var v1 = map[string]string{
	"/herd/cluster":                                    `{"v":1,"id":"c88b5714","created":"2026-11-25T12:55:00Z","pools":["default"]}`,
	"/herd/vms/web1/spec":                              `{"v":1,"vcpus":1,"memory_mib":512}`,
	"/herd/vms/web1/placement":                         `{"v":1,"uid":16,"node":"n1","epoch":2,"uuid":"6f1b8d4e","spec_rev":16,"vcpus":1,"memory_mib":512,"since":"2026-11-25T12:55:03Z"}`,
	"/herd/vms/web1/problem":                           `{"v":1,"uid":16,"kind":"migration-failed","message":"migration to n2 failed: x","since":"2026-11-25T12:55:08Z"}`,
	"/herd/vms/web2/spec":                              `{"v":1,"vcpus":1,"memory_mib":512}`,
	"/herd/nodestate/n1":                               `{"v":1,"cordoned":true,"reason":"RAM errors","since":"2026-11-25T13:00:00Z","image":"v1","boot_id":"b1","lease":77}`,
	"/herd/nodestate/n2":                               `{"v":1,"cordoned":true,"reason":"rollout 20261125-01367a to v2","since":"2026-11-25T13:00:00Z","image":"v2","boot_id":"b2","draining":true,"drained":true}`,
	"/herd/nodestate/n3":                               `{"v":1,"cordoned":true,"reason":"drain","draining":true,"drained":false,"boot_id":"b3"}`,
	"/herd/nodestate/n4":                               `{"v":1,"boot_id":"b4","lease":5}`,
	"/herd/rollout":                                    `{"v":1,"id":"20261125-01367a","image":"v2","max_unavailable":1,"nodes":["n1","n2"],"node_timeout_seconds":900,"state":"paused","reason":"node n2: did not come back","by":"herdctl/alice@ops1","started":"2026-11-25T16:01:00Z","updated":"2026-11-25T16:01:09Z","per_node":{"n2":{"phase":"rebooting","boot_id":"b2","attempt":1,"prev_image":"v1","was_cordoned":false,"error":"did not come back"}}}`,
	"/herd/volumes/rbd/web9.40":                        `{"v":1,"vm":"web9","uid":40,"size_gib":10,"state":"ready","updated":"2026-11-25T12:55:00Z","purge":true}`,
	"/herd/volumes/rbd/web1.16":                        `{"v":1,"vm":"web1","uid":16,"size_gib":10,"state":"ready","updated":"2026-11-25T12:55:00Z"}`,
	"/herd/events/20261125T125503.000000000Z-ab12cd34": `{"v":1,"time":"2026-11-25T12:55:03Z","actor":"coordinator/c1","object":"vm/web1","action":"placed"}`,
}

func TestUpgradeFromSchema1(t *testing.T) {
	c := etcdtest.Client(t)
	ctx := context.Background()
	for k, v := range v1 {
		if _, err := c.Put(ctx, k, v); err != nil {
			t.Fatal(err)
		}
	}
	l, err := c.Put(ctx, "/herd/leader/1", "c1")
	if err != nil {
		t.Fatal(err)
	}
	g := etcdutil.Guard{Key: "/herd/leader/1", Rev: l.Header.Revision}
	n, err := Upgrade(ctx, c, space, g, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("rewrote %d keys", n)
	get := func(key string) string {
		t.Helper()
		resp, err := c.Get(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Kvs) == 0 {
			return ""
		}
		return string(resp.Kvs[0].Value)
	}
	want := map[string]string{
		"/herd/vms/web1/placement":         "",
		"/herd/vms/web1/problem":           "",
		"/herd/placements/web1":            `"node":"n1","epoch":2`,
		"/herd/problems/web1":              `"kind":"migration-failed"`,
		"/herd/nodespec/n1":                `"cordoned":true,"reason":"RAM errors"`,
		"/herd/nodestate/n1":               `"image":"v1"`,
		"/herd/nodestate/n2":               `"rollout":"20261125-01367a"`,
		"/herd/nodespec/n2":                "",
		"/herd/nodespec/n3":                `"drain":true`,
		"/herd/nodespec/n4":                "",
		"/herd/rollout":                    `"state":"paused"`,
		"/herd/rolloutstatus":              `"phase":"rebooting"`,
		"/herd/requests/purge/rbd/web9.40": `"by":"schema upgrade"`,
		"/herd/requests/purge/rbd/web1.16": "",
		"/herd/cluster":                    `"schema":2`,
	}
	for key, w := range want {
		got := get(key)
		if (w == "") != (got == "") || !strings.Contains(got, w) {
			t.Errorf("%s = %q, want it to hold %q", key, got, w)
		}
	}
	for key, gone := range map[string][]string{
		"/herd/nodestate/n1":        {"cordoned", "reason"},
		"/herd/nodestate/n2":        {"cordoned", "draining"},
		"/herd/rollout":             {"per_node", "reason"},
		"/herd/volumes/rbd/web9.40": {"purge"},
		"/herd/rolloutstatus":       {"was_cordoned"},
	} {
		for _, f := range gone {
			if strings.Contains(get(key), `"`+f+`"`) {
				t.Errorf("%s still holds %s: %s", key, f, get(key))
			}
		}
	}
	// Every value decodes and validates as schema 2.
	if r, err := keys.Decode[keys.Rollout]([]byte(get("/herd/rollout"))); err != nil || r.Validate() != nil {
		t.Errorf("rollout request: %v %v", err, r.Validate())
	}
	if st, err := keys.Decode[keys.RolloutStatus]([]byte(get("/herd/rolloutstatus"))); err != nil || st.Per["n2"].Error == "" {
		t.Errorf("rollout status: %v %+v", err, st)
	}
	// The old event stays (it expires by itself); nothing else was touched.
	if get("/herd/events/20261125T125503.000000000Z-ab12cd34") == "" || get("/herd/vms/web2/spec") == "" {
		t.Error("the upgrade touched keys it should not")
	}
	// A second run (a new leader) has nothing to do.
	head, _ := c.Get(ctx, "/", clientv3.WithCountOnly())
	if n, err := Upgrade(ctx, c, space, g, hclog.NewNullLogger()); err != nil || n != 0 {
		t.Fatalf("second upgrade: %d keys, %v", n, err)
	}
	if again, _ := c.Get(ctx, "/", clientv3.WithCountOnly()); again.Header.Revision != head.Header.Revision {
		t.Fatal("the second upgrade wrote")
	}
	// A deposed leader's upgrade writes nothing.
	if _, err := c.Delete(ctx, "/herd/leader/1"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Put(ctx, "/herd/vms/web3/placement", `{"v":1,"uid":9,"node":"n1","epoch":1}`); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Put(ctx, "/herd/cluster", strings.Replace(get("/herd/cluster"), `"schema":2`, `"schema":1`, 1)); err != nil {
		t.Fatal(err)
	}
	if _, err := Upgrade(ctx, c, space, g, hclog.NewNullLogger()); err == nil {
		t.Fatal("a deposed leader upgraded")
	}
	if get("/herd/placements/web3") != "" {
		t.Fatal("a deposed leader moved a placement")
	}
}
