package e2e

import (
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/e2e/rig"
	"github.com/herdhq/herd/lib/keys"
)

// TestSoak is `just soak DURATION` (HERD_SOAK_DURATION; 45 s in `just test`): random faults while
// VMs are created, deleted and moved, then the history checks. Faults: kill -9 of an agent (a
// node's power loss; it comes back as a new boot), SIGSTOP of an agent (a node cut off: its lease
// expires, the fencer powers it off, it comes back as a new boot), a network partition of a node
// from etcd (nftables drops its own lane's packets for 1-9 s while its guests run on: a short one
// heals before the fencer acts, a long one is fenced first), kill -9 and restart of a
// coordinator, kill -9 and restart of one etcd member of three. The fencer kills the fenced boot's
// agent process, which holds its test-driver domains: a fenced node runs nothing, as after a BMC
// power-off. At the end: every VM runs exactly once, and the whole history never had two runnable
// assignments of a VM, two nodes reporting one VM epoch running, a placement moving without a new
// epoch, or a VM moving off a node before that node's boot was fenced.
func TestSoak(t *testing.T) {
	dur := 45 * time.Second
	if s := os.Getenv("HERD_SOAK_DURATION"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			t.Fatalf("HERD_SOAK_DURATION: %v", err)
		}
		dur = d
	}
	seed := time.Now().UnixNano()
	if s := os.Getenv("HERD_SOAK_SEED"); s != "" {
		if _, err := fmt.Sscan(s, &seed); err != nil {
			t.Fatalf("HERD_SOAK_SEED: %v", err)
		}
	}
	rng := rand.New(rand.NewSource(seed))
	t.Logf("soak for %s, seed %d", dur, seed)

	// Every node reaches etcd by its own lane, so that it alone can be cut off (a partition).
	c, members := rig.NewCluster3Lanes(t, bin, len(nodeIDs))
	c.AgentEndpoints = map[string]string{}
	for i, id := range nodeIDs {
		c.AgentEndpoints[id] = c.Lane(i)
	}
	pids := filepath.Join(c.Dir, "pids")
	if err := os.MkdirAll(pids, 0o755); err != nil {
		t.Fatal(err)
	}
	// The fencer powers the fenced boot off: it kills that boot's agent (and with it the domains
	// its test driver holds), checking the pid still belongs to that boot.
	fencer := fmt.Sprintf(`p=$(cat %[1]s/"$HERD_BOOT_ID" 2>/dev/null) || exit 0
if tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null | grep -q -- "$HERD_BOOT_ID"; then kill -9 "$p"; fi
echo "powered off $HERD_HWID boot $HERD_BOOT_ID"`, pids)
	c.AgentArgs = []string{"--lease-ttl", "3s", "--resync", "2s"}
	c.CoordArgs = []string{"--session-ttl", "2s", "--grace", "2s", "--fence-exec", fencer,
		"--mass-failure-min", "3", "--mass-failure-window", "20s"}
	coords := []*rig.Coordinator{c.StartCoordinator(), c.StartCoordinator()}
	start := func(hwid string) {
		boot := uuid.NewString()
		a := c.StartAgent(hwid, 16, 32768, "--boot-id", boot)
		if err := os.WriteFile(filepath.Join(pids, boot), []byte(fmt.Sprint(a.Pid())), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range nodeIDs {
		start(id)
	}
	c.Leader(30 * time.Second)

	var mu sync.Mutex
	alive := map[string]bool{}
	n := 0
	create := func() {
		name := fmt.Sprintf("soak%03d", n)
		n++
		if _, errOut, code := c.Run(bin.Herdctl, "vm", "create", name, "--memory", "256MiB", "--migration-policy", "restart"); code != 0 {
			t.Logf("create %s: %s", name, strings.TrimSpace(errOut))
			return
		}
		mu.Lock()
		alive[name] = true
		mu.Unlock()
	}
	for range 8 {
		create()
	}

	// Sample every answering agent's libvirt: a VM must never run on two at once. A stopped agent
	// does not answer; its domains are fenced (powered off) before anything moves.
	var twice []string
	samples := 0
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(250 * time.Millisecond):
			}
			// One sample is every agent asked at once; a sample that took longer than a move can
			// (a stopped agent holds its answer back) says nothing about one instant: dropped.
			where := map[string][]string{}
			var wmu sync.Mutex
			var qg sync.WaitGroup
			began := time.Now()
			for hwid, a := range c.Agents {
				qg.Add(1)
				go func() {
					defer qg.Done()
					doms, err := a.Domains()
					if err != nil {
						return
					}
					wmu.Lock()
					defer wmu.Unlock()
					for _, d := range doms {
						if d.Managed && d.State == "running" {
							where[d.Name] = append(where[d.Name], hwid)
						}
					}
				}()
			}
			qg.Wait()
			if time.Since(began) > 500*time.Millisecond {
				continue
			}
			mu.Lock()
			samples++
			for name, on := range where {
				if len(on) > 1 && len(twice) < 10 {
					twice = append(twice, fmt.Sprintf("%s on %v", name, on))
				}
			}
			mu.Unlock()
		}
	}()
	defer func() { close(stop); wg.Wait() }()

	faults := map[string]int{}
	type pending struct {
		at time.Time
		do func()
	}
	var later []pending
	down := map[string]bool{} // agents and members that are out until a pending restart
	// A node the fencer powered off is powered on again, as its BMC or an operator would.
	powerOn := func() {
		for _, hwid := range nodeIDs {
			if !down[hwid] && !c.Agents[hwid].Running() {
				faults["fenced and booted again"]++
				t.Logf("%s agent %s was powered off by the fencer: booting again", time.Now().Format(time.TimeOnly), hwid)
				start(hwid)
			}
		}
	}
	end := time.Now().Add(dur)
	for time.Now().Before(end) {
		powerOn()
		now := time.Now()
		var keep []pending
		for _, p := range later {
			if now.After(p.at) {
				p.do()
			} else {
				keep = append(keep, p)
			}
		}
		later = keep
		switch k := rng.Intn(11); {
		case k < 3: // load
			mu.Lock()
			var names []string
			for name := range alive {
				names = append(names, name)
			}
			mu.Unlock()
			sort.Strings(names)
			switch {
			case len(names) < 6 || rng.Intn(3) == 0:
				create()
			case rng.Intn(2) == 0:
				name := names[rng.Intn(len(names))]
				// A delete that timed out may have committed: either way it is no longer
				// required to exist (the end checks what exists).
				_, _, _ = c.Run(bin.Herdctl, "vm", "delete", name)
				mu.Lock()
				delete(alive, name)
				mu.Unlock()
			default:
				_, _, _ = c.Run(bin.Herdctl, "vm", "migrate", names[rng.Intn(len(names))])
			}
			faults["load"]++
		case k < 5: // a node loses power, and boots again later
			hwid := nodeIDs[rng.Intn(len(nodeIDs))]
			if down[hwid] || countDown(down, nodeIDs) >= 1 {
				continue
			}
			c.Agents[hwid].Kill()
			down[hwid] = true
			faults["agent kill -9"]++
			t.Logf("%s agent %s kill -9", time.Now().Format(time.TimeOnly), hwid)
			later = append(later, pending{now.Add(time.Duration(2+rng.Intn(6)) * time.Second), func() { start(hwid); delete(down, hwid) }})
		case k < 6: // a node is cut off: the fencer powers it off; it boots again later (or here)
			hwid := nodeIDs[rng.Intn(len(nodeIDs))]
			if down[hwid] || countDown(down, nodeIDs) >= 1 {
				continue
			}
			a := c.Agents[hwid]
			_ = a.Signal(syscall.SIGSTOP)
			down[hwid] = true
			faults["agent SIGSTOP"]++
			t.Logf("%s agent %s SIGSTOP (pid %d)", time.Now().Format(time.TimeOnly), hwid, a.Pid())
			later = append(later, pending{now.Add(time.Duration(6+rng.Intn(6)) * time.Second), func() {
				a.Kill() // fenced by now, or power-cycled by the operator: either way a new boot
				t.Logf("%s agent %s (pid %d) killed, booting again", time.Now().Format(time.TimeOnly), hwid, a.Pid())
				start(hwid)
				delete(down, hwid)
			}})
		case k < 7: // a node is partitioned from etcd: its guests run on; a short cut heals in
			// time, a long one gets it fenced (powered off) first
			i := rng.Intn(len(nodeIDs))
			hwid := nodeIDs[i]
			if down[hwid] || countDown(down, nodeIDs) >= 1 {
				continue
			}
			heal := c.CutLane(i)
			down[hwid] = true
			cut := time.Duration(1+rng.Intn(9)) * time.Second
			faults["node partitioned"]++
			t.Logf("%s agent %s partitioned from etcd for %s", time.Now().Format(time.TimeOnly), hwid, cut)
			later = append(later, pending{now.Add(cut), func() {
				heal()
				t.Logf("%s agent %s partition healed", time.Now().Format(time.TimeOnly), hwid)
				delete(down, hwid)
			}})
		case k < 9: // a coordinator dies and is restarted
			i := rng.Intn(len(coords))
			coords[i].Kill()
			faults["coordinator kill -9"]++
			time.Sleep(time.Duration(rng.Intn(2000)) * time.Millisecond)
			coords[i] = c.StartCoordinator() // a new replica takes the dead one's place
		default: // an etcd member dies and comes back
			m := members[rng.Intn(len(members))]
			if down[m.Name] {
				continue
			}
			m.Kill()
			down[m.Name] = true
			faults["etcd member kill -9"]++
			later = append(later, pending{now.Add(time.Duration(2+rng.Intn(5)) * time.Second), func() { m.Restart(t, c); delete(down, m.Name) }})
		}
		time.Sleep(time.Duration(300+rng.Intn(1200)) * time.Millisecond)
	}
	for _, p := range later {
		p.do()
	}
	total := 0
	for _, v := range faults {
		total += v
	}
	t.Logf("faults: %v (%d events, load included)", faults, total)
	for hwid, a := range c.Agents {
		st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", a.Pid()))
		t.Logf("agent %s pid %d running %v: %.60s", hwid, a.Pid(), a.Running(), st)
	}

	// Converge: every VM that exists runs exactly once (a create or delete that timed out may
	// or may not have committed: what exists is the truth), and every VM created for sure and never
	// deleted exists.
	mu.Lock()
	var sure []string
	for name := range alive {
		sure = append(sure, name)
	}
	mu.Unlock()
	sort.Strings(sure)
	var names []string
	rig.Eventually(t, 3*time.Minute, "every VM running after the faults", func() error {
		powerOn()
		vms := c.VMs()
		for _, name := range sure {
			if _, ok := vms[name]; !ok {
				return fmt.Errorf("%s was created and never deleted, and is gone", name)
			}
		}
		names = names[:0]
		for name := range vms {
			names = append(names, name)
		}
		sort.Strings(names)
		if out := strings.TrimSpace(c.Herdctl("cluster", "show")); strings.Contains(out, "HELD") {
			c.Herdctl("cluster", "confirm-loss")
		}
		if err := allInState(c, names, "running"); err != nil {
			return err
		}
		where := runningOn(t, c)
		for _, name := range names {
			if len(where[name]) != 1 {
				return fmt.Errorf("%s runs on %v", name, where[name])
			}
		}
		return nil
	})
	mu.Lock()
	t.Logf("%d samples of the nodes' libvirt", samples)
	if len(twice) > 0 {
		t.Errorf("a VM ran on two nodes at once: %v", twice)
	}
	mu.Unlock()
	assertOneRunnableAssignment(t, c)
	assertNeverRunningTwice(t, c)
	if _, err := rig.ReplayPlacements(c.History(space.PlacementPrefix()), space); err != nil {
		t.Error(err)
	}
	assertFencedBeforeMoved(t, c)
}

