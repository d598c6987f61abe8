package ctl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
	"github.com/herdhq/herd/lib/keys"
)

// TestApplyManySpecs: a file of many specs is written in batches, every VM exactly as the file says;
// applying it again changes nothing; a member only the stored spec has is kept; a batch whose key
// someone else wrote between its read and its write is redone key by key, losing neither write.
func TestApplyManySpecs(t *testing.T) {
	srv := etcdtest.Start(t)
	ep := srv.Endpoints[0]
	c := etcdtest.NewClient(t, srv.Endpoints)
	sp := keys.MustSpace(keys.DefaultPrefix)
	ctx := context.Background()

	const n = 1000
	write := func(mem int) string {
		var b strings.Builder
		for i := range n {
			fmt.Fprintf(&b, "name: vm-%04d\nvcpus: 1\nmemory_mib: %d\n---\n", i, mem)
		}
		f := filepath.Join(t.TempDir(), "vms.yaml")
		if err := os.WriteFile(f, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
		return f
	}
	count := func(out, what string) int { return strings.Count(out, " "+what+"\n") }

	f := write(64)
	out, errOut, err := herdctl(t, ep, "vm", "apply", "-f", f)
	if err != nil || count(out, "created") != n || !strings.Contains(errOut, fmt.Sprintf("%d created, 0 configured, 0 unchanged of %d", n, n)) {
		t.Fatalf("first apply: %v %s\n%s", err, errOut, out[:min(len(out), 300)])
	}
	resp, err := c.Get(ctx, sp.VMPrefix(), clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil || resp.Count != n {
		t.Fatalf("%d keys under the VMs after applying %d specs: %v", resp.Count, n, err)
	}
	one, _ := c.Get(ctx, sp.VMSpec("vm-0777"))
	if s, err := keys.Decode[keys.VMSpec](one.Kvs[0].Value); err != nil || s.MemoryMiB != 64 || s.VCPUs != 1 {
		t.Fatalf("vm-0777: %+v %v", s, err)
	}

	if out, _, err = herdctl(t, ep, "vm", "apply", "-f", f); err != nil || count(out, "unchanged") != n {
		t.Fatalf("second apply: %v\n%s", err, out[:min(len(out), 300)])
	}

	// A member this herdctl does not know, set by someone else: kept through a change.
	if _, err := c.Put(ctx, sp.VMSpec("vm-0005"), `{"v":1,"vcpus":1,"memory_mib":64,"future":"x"}`); err != nil {
		t.Fatal(err)
	}
	// Someone writes a VM of a batch between its read and its write: the batch is redone.
	var race sync.Once
	raced := false
	applyRace = func(b []specDoc) { // batches run at once: only one of them holds vm-0500
		for _, d := range b {
			if d.name == "vm-0500" {
				race.Do(func() {
					raced = true
					if _, err := c.Put(ctx, sp.VMSpec("vm-0500"), `{"v":1,"vcpus":3,"memory_mib":64,"other":"y"}`); err != nil {
						t.Error(err)
					}
				})
			}
		}
	}
	t.Cleanup(func() { applyRace = nil })
	f = write(128)
	if out, _, err = herdctl(t, ep, "vm", "apply", "-f", f); err != nil || count(out, "configured") != n {
		t.Fatalf("third apply: %v\n%s", err, out[:min(len(out), 300)])
	}
	if !raced {
		t.Fatal("the race never ran")
	}
	for name, member := range map[string]string{"vm-0005": "future", "vm-0500": "other"} {
		got, _ := c.Get(ctx, sp.VMSpec(name))
		s, err := keys.Decode[keys.VMSpec](got.Kvs[0].Value)
		if err != nil || s.MemoryMiB != 128 || s.VCPUs != 1 || s.Extra[member] == nil {
			t.Fatalf("%s after apply: %s %v", name, got.Kvs[0].Value, err)
		}
	}
}

// TestPagedClusterRead: listings read in pages at one revision show every VM once, as one read did.
func TestPagedClusterRead(t *testing.T) {
	srv := etcdtest.Start(t)
	ep := srv.Endpoints[0]
	var b strings.Builder
	for i := range 250 {
		fmt.Fprintf(&b, "name: vm-%04d\nvcpus: 1\nmemory_mib: 64\n---\n", i)
	}
	f := filepath.Join(t.TempDir(), "vms.yaml")
	if err := os.WriteFile(f, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := herdctl(t, ep, "vm", "apply", "-f", f); err != nil {
		t.Fatal(err)
	}
	whole, _, err := herdctl(t, ep, "vm", "list", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	defer func(p int64) { readPage = p }(readPage)
	readPage = 7
	paged, _, err := herdctl(t, ep, "vm", "list", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	if paged != whole || strings.Count(paged, `"name": "vm-`) != 250 {
		t.Fatalf("paged read differs: %d VMs paged, %d whole", strings.Count(paged, `"name": "vm-`), strings.Count(whole, `"name": "vm-`))
	}
}

// TestTimeoutHint: a timeout blames etcd only when etcd is silent.
func TestTimeoutHint(t *testing.T) {
	srv := etcdtest.Start(t)
	for _, tc := range []struct {
		endpoint string
		answers  bool
	}{{srv.Endpoints[0], true}, {"http://127.0.0.1:1", false}} {
		root, e := newRoot(&strings.Builder{}, &strings.Builder{})
		root.SetArgs([]string{"--endpoints", tc.endpoint, "--timeout", "1ns", "vm", "list"})
		err := root.Execute()
		if err == nil || !strings.Contains(err.Error(), "deadline") {
			t.Fatalf("%s: %v", tc.endpoint, err)
		}
		if got := e.etcdAnswers(); got != tc.answers {
			t.Fatalf("%s: etcd answers %v, want %v", tc.endpoint, got, tc.answers)
		}
		e.close()
	}
}

// TestNodeScopedRead: `vm list --node` and `node get`, which read one node's keys, show what the
// whole-cluster read shows for that node; a VM the node reports but is placed elsewhere is listed
// on both nodes, as the operator needs to see it.
func TestNodeScopedRead(t *testing.T) {
	srv := etcdtest.Start(t)
	ep := srv.Endpoints[0]
	c := etcdtest.NewClient(t, srv.Endpoints)
	sp := keys.MustSpace(keys.DefaultPrefix)
	ctx := context.Background()
	nodes := []string{"52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:00:00:00:03"}
	for _, hw := range nodes {
		if _, err := c.Put(ctx, sp.Node(hw), keys.MustEncode(&keys.Node{HWID: hw, BootID: "b-" + hw, CPUs: 64, MemoryMiB: 1 << 18})); err != nil {
			t.Fatal(err)
		}
	}
	placed := map[string][]string{}
	for i := range 90 {
		name, hw := fmt.Sprintf("vm-%03d", i), nodes[i%3]
		put, err := c.Put(ctx, sp.VMSpec(name), keys.MustEncode(&keys.VMSpec{VCPUs: 1, MemoryMiB: 64}))
		if err != nil {
			t.Fatal(err)
		}
		uid := put.Header.Revision
		pl := keys.Placement{UID: uid, Node: hw, Epoch: 1, UUID: "6f1b8d4e-3c2a-4b5d-9e8f-0a1b2c3d4e5f", VCPUs: 1, MemoryMiB: 64, Since: time.Now()}
		st := keys.VMStatus{UID: uid, Epoch: 1, State: keys.StateRunning, Since: time.Now()}
		if _, err := c.Txn(ctx).Then(clientv3.OpPut(sp.Placement(name), keys.MustEncode(&pl)),
			clientv3.OpPut(sp.Assign(hw, name), keys.MustEncode(&keys.Assignment{UID: uid, Epoch: 1, UUID: pl.UUID})),
			clientv3.OpPut(sp.Status(hw, name), keys.MustEncode(&st))).Commit(); err != nil {
			t.Fatal(err)
		}
		placed[hw] = append(placed[hw], name)
	}
	// vm-000 (placed on node 1) is also reported by node 3: a stray the leader will withdraw.
	if _, err := c.Put(ctx, sp.Status(nodes[2], "vm-000"), keys.MustEncode(&keys.VMStatus{UID: 1, Epoch: 1, State: keys.StateRunning})); err != nil {
		t.Fatal(err)
	}
	defer func(p int64) { readPage = p }(readPage)
	readPage = 7

	listNames := func(args ...string) []string {
		t.Helper()
		out, _, err := herdctl(t, ep, append([]string{"vm", "list", "-o", "json"}, args...)...)
		if err != nil {
			t.Fatal(err)
		}
		var vms []vmView
		if err := json.Unmarshal([]byte(out), &vms); err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, vm := range vms {
			if vm.State != keys.StateRunning || vm.Placement == nil {
				t.Fatalf("%s: %+v", vm.Name, vm)
			}
			names = append(names, vm.Name+"@"+vm.Placement.Node)
		}
		return names
	}
	whole, _, err := herdctl(t, ep, "node", "list", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var all []map[string]any
	if err := json.Unmarshal([]byte(whole), &all); err != nil {
		t.Fatal(err)
	}
	for i, hw := range nodes {
		var want []string
		for _, name := range placed[hw] {
			want = append(want, name+"@"+hw)
		}
		if i == 2 {
			want = append([]string{"vm-000@" + nodes[0]}, want...)
		}
		if got := listNames("--node", hw); strings.Join(got, " ") != strings.Join(want, " ") {
			t.Fatalf("vm list --node %s:\n got %v\nwant %v", hw, got, want)
		}
		one, _, err := herdctl(t, ep, "node", "get", hw, "-o", "json")
		if err != nil {
			t.Fatal(err)
		}
		var got map[string]any
		if err := json.Unmarshal([]byte(one), &got); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, all[i]) {
			t.Fatalf("node get %s differs from node list:\n%v\n%v", hw, got, all[i])
		}
	}
	if _, _, err := herdctl(t, ep, "vm", "list", "--node", "52:54:00:00:00:99"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("an unknown node: %v", err)
	}
}

// TestApplyPacedToTheLeader: with --max-pending, at most that many of the VMs an apply created
// wait for the leader at any time (a stand-in leader places each spec it sees after a while and
// counts those it has seen and not yet placed); with no leader, the apply notes the stall and
// writes the rest.
func TestApplyPacedToTheLeader(t *testing.T) {
	srv := etcdtest.Start(t)
	ep := srv.Endpoints[0]
	c := etcdtest.NewClient(t, srv.Endpoints)
	sp := keys.MustSpace(keys.DefaultPrefix)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	write := func(prefix string, n int) string {
		var b strings.Builder
		for i := range n {
			fmt.Fprintf(&b, "name: %s-%04d\nvcpus: 1\nmemory_mib: 64\n---\n", prefix, i)
		}
		f := filepath.Join(t.TempDir(), "vms.yaml")
		if err := os.WriteFile(f, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
		return f
	}

	const n, bound = 600, 100
	var mu sync.Mutex
	unplaced, most := map[string]bool{}, 0
	leader := make(chan struct{})
	go func() {
		defer close(leader)
		wch := c.Watch(ctx, sp.VMPrefix(), clientv3.WithPrefix())
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case wr := <-wch:
				mu.Lock()
				for _, ev := range wr.Events {
					if name, part, ok := sp.ParseVM(string(ev.Kv.Key)); ok && part == keys.VMPartSpec {
						unplaced[name] = true
					}
				}
				most = max(most, len(unplaced))
				mu.Unlock()
			case <-tick.C:
				// Place up to 10 every 20 ms: 500/s, slower than apply writes.
				mu.Lock()
				var ops []clientv3.Op
				for name := range unplaced {
					if len(ops) == 10 {
						break
					}
					ops = append(ops, clientv3.OpPut(sp.Placement(name), `{"v":1,"uid":1,"node":"52:54:00:00:00:01","epoch":1}`))
					delete(unplaced, name)
				}
				mu.Unlock()
				if len(ops) > 0 {
					if _, err := c.Txn(ctx).Then(ops...).Commit(); err != nil && ctx.Err() == nil {
						t.Error(err)
					}
				}
			}
		}
	}()
	if out, errOut, err := herdctl(t, ep, "vm", "apply", "-f", write("paced", n), "--max-pending", fmt.Sprint(bound)); err != nil || strings.Count(out, " created\n") != n {
		t.Fatalf("paced apply: %v %s\n%s", err, errOut, out[:min(len(out), 300)])
	}
	mu.Lock()
	seen := most
	mu.Unlock()
	if seen > bound {
		t.Fatalf("the leader saw %d of the apply's VMs waiting at once, bound %d", seen, bound)
	}
	if seen < bound/2 {
		t.Fatalf("the leader never saw more than %d waiting: the apply was not pushing against its bound of %d", seen, bound)
	}
	cancel()
	<-leader

	// No leader: the apply notes the stall and finishes.
	defer func(d time.Duration) { pacerStall = d }(pacerStall)
	pacerStall = 300 * time.Millisecond
	out, errOut, err := herdctl(t, ep, "vm", "apply", "-f", write("alone", 300), "--max-pending", "100")
	if err != nil || strings.Count(out, " created\n") != 300 || !strings.Contains(errOut, "decided none of this apply's VMs") {
		t.Fatalf("apply with no leader: %v\n%s\n%s", err, errOut, out[:min(len(out), 300)])
	}
}
