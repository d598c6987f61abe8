// Package scale is herd's scale rig: etcd, two coordinators and thousands of real agents (herd sim:
// many agents per process on in-memory hypervisors), each a process of its own so that each one's
// CPU and memory are measured apart. The small run is in `just test`; `just scale` runs it with
// the sizes of HERD_SCALE_NODES and HERD_SCALE_VMS_PER_NODE (docs/performance.md has the big runs).
package scale

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/e2e/rig"
	"github.com/herdhq/herd/lib/keys"
)

var bin rig.Binaries

func TestMain(m *testing.M) { rig.Main(m, "herd-scale-bin-", &bin) }

var space = keys.MustSpace(keys.DefaultPrefix)

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// usage is a process's resident memory and CPU time so far, from /proc.
func usage(pid int) (rssMiB int64, cpu time.Duration) {
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
				kib, _ := strconv.ParseInt(f[1], 10, 64)
				rssMiB = kib / 1024
			}
		}
	}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
		if len(f) > 12 {
			ut, _ := strconv.ParseInt(f[11], 10, 64)
			st, _ := strconv.ParseInt(f[12], 10, 64)
			cpu = time.Duration(ut+st) * time.Second / 100 // USER_HZ
		}
	}
	return rssMiB, cpu
}

// placementClock records when each VM's spec and first placement appeared, from two watches of
// their own prefixes: one watch of everything also carried every node's status writes, and fell
// behind by seconds in the bursts when the agents start their VMs, which the latency measured.
type placementClock struct {
	mu     sync.Mutex
	spec   map[string]time.Time
	placed map[string]time.Time
}

func watchPlacements(ctx context.Context, c *clientv3.Client) *placementClock {
	pc := &placementClock{spec: map[string]time.Time{}, placed: map[string]time.Time{}}
	for _, prefix := range []string{space.VMPrefix(), space.PlacementPrefix()} {
		wch := c.Watch(ctx, prefix, clientv3.WithPrefix(), clientv3.WithFilterDelete())
		go func() {
			for resp := range wch {
				now := time.Now()
				pc.mu.Lock()
				for _, ev := range resp.Events {
					key := string(ev.Kv.Key)
					if name, part, ok := space.ParseVM(key); ok && part == keys.VMPartSpec && ev.IsCreate() {
						pc.spec[name] = now
					} else if name, ok := keys.ParseVMName(space.PlacementPrefix(), key); ok {
						if _, seen := pc.placed[name]; !seen {
							pc.placed[name] = now
						}
					}
				}
				pc.mu.Unlock()
			}
		}()
	}
	return pc
}

func (pc *placementClock) isPlaced(name string) bool {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	_, ok := pc.placed[name]
	return ok
}

// latencies are spec-to-placement times of the VMs placed so far, sorted.
func (pc *placementClock) latencies() []time.Duration {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	var out []time.Duration
	for name, p := range pc.placed {
		if s, ok := pc.spec[name]; ok {
			out = append(out, p.Sub(s))
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

func pct(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	return d[min(len(d)-1, int(float64(len(d))*p))].Round(time.Millisecond)
}

// running counts, from one read, the VMs whose placement names a live node whose status for the
// VM, at the placement's uid and epoch, says running; and how many VMs are reported running by
// more than one node.
func running(t testing.TB, c *clientv3.Client) (placed, twice, total int) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	resp, err := c.Txn(ctx).Then(
		clientv3.OpGet(space.PlacementPrefix(), clientv3.WithPrefix()),
		clientv3.OpGet(space.StatusRoot(), clientv3.WithPrefix()),
		clientv3.OpGet(space.NodePrefix(), clientv3.WithPrefix(), clientv3.WithKeysOnly()),
		clientv3.OpGet(space.VMPrefix(), clientv3.WithPrefix(), clientv3.WithKeysOnly()),
	).Commit()
	if err != nil {
		t.Fatal(err)
	}
	alive := map[string]bool{}
	for _, kv := range resp.Responses[2].GetResponseRange().Kvs {
		if id, ok := keys.ParseLeaf(space.NodePrefix(), string(kv.Key)); ok {
			alive[id] = true
		}
	}
	runningOn := map[string][]string{}
	status := map[string]*keys.VMStatus{}
	for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
		hwid, name, ok := keys.ParseNodeScoped(space.StatusRoot(), string(kv.Key))
		if !ok || !alive[hwid] {
			continue
		}
		st, err := keys.Decode[keys.VMStatus](kv.Value)
		if err != nil || st.State != keys.StateRunning {
			continue
		}
		runningOn[name] = append(runningOn[name], hwid)
		status[hwid+"/"+name] = st
	}
	for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
		name, ok := keys.ParseVMName(space.PlacementPrefix(), string(kv.Key))
		if !ok {
			continue
		}
		pl, err := keys.Decode[keys.Placement](kv.Value)
		if err != nil {
			continue
		}
		if st := status[pl.Node+"/"+name]; st != nil && alive[pl.Node] && st.UID == pl.UID && st.Epoch == pl.Epoch {
			placed++
		}
	}
	for _, on := range runningOn {
		if len(on) > 1 {
			twice++
		}
	}
	for _, kv := range resp.Responses[3].GetResponseRange().Kvs {
		if _, part, ok := space.ParseVM(string(kv.Key)); ok && part == keys.VMPartSpec {
			total++
		}
	}
	return placed, twice, total
}