func countDown(down map[string]bool, ids []string) int {
	n := 0
	for _, id := range ids {
		if down[id] {
			n++
		}
	}
	return n
}

// assertFencedBeforeMoved replays placements and fence records together: a placement that leaves
// a node other than by a migration it committed needs a fence record of that node in phase fenced
// at an earlier revision.
func assertFencedBeforeMoved(t *testing.T, c *rig.Cluster) {
	t.Helper()
	evs := append(c.History(space.PlacementPrefix()), c.History(space.FenceRoot())...)
	sort.SliceStable(evs, func(i, j int) bool { return evs[i].Kv.ModRevision < evs[j].Kv.ModRevision })
	fenced := map[string]bool{} // hwid -> a fenced record has existed
	last := map[string]*keys.Placement{}
	moves := 0
	for _, ev := range evs {
		key := string(ev.Kv.Key)
		if hwid, _, ok := keys.ParseNodeScoped(space.FenceRoot(), key); ok {
			if ev.Type == clientv3.EventTypePut {
				if f, err := keys.Decode[keys.Fence](ev.Kv.Value); err == nil && f.Phase == keys.FenceFenced {
					fenced[hwid] = true
				}
			}
			continue
		}
		name, ok := keys.ParseVMName(space.PlacementPrefix(), key)
		if !ok {
			continue
		}
		if ev.Type == clientv3.EventTypeDelete {
			delete(last, name)
			continue
		}
		pl, err := keys.Decode[keys.Placement](ev.Kv.Value)
		if err != nil {
			t.Fatal(err)
		}
		if prev := last[name]; prev != nil && prev.UID == pl.UID && prev.Node != pl.Node {
			committed := prev.Migration != nil && prev.Migration.To == pl.Node
			if !committed && !fenced[prev.Node] {
				t.Errorf("at revision %d vm %s moved %s -> %s without a migration and before %s was fenced", ev.Kv.ModRevision, name, prev.Node, pl.Node, prev.Node)
			}
			moves++
		}
		last[name] = pl
	}
	t.Logf("%d moves replayed against the fence records", moves)
}
