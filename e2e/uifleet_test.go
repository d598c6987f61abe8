package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/e2e/rig"
	"github.com/herdhq/herd/lib/keys"
)

// TestConsoleAtFleetSize measures the console in a real browser at fleet size: 1,000 nodes and
// 10,000 running VMs written straight into etcd (the console only reads keys: who wrote them does
// not matter to it), the VMs page's first screen, then live updates while new VMs arrive placed
// and running at 100 per second, each named to sort first so that it lands on the visible page.
// The browser records when each new VM first shows running; the lag from the write must not grow
// (the browser keeps up) and every VM must show. A measurement for `just bench` (docs/performance.md).
func TestConsoleAtFleetSize(t *testing.T) {
	if os.Getenv("HERD_UI_FLEET") == "" {
		t.Skip("a measurement: set HERD_UI_FLEET=1 (just bench runs it)")
	}
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is missing (scripts/deps.sh installs it)")
	}
	c := rig.NewCluster(t, bin)
	cli := c.Client()
	sp := keys.MustSpace(keys.DefaultPrefix)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	const nodes, vms = 1000, 10000
	hwid := func(i int) string { return fmt.Sprintf("52:54:00:%02x:%02x:%02x", i>>16&0xff, i>>8&0xff, i&0xff) }
	var ops []clientv3.Op
	flush := func() {
		t.Helper()
		if len(ops) == 0 {
			return
		}
		if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
			t.Fatal(err)
		}
		ops = ops[:0]
	}
	for i := range nodes {
		nd := &keys.Node{HWID: hwid(i), BootID: "b", CPUs: 64, MemoryMiB: 262144, Image: "v1", Started: time.Now(), LibvirtURI: "test:///default"}
		ops = append(ops, clientv3.OpPut(sp.Node(nd.HWID), keys.MustEncode(nd)))
		if len(ops) == 100 {
			flush()
		}
	}
	flush()
	// place writes n VMs named by name(i), placed and running: the specs first (their create
	// revision is the VMs' uid), then placement and status.
	place := func(from, n int, name func(int) string) {
		t.Helper()
		for i := from; i < from+n; i++ {
			ops = append(ops, clientv3.OpPut(sp.VMSpec(name(i)), keys.MustEncode(&keys.VMSpec{VCPUs: 1, MemoryMiB: 1024})))
		}
		resp, err := cli.Txn(ctx).Then(ops...).Commit()
		if err != nil {
			t.Fatal(err)
		}
		ops = ops[:0]
		uid := resp.Header.Revision
		for i := from; i < from+n; i++ {
			node := hwid(i % nodes)
			ops = append(ops,
				clientv3.OpPut(sp.Placement(name(i)), keys.MustEncode(&keys.Placement{UID: uid, Node: node, Epoch: 1, UUID: fmt.Sprintf("00000000-0000-4000-8000-%012d", i), VCPUs: 1, MemoryMiB: 1024})),
				clientv3.OpPut(sp.Status(node, name(i)), keys.MustEncode(&keys.VMStatus{UID: uid, Epoch: 1, State: keys.StateRunning, Since: time.Now()})))
		}
		flush()
	}
	start := time.Now()
	for i := 0; i < vms; i += 50 {
		place(i, 50, func(i int) string { return fmt.Sprintf("vm%05d", i) })
	}
	t.Logf("%d nodes and %d running VMs written in %s", nodes, vms, time.Since(start).Round(time.Millisecond))

	base, bctx, uiProc := startConsoleProc(t, c, browser, []string{"--endpoints", c.Endpoint})
	uiPid := uiProc.Pid()
	// Warm the console's caches (its first list), then measure a fresh page load.
	rig.Eventually(t, 60*time.Second, "the console read the cluster", func() error {
		out, _ := exec.Command("curl", "-s", base+"/vms").Output()
		if !strings.Contains(string(out), `data-vm="vm00000"`) {
			return fmt.Errorf("not yet")
		}
		return nil
	})
	t0 := time.Now()
	if err := chromedp.Do(bctx, chromedp.Navigate(base+"/vms"), chromedp.WaitVisible(`tr[data-vm="vm00499"]`)); err != nil {
		t.Fatal(err)
	}
	firstScreen := time.Since(t0)
	timing, err := chromedp.Run(bctx, chromedp.Evaluate[map[string]float64](`(function () {
		var n = performance.getEntriesByType('navigation')[0];
		var p = performance.getEntriesByName('first-contentful-paint')[0];
		return {response: n.responseEnd, dom: n.domContentLoadedEventEnd, paint: p ? p.startTime : -1, bytes: n.transferSize,
			rows: document.querySelectorAll('tr[data-vm]').length};
	})()`))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("VMs page, first screen of %d VMs: visible %s after navigate; in the browser: response end %.0f ms, DOM ready %.0f ms, first paint %.0f ms, %.0f KB, %.0f rows",
		vms, firstScreen.Round(time.Millisecond), timing["response"], timing["dom"], timing["paint"], timing["bytes"]/1024, timing["rows"])
	if timing["rows"] != 500 {
		t.Fatalf("first screen has %.0f rows, want 500", timing["rows"])
	}

	// Watch the page: when each new VM first shows running, how many updates arrive, how long
	// the browser is busy.
	if _, err := chromedp.Run(bctx, chromedp.Evaluate[bool](`(function () {
		window.__seen = {}; window.__updates = 0; window.__long = 0;
		try { new PerformanceObserver(function (l) { l.getEntries().forEach(function (e) { window.__long += e.duration; }); }).observe({type: 'longtask'}); } catch (e) {}
		new MutationObserver(function () {
			window.__updates++;
			var now = Date.now();
			document.querySelectorAll('#live tr[data-state="running"]').forEach(function (r) {
				var n = r.dataset.vm;
				if (n.charAt(0) === 'a' && !(n in window.__seen)) window.__seen[n] = now;
			});
		}).observe(document.getElementById('live'), {childList: true});
		return true;
	})()`)); err != nil {
		t.Fatal(err)
	}
	const rate, seconds = 100, 20
	written := map[string]int64{}
	name := func(i int) string { return fmt.Sprintf("a%05d", 99999-i) } // newest first on the page
	cpu0 := procCPU(uiPid)
	load := time.Now()
	for tick := 0; tick < rate*seconds/10; tick++ {
		next := load.Add(time.Duration(tick) * 100 * time.Millisecond)
		time.Sleep(time.Until(next))
		place(tick*10, 10, name)
		now := time.Now().UnixMilli()
		for i := tick * 10; i < tick*10+10; i++ {
			written[name(i)] = now
		}
	}
	loadTook := time.Since(load)
	var seen map[string]float64
	rig.Eventually(t, 30*time.Second, "the browser shows the last VM running", func() error {
		seen, err = chromedp.Run(bctx, chromedp.Evaluate[map[string]float64](`window.__seen`))
		if err != nil {
			return err
		}
		if _, ok := seen[name(rate*seconds-1)]; !ok {
			return fmt.Errorf("%d of %d seen", len(seen), rate*seconds)
		}
		return nil
	})
	cpu := procCPU(uiPid) - cpu0
	stats, _ := chromedp.Run(bctx, chromedp.Evaluate[map[string]float64](`({updates: window.__updates, long: window.__long})`))
	var early, late, all []float64
	for n, w := range written {
		s, ok := seen[n]
		if !ok {
			continue // replaced on the page by newer VMs before an update showed it: coalesced
		}
		lag := s - float64(w)
		all = append(all, lag)
		if w-written[name(0)] < 5000 {
			early = append(early, lag)
		} else if written[name(rate*seconds-1)]-w < 5000 {
			late = append(late, lag)
		}
	}
	q := func(xs []float64, p float64) float64 {
		if len(xs) == 0 {
			return -1
		}
		sort.Float64s(xs)
		return xs[min(len(xs)-1, int(p*float64(len(xs))))]
	}
	t.Logf("%d VMs written at %d/s in %s; the browser got %.0f updates (%.1f/s), showed %d of them running (any other was pushed off the first screen between two updates); "+
		"lag write -> shown: p50 %.0f ms, p99 %.0f ms, max %.0f ms; first 5 s p50 %.0f ms, last 5 s p50 %.0f ms; browser long tasks %.0f ms in total; console CPU %s (%s of a core), RSS %s",
		rate*seconds, rate, loadTook.Round(time.Millisecond), stats["updates"], stats["updates"]/loadTook.Seconds(), len(all),
		q(all, 0.5), q(all, 0.99), q(all, 1), q(early, 0.5), q(late, 0.5), stats["long"], cpu.Round(10*time.Millisecond),
		fmt.Sprintf("%.0f%%", 100*cpu.Seconds()/loadTook.Seconds()), procRSS(uiPid))
	if q(late, 0.5) > 4*q(early, 0.5)+1000 {
		t.Fatalf("the browser fell behind: lag p50 %.0f ms in the first 5 s, %.0f ms in the last", q(early, 0.5), q(late, 0.5))
	}
}

// procCPU is a process's user+system CPU time so far.
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	var ut, st int64
	fmt.Sscan(f[11], &ut)
	fmt.Sscan(f[12], &st)
	return time.Duration(ut+st) * 10 * time.Millisecond // USER_HZ 100
}

// procRSS is a process's resident set size, as /proc says it.
func procRSS(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			return strings.TrimSpace(strings.TrimPrefix(l, "VmRSS:"))
		}
	}
	return "?"
}