// TestScale: etcd, two coordinators, HERD_SCALE_NODES simulated nodes (default 500) in two sim
// processes, HERD_SCALE_VMS_PER_NODE VMs each (default 10) from one `herdctl vm apply`. Every VM
// runs exactly once; the leader killed with -9, the next leader places; then the smaller sim
// process (10% of the nodes) is killed: the mass-failure guard holds failover until an operator
// confirms the loss, and then every VM runs exactly once on the survivors. etcd's history shows
// no VM ever placed twice or reported running by two live nodes at one epoch. Timings and
// resources are logged, never asserted.
func TestScale(t *testing.T) {
	nodes := envInt("HERD_SCALE_NODES", 500)
	perNode := envInt("HERD_SCALE_VMS_PER_NODE", 10)
	lost := max(1, nodes/10)
	vms := nodes * perNode

	c := rig.NewCluster(t, bin)
	c.HistoryTimeout = 20 * time.Minute
	c.CommandTimeout = 15 * time.Minute
	cl := c.Client()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	clock := watchPlacements(ctx, cl)

	// The guard holds when more than 5% of the nodes are lost at once; a sim process's agents
	// share a few clients, and fencing is a command that succeeds (the nodes' "power" is the
	// process, already killed).
	c.CoordArgs = []string{"--session-ttl", "2s", "--grace", "1s", "--fence-exec", "true",
		"--mass-failure-fraction", "0.05", "--mass-failure-min", "2", "--reschedule-rate", "1000"}
	// The Go runtime's soft memory limit, as an operator sizing the leader would set it.
	if v := os.Getenv("HERD_SCALE_GOMEMLIMIT"); v != "" {
		c.CoordEnv = []string{"GOMEMLIMIT=" + v}
		t.Logf("coordinators run with GOMEMLIMIT=%s", v)
	}
	profiles := os.Getenv("HERD_SCALE_PPROF") // a directory: the leader's profiles are saved there
	if profiles != "" {
		c.CoordArgs = append(c.CoordArgs, "--pprof")
	}
	c.StartCoordinator()
	c.StartCoordinator()
	leader := c.Leader(30 * time.Second)

	// The simulated nodes' lease TTL. At 10,000 nodes on 2 cores, 9,000 agents in one process with
	// 5 s leases starve their own keepalives while etcd and the leader take the cores, and their
	// leases expire by the thousand (a storm the mass-failure guard rightly holds, which ends the
	// run's measurements); real agents each have a machine of their own.
	leaseTTL := cmp.Or(os.Getenv("HERD_SCALE_LEASE_TTL"), "5s")
	sim := func(set, n int) *rig.Proc {
		return rig.Start(t, c.Dir, fmt.Sprintf("sim-%d", set), bin.Herd, "sim", "--endpoints", c.Endpoint,
			"--nodes", strconv.Itoa(n), "--set", strconv.Itoa(set), "--clients", strconv.Itoa(max(1, n/250)),
			"--cpus", "64", "--memory", "256GiB", "--lease-ttl", leaseTTL, "--enrol", "--log-level", "warn")
	}
	start := time.Now()
	big := sim(1, nodes-lost)
	small := sim(2, lost)
	rig.Eventually(t, 10*time.Minute, "every node registered", func() error {
		resp, err := cl.Get(ctx, space.NodePrefix(), clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			return err
		}
		if resp.Count != int64(nodes) {
			return fmt.Errorf("%d of %d nodes", resp.Count, nodes)
		}
		return nil
	})
	t.Logf("%d nodes registered in %s", nodes, time.Since(start).Round(time.Millisecond))

	var b strings.Builder
	for i := range vms {
		fmt.Fprintf(&b, "name: s%06d\nvcpus: 1\nmemory_mib: 512\n---\n", i)
	}
	file := filepath.Join(c.Dir, "vms.yaml")
	if err := os.WriteFile(file, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	_, cpu0 := usage(leader.Pid())
	var profiled sync.WaitGroup
	if profiles != "" {
		profiled.Add(1)
		go func() {
			defer profiled.Done()
			saveProfile(t, leader, "profile?seconds=30", filepath.Join(profiles, "leader-placing-cpu.pprof"))
		}()
	}
	start = time.Now()
	applyArgs := []string{"vm", "apply", "-f", file, "--timeout", "30s"}
	if n := envInt("HERD_SCALE_MAX_PENDING", 0); n > 0 {
		// Admission control: the file queues in herdctl, not in etcd and the leader.
		applyArgs = append(applyArgs, "--max-pending", strconv.Itoa(n))
		t.Logf("vm apply --max-pending %d", n)
	}
	c.Herdctl(applyArgs...)
	applied := time.Since(start)
	rig.Eventually(t, 15*time.Minute, "every VM placed", func() error {
		if n := len(clock.latencies()); n < vms {
			return fmt.Errorf("%d of %d placed", n, vms)
		}
		return nil
	})
	placedAll := time.Since(start)
	lat := clock.latencies()
	rig.Eventually(t, 15*time.Minute, "every VM running", func() error {
		if ok, twice, total := running(t, cl); ok != vms || twice > 0 || total != vms {
			return fmt.Errorf("%d of %d running where placed, %d reported by two nodes", ok, total, twice)
		}
		return nil
	})
	ranAll := time.Since(start)
	// On a starved machine the election session can expire mid-run: the figures below are then
	// the first leader's, and everything after is measured on the one that leads now.
	if now := c.Leader(time.Minute); now != leader {
		t.Logf("LEADERSHIP MOVED during the apply (%s -> %s): the leader's figures below are %s's", leader.Name, now.Name, leader.Name)
	}
	rss, cpu1 := usage(leader.Pid())
	etcdRSS, _ := usage(c.Etcd.Pid())
	simRSS, _ := usage(big.Pid())
	t.Logf("%d VMs: apply %s (%.0f specs/s), all placed %s, all running %s; placement latency p50 %s p99 %s",
		vms, applied.Round(time.Millisecond), float64(vms)/applied.Seconds(), placedAll.Round(time.Millisecond),
		ranAll.Round(time.Millisecond), pct(lat, 0.5), pct(lat, 0.99))
	t.Logf("leader: %d MiB RSS, %s CPU while placing; etcd %d MiB; sim process of %d nodes %d MiB (%d KiB per node)",
		rss, (cpu1 - cpu0).Round(time.Millisecond), etcdRSS, nodes-lost, simRSS, simRSS*1024/int64(nodes-lost))
	lm := leader.Status + "/metrics"
	rounds, _ := rig.Metric(lm, "herd_coordinator_round_seconds_count")
	roundSum, _ := rig.Metric(lm, "herd_coordinator_round_seconds_sum")
	retries, _ := rig.Metric(lm, "herd_coordinator_batch_retries_total")
	conflicts, _ := rig.Metric(lm, "herd_coordinator_txn_conflicts_total")
	lists, _ := rig.Metric(lm, "herd_coordinator_cache_lists_total")
	t.Logf("leader: %.0f rounds that wrote, %.2f s each on average (observe to commit); %.0f batches retried action by action, %.0f conflicts; %.0f cache lists (16 at start)",
		rounds, roundSum/max(rounds, 1), retries, conflicts, lists)
	for _, kind := range []string{"full", "quick"} {
		n, _ := rig.Metric(lm, "herd_coordinator_rounds_total", `kind="`+kind+`"`)
		sum, _ := rig.Metric(lm, "herd_coordinator_decide_seconds_sum", `kind="`+kind+`"`)
		t.Logf("leader: %.0f %s rounds, observe and decide %.1f ms each on average", n, kind, 1000*sum/max(n, 1))
	}
	if body, err := rig.MetricLines(lm, "herd_coordinator_full_round_causes_total"); err == nil {
		t.Logf("leader: why rounds were full: %s", body)
	}
	profiled.Wait()

	if profiles != "" {
		saveProfile(t, leader, "heap", filepath.Join(profiles, "leader-heap.pprof"))
	}
	leader = c.Leader(time.Minute)
	// Steady state: what etcd serves with nothing changing.
	ranges0, _ := rig.Metric(c.MetricsURL, "grpc_server_handled_total", `grpc_method="Range"`)
	txns0, _ := rig.Metric(c.MetricsURL, "grpc_server_handled_total", `grpc_method="Txn"`)
	keep0, _ := rig.Metric(c.MetricsURL, "grpc_server_msg_received_total", `grpc_method="LeaseKeepAlive"`)
	_, lcpu0 := usage(leader.Pid())
	if profiles != "" {
		saveProfile(t, leader, "profile?seconds=20", filepath.Join(profiles, "leader-steady-cpu.pprof"))
	} else {
		time.Sleep(20 * time.Second)
	}
	ranges1, _ := rig.Metric(c.MetricsURL, "grpc_server_handled_total", `grpc_method="Range"`)
	txns1, _ := rig.Metric(c.MetricsURL, "grpc_server_handled_total", `grpc_method="Txn"`)
	keep1, _ := rig.Metric(c.MetricsURL, "grpc_server_msg_received_total", `grpc_method="LeaseKeepAlive"`)
	_, lcpu1 := usage(leader.Pid())
	t.Logf("steady state over 20 s: %.0f Range, %.1f Txn/s, %.0f lease keepalives/s, leader CPU %.1f%%",
		ranges1-ranges0, (txns1-txns0)/20, (keep1-keep0)/20, 100*(lcpu1-lcpu0).Seconds()/20)

	// Failover: the leader killed, the next one places a new VM.
	leader.Kill()
	start = time.Now()
	c.Herdctl("vm", "create", "after-failover", "--memory", "512MiB")
	rig.Eventually(t, 2*time.Minute, "a placement by the next leader", func() error {
		if !clock.isPlaced("after-failover") {
			return fmt.Errorf("not placed")
		}
		return nil
	})
	t.Logf("leader killed (-9) to the next placement: %s (session TTL 2 s)", time.Since(start).Round(time.Millisecond))
	c.StartCoordinator()
	vms++

	// 10% of the nodes die at once: the guard holds until confirmed. (etcd expires their leases
	// over a second or two: the first few to go are failed over as single losses, before the
	// guard's threshold is crossed.)
	small.Kill()
	start = time.Now()
	var guard *keys.LossGuard
	rig.Eventually(t, 5*time.Minute, "the mass-failure guard holds", func() error {
		resp, err := cl.Get(ctx, space.LossGuard())
		if err != nil || len(resp.Kvs) == 0 {
			return fmt.Errorf("no guard yet: %v", err)
		}
		if guard, err = keys.Decode[keys.LossGuard](resp.Kvs[0].Value); err != nil {
			return err
		}
		return nil
	})
	held := time.Since(start)
	rig.Eventually(t, 5*time.Minute, "every lost node's key gone", func() error {
		resp, err := cl.Get(ctx, space.NodePrefix(), clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil || resp.Count != int64(nodes-lost) {
			return fmt.Errorf("%d nodes: %v", resp.Count, err)
		}
		return nil
	})
	time.Sleep(5 * time.Second) // what the leader would do without the guard, it would have done
	if len(guard.Nodes) < lost/2 {
		t.Fatalf("the guard holds %d of %d lost nodes", len(guard.Nodes), lost)
	}
	// Until an operator confirms, the VMs of every lost node stay placed there and run nowhere,
	// except those of nodes lost before the guard's threshold was crossed, which may have been
	// fenced and moved already: they run where placed, on a live node.
	var lostIDs []string
	for i := range lost {
		lostIDs = append(lostIDs, fmt.Sprintf("02:%02x:00:%02x:%02x:%02x", 2, (i>>16)&0xff, (i>>8)&0xff, i&0xff))
	}
	heldVMs := 0
	rig.Eventually(t, 10*time.Minute, "every VM running where placed, or placed on a lost node", func() error {
		heldVMs = placedOn(t, cl, lostIDs)
		ok, twice, _ := running(t, cl)
		if reported := reportedRunning(t, cl); twice > 0 || reported != ok {
			t.Fatalf("with the guard holding: %d VMs reported running, %d of them where placed, %d twice", reported, ok, twice)
		}
		if ok+heldVMs != vms {
			return fmt.Errorf("%d running where placed, %d placed on lost nodes, of %d", ok, heldVMs, vms)
		}
		return nil
	})
	// Nodes lost after the guard was written join its list: it names every lost node that still
	// has VMs placed, so the operator confirms exactly what is held.
	first := len(guard.Nodes)
	if resp, err := cl.Get(ctx, space.LossGuard()); err != nil || len(resp.Kvs) == 0 {
		t.Fatalf("the guard went before confirmation: %v", err)
	} else if guard, err = keys.Decode[keys.LossGuard](resp.Kvs[0].Value); err != nil {
		t.Fatal(err)
	}
	listed := map[string]bool{}
	for _, id := range guard.Nodes {
		listed[id] = true
	}
	var killedListed []string
	for _, id := range lostIDs {
		if listed[id] {
			killedListed = append(killedListed, id)
		}
	}
	if n := placedOn(t, cl, killedListed); n != heldVMs {
		t.Fatalf("%d VMs placed on the killed nodes the guard lists, %d on all killed nodes: the guard misses some", n, heldVMs)
	}
	// On 2 cores the expiry storm can starve a surviving node's keepalives: its lease expires,
	// it is lost like the others (and registers again), and the guard rightly holds it too.
	t.Logf("the guard listed %d nodes when written, %d before confirmation (%d of them killed, %d survivors whose leases expired in the storm)",
		first, len(guard.Nodes), len(killedListed), len(guard.Nodes)-len(killedListed))
	leader = c.Leader(time.Minute)
	lm = leader.Status + "/metrics"
	full0, _ := rig.Metric(lm, "herd_coordinator_rounds_total", `kind="full"`)
	fullSum0, _ := rig.Metric(lm, "herd_coordinator_decide_seconds_sum", `kind="full"`)
	moves0, _ := rig.Metric(lm, "herd_coordinator_vm_moves_total")
	c.Herdctl("cluster", "confirm-loss")
	start = time.Now()
	// Where the time goes: the leader's moves (fenced first, then rate-limited), then the agents
	// starting the VMs. The leader's counters are cheap to poll; the check below reads the
	// whole keyspace.
	rig.Eventually(t, 15*time.Minute, "the leader moved every held VM", func() error {
		if n, err := rig.Metric(lm, "herd_coordinator_vm_moves_total"); err != nil || int(n-moves0) < heldVMs {
			return fmt.Errorf("%.0f of %d moved: %v", n-moves0, heldVMs, err)
		}
		return nil
	})
	movedIn := time.Since(start)
	full1, _ := rig.Metric(lm, "herd_coordinator_rounds_total", `kind="full"`)
	fullSum1, _ := rig.Metric(lm, "herd_coordinator_decide_seconds_sum", `kind="full"`)
	t.Logf("after confirm-loss: the leader moved %d VMs in %s, in %.0f full rounds (observe and decide %.2f s each on average)",
		heldVMs, movedIn.Round(time.Millisecond), full1-full0, (fullSum1-fullSum0)/max(full1-full0, 1))
	rig.Eventually(t, 15*time.Minute, "every VM running on the survivors", func() error {
		if ok, twice, total := running(t, cl); ok != vms || twice > 0 || total != vms {
			return fmt.Errorf("%d of %d running where placed, %d reported by two nodes", ok, total, twice)
		}
		return nil
	})
	t.Logf("%d of %d nodes killed: guard held after %s (on %d of them, %d VMs); after confirm-loss, every VM ran exactly once in %s",
		lost, nodes, held.Round(time.Millisecond), len(guard.Nodes), heldVMs, time.Since(start).Round(time.Millisecond))

	// History: never two placements at once, never two live reports of one epoch.
	checkHistory(t, c)
	db, _ := rig.Metric(c.MetricsURL, "etcd_mvcc_db_total_size_in_bytes")
	t.Logf("etcd database %.0f MiB: %.1f KiB per VM", db/(1<<20), db/1024/float64(vms))
}

// saveProfile saves one of the coordinator's Go profiles (--pprof) to file.
func saveProfile(t *testing.T, co *rig.Coordinator, which, file string) {
	resp, err := http.Get(co.Status + "/debug/pprof/" + which)
	if err != nil {
		t.Logf("profile %s: %v", which, err)
		return
	}
	defer resp.Body.Close()
	f, err := os.Create(file)
	if err != nil {
		t.Logf("profile %s: %v", which, err)
		return
	}
	defer f.Close()
	if _, err := io.Copy(f, resp.Body); err != nil {
		t.Logf("profile %s: %v", which, err)
	}
	t.Logf("saved %s", file)
}

// reportedRunning counts the VMs some live node reports running.
func reportedRunning(t testing.TB, c *clientv3.Client) int {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	resp, err := c.Txn(ctx).Then(
		clientv3.OpGet(space.StatusRoot(), clientv3.WithPrefix()),
		clientv3.OpGet(space.NodePrefix(), clientv3.WithPrefix(), clientv3.WithKeysOnly()),
	).Commit()
	if err != nil {
		t.Fatal(err)
	}
	alive := map[string]bool{}
	for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
		if id, ok := keys.ParseLeaf(space.NodePrefix(), string(kv.Key)); ok {
			alive[id] = true
		}
	}
	vms := map[string]bool{}
	for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
		hwid, name, ok := keys.ParseNodeScoped(space.StatusRoot(), string(kv.Key))
		if !ok || !alive[hwid] {
			continue
		}
		if st, err := keys.Decode[keys.VMStatus](kv.Value); err == nil && st.State == keys.StateRunning {
			vms[name] = true
		}
	}
	return len(vms)
}

// placedOn counts the VMs whose placement names one of hwids.
func placedOn(t testing.TB, c *clientv3.Client, hwids []string) int {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	resp, err := c.Get(ctx, space.PlacementPrefix(), clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	on := map[string]bool{}
	for _, h := range hwids {
		on[h] = true
	}
	n := 0
	for _, kv := range resp.Kvs {
		if pl, err := keys.Decode[keys.Placement](kv.Value); err == nil && on[pl.Node] {
			n++
		}
	}
	return n
}

// checkHistory replays every placement and status write: a VM's placement never changes node
// without a new epoch, and no two nodes report one VM running at the same epoch.
func checkHistory(t *testing.T, c *rig.Cluster) {
	t.Helper()
	if _, err := rig.ReplayPlacements(c.History(space.PlacementPrefix()), space); err != nil {
		t.Fatal(err)
	}
	runningAt := map[string]string{} // vm/epoch -> the node reporting it running
	reporting := map[string]string{} // node/vm -> vm/epoch it last reported running
	for _, ev := range c.History(space.StatusRoot()) {
		hwid, name, ok := keys.ParseNodeScoped(space.StatusRoot(), string(ev.Kv.Key))
		if !ok {
			continue
		}
		if prev, ok := reporting[hwid+"/"+name]; ok {
			delete(reporting, hwid+"/"+name)
			if runningAt[prev] == hwid {
				delete(runningAt, prev)
			}
		}
		if ev.Type != clientv3.EventTypePut {
			continue
		}
		st, err := keys.Decode[keys.VMStatus](ev.Kv.Value)
		if err != nil || st.State != keys.StateRunning {
			continue
		}
		k := fmt.Sprintf("%s/%d", name, st.Epoch)
		if other, ok := runningAt[k]; ok && other != hwid {
			t.Fatalf("vm %s epoch %d reported running by %s and %s at revision %d", name, st.Epoch, other, hwid, ev.Kv.ModRevision)
		}
		runningAt[k] = hwid
		reporting[hwid+"/"+name] = k
	}
}
