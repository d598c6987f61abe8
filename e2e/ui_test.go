package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/herdhq/herd/e2e/rig"
)

// TestConsoleInABrowser drives `herdctl ui` with Debian's chromium, headless: the VMs page shows a
// VM created with herdctl running without a reload (pushed by server-sent events), the overview
// counts it, and a request naming another host is refused (DNS rebinding). Screenshots go to
// $HERD_UI_SCREENSHOTS when set (`just ui-screenshots` writes docs/ui/).
func TestConsoleInABrowser(t *testing.T) {
	browser, err := exec.LookPath("chromium")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("chromium is missing (scripts/deps.sh installs it): the console's browser test cannot run")
		}
		t.Skip("chromium is not installed (scripts/deps.sh installs it)")
	}
	// As in production: TLS and RBAC; the console runs with an operator's certificate, and another
	// with a viewer's.
	c := rig.NewSecureCluster(t, bin)
	c.AgentArgs = []string{"--lease-ttl", "3s", "--resync", "2s"}
	c.CoordArgs = []string{"--session-ttl", "2s", "--strategy", "spread"}
	c.StartCoordinator()
	c.StartCoordinator()
	addImages(t, c.Herdctl, "v1", "v2")
	c.Herdctl("image", "set-current", "v1")
	// The nodes reboot through the firmware stand-in (a rollout restarts them on their new image).
	var mu sync.Mutex
	var fw *rig.Firmware
	start := func(hwid, image string) {
		mu.Lock()
		defer mu.Unlock()
		c.StartAgent(hwid, 8, 16384, "--image", image, "--reboot-command", fw.Command(hwid))
	}
	fw = rig.StartFirmware(t, func(hwid string) {
		c.Agents[hwid].Stop(10 * time.Second)
		start(hwid, rig.PinnedImage(t, c.Herdctl, hwid))
	})
	for _, id := range nodeIDs[:2] {
		start(id, "v1")
	}
	c.Herdctl("vm", "create", "before", "--memory", "256MiB", "--migration-policy", "restart")
	rig.Eventually(t, 30*time.Second, "a VM running", func() error { return allInState(c, []string{"before"}, "running") })

	opArgs := c.UserArgs("operator", "ui-operator")
	operator, ctx := startConsole(t, c, browser, opArgs)

	// The page, live: its event stream is open.
	if err := chromedp.Do(ctx, chromedp.Navigate(operator+"/vms"), chromedp.WaitVisible(`tr[data-vm="before"]`)); err != nil {
		t.Fatalf("open the VMs page: %v", err)
	}
	rig.Eventually(t, 10*time.Second, "the page's event stream open", func() error {
		if live, err := chromedp.Run(ctx, chromedp.Evaluate[bool](`document.getElementById('conn').classList.contains('ok')`)); err != nil || !live {
			return fmt.Errorf("not live (%v)", err)
		}
		return nil
	})
	// A marker that a reload would lose.
	if _, err := chromedp.Run(ctx, chromedp.Evaluate[int](`window.herdMarker = 42`)); err != nil {
		t.Fatal(err)
	}
	created := time.Now()
	c.Herdctl("vm", "create", "ui1", "--memory", "256MiB", "--migration-policy", "restart")
	rig.Eventually(t, 30*time.Second, "ui1 shown running", func() error {
		state, err := chromedp.Run(ctx, chromedp.Evaluate[string](`(function(){var r=document.querySelector('tr[data-vm="ui1"]');return r?r.dataset.state:''})()`))
		if err != nil || state != "running" {
			return fmt.Errorf("state %q (%v)", state, err)
		}
		return nil
	})
	t.Logf("ui1 shown running %s after herdctl vm create, without a reload", time.Since(created).Round(10*time.Millisecond))
	if marker, err := chromedp.Run(ctx, chromedp.Evaluate[int](`window.herdMarker || 0`)); err != nil || marker != 42 {
		t.Fatalf("the page was reloaded (marker %d, %v)", marker, err)
	}
	// The filter (the server's) narrows the table as one types, and the address keeps it.
	if err := chromedp.Do(ctx, chromedp.SendKeys(`#filter`, "ui1")); err != nil {
		t.Fatal(err)
	}
	rig.Eventually(t, 10*time.Second, "the table filtered", func() error {
		rows, err := chromedp.Run(ctx, chromedp.Evaluate[string](`Array.from(document.querySelectorAll('tbody tr')).map(r=>r.dataset.vm).join(',') + ' ' + location.search`))
		if err != nil || rows != "ui1 ?q=ui1" {
			return fmt.Errorf("%q (%v)", rows, err)
		}
		return nil
	})
	shot(t, ctx, "vms")

	// Stopped with herdctl, started from the page.
	c.Herdctl("vm", "stop", "ui1")
	if err := chromedp.Do(ctx, chromedp.WaitVisible(`tr[data-vm="ui1"][data-state="stopped"] button[data-action="start"]`),
		chromedp.Click(`tr[data-vm="ui1"] button[data-action="start"]`), chromedp.WaitVisible(`tr[data-vm="ui1"][data-state="running"]`)); err != nil {
		t.Fatalf("stop, then start from the page: %v", err)
	}

	// One VM's page: its state, node and spec, and its history from the events, live.
	if err := chromedp.Do(ctx, chromedp.Click(`a[href="/vms/ui1"]`), chromedp.WaitVisible(`section.vm[data-state="running"]`)); err != nil {
		t.Fatal(err)
	}
	rig.Eventually(t, 10*time.Second, "ui1's history", func() error {
		h, err := chromedp.Run(ctx, chromedp.Text(`table.events`))
		if err != nil || !strings.Contains(h, "started") {
			return fmt.Errorf("%q (%v)", h, err)
		}
		return nil
	})
	shot(t, ctx, "vm")

	if err := chromedp.Do(ctx, chromedp.Navigate(operator+"/"), chromedp.WaitVisible(`table.nodes`)); err != nil {
		t.Fatal(err)
	}
	overview, err := chromedp.Run(ctx, chromedp.Text(`section.cards`))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(overview, "running 2") || !strings.Contains(overview, "ready 2") {
		t.Fatalf("overview:\n%s", overview)
	}
	// A node with one 1-vCPU VM of 8 vCPUs: its CPU bar is an eighth full.
	if v, err := chromedp.Run(ctx, chromedp.Evaluate[float64](`document.querySelector('table.nodes meter').value`)); err != nil || v != 12 {
		t.Fatalf("CPU bar at %v%% (%v), want 12", v, err)
	}
	shot(t, ctx, "overview")

	// Cordon a node from the nodes page: herdctl's write, herdctl's event; the button turns into
	// uncordon as the change comes back.
	node := nodeIDs[1]
	if err := chromedp.Do(ctx, chromedp.Navigate(operator+"/nodes"), chromedp.WaitVisible(`table.nodes`),
		chromedp.Click(fmt.Sprintf(`tr[data-node="%s"] button[data-action="cordon"]`, node))); err != nil {
		t.Fatal(err)
	}
	rig.Eventually(t, 10*time.Second, "uncordon offered", func() error {
		n, err := chromedp.Run(ctx, chromedp.Evaluate[int](fmt.Sprintf(`document.querySelectorAll('tr[data-node="%s"] button[data-action="uncordon"]').length`, node)))
		if err != nil || n != 1 {
			return fmt.Errorf("%d (%v)", n, err)
		}
		return nil
	})
	if out := c.Herdctl("node", "get", node, "-o", "json"); !strings.Contains(out, `"cordoned": true`) {
		t.Fatalf("not cordoned:\n%s", out)
	}
	if ev := c.Herdctl("events", "--object", "node/"+node); !strings.Contains(ev, "cordon") || !strings.Contains(ev, "ui-operator") {
		t.Fatalf("no cordon event by the operator:\n%s", ev)
	}
	shot(t, ctx, "nodes")
	if err := chromedp.Do(ctx, chromedp.Navigate(operator+"/events?q=cordon"), chromedp.WaitVisible(`table.events`)); err != nil {
		t.Fatal(err)
	}
	rig.Eventually(t, 10*time.Second, "the cordon on the events page", func() error {
		h, err := chromedp.Run(ctx, chromedp.Text(`table.events`))
		if err != nil || !strings.Contains(h, "node/"+node) || !strings.Contains(h, "ui-operator") {
			return fmt.Errorf("%q (%v)", h, err)
		}
		return nil
	})
	shot(t, ctx, "events")

	// One node's page with its VMs, the image catalogue with the nodes running each version, and
	// the fencing page.
	beforeNode := c.VMs()["before"].Placement.Node
	for _, p := range []struct{ path, sel, want, name string }{
		{"/nodes/" + beforeNode, `tr[data-vm="before"]`, "Boot id", "node"},
		{"/images", `tr[data-image="v1"]`, "v1", "images"},
		{"/fences", `table.fences`, "automatic", "fences"},
	} {
		if err := chromedp.Do(ctx, chromedp.Navigate(operator+p.path), chromedp.WaitVisible(p.sel)); err != nil {
			t.Fatalf("open %s: %v", p.path, err)
		}
		if txt, err := chromedp.Run(ctx, chromedp.Text(`#live`)); err != nil || !strings.Contains(txt, p.want) {
			t.Fatalf("%s: %q (%v)", p.path, txt, err)
		}
		shot(t, ctx, p.name)
	}

	// Approve a machine that tried to boot.
	mac := "52:54:00:00:0b:01"
	c.Etcdctl("put", space.Discovered(mac), fmt.Sprintf(`{"v":1,"mac":%q,"first_seen":"2026-12-04T00:00:00Z","last_seen":"2026-12-04T00:00:00Z","attempts":3}`, mac))
	if err := chromedp.Do(ctx, chromedp.Navigate(operator+"/hardware"), chromedp.WaitVisible(fmt.Sprintf(`tr[data-mac="%s"]`, mac))); err != nil {
		t.Fatal(err)
	}
	shot(t, ctx, "hardware")
	if err := chromedp.Do(ctx, chromedp.Click(fmt.Sprintf(`tr[data-mac="%s"] button[data-action="approve"]`, mac))); err != nil {
		t.Fatal(err)
	}
	rig.Eventually(t, 10*time.Second, "the machine enrolled", func() error {
		if out := c.Herdctl("hw", "list"); !strings.Contains(out, mac) {
			res, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`document.getElementById('result').textContent`))
			return fmt.Errorf("%s\nthe page says: %s", out, res)
		}
		return nil
	})

	// A rollout, watched on the overview: its progress bar moves node by node to the end. (The
	// machine approved above never boots here: it leaves the allow-list, or the rollout would wait
	// for it.)
	c.Herdctl("hw", "rm", mac)
	c.Herdctl("node", "uncordon", node)
	if err := chromedp.Do(ctx, chromedp.Navigate(operator+"/"), chromedp.WaitVisible(`table.nodes`)); err != nil {
		t.Fatal(err)
	}
	c.Herdctl("rollout", "start", "--image", "v2", "--max-unavailable", "1", "--node-timeout", "2m")
	seen := map[float64]bool{}
	rig.Eventually(t, 120*time.Second, "the rollout done on the page", func() error {
		v, err := chromedp.Run(ctx, chromedp.Evaluate[string](`(function(){var m=document.getElementById('rollout-progress');
			return m ? m.value + ' ' + document.querySelector('section.rollout h2 .state').textContent + ' ' + document.querySelector('section.rollout').textContent : 'none'})()`))
		if err != nil {
			return err
		}
		var done float64
		var state string
		if _, err := fmt.Sscan(v, &done, &state); err == nil {
			seen[done] = true
		}
		if state != "done" {
			return fmt.Errorf("%s", v)
		}
		return nil
	})
	if !seen[1] || !seen[2] {
		t.Fatalf("the progress bar went through %v, want 1 and 2 of 2 nodes", seen)
	}
	t.Logf("rollout progress seen on the page: %v", seen)

	// A viewer: the same pages without a button, and an action asked for by hand is etcd's to
	// refuse, and it does, with herdctl's words.
	viewerArgs := c.UserArgs("viewer", "ui-viewer")
	viewer, vctx := startConsole(t, c, browser, viewerArgs)
	if err := chromedp.Do(vctx, chromedp.Navigate(viewer+"/nodes"), chromedp.WaitVisible(`table.nodes`)); err != nil {
		t.Fatal(err)
	}
	if n, err := chromedp.Run(vctx, chromedp.Evaluate[int](`document.querySelectorAll('button').length`)); err != nil || n != 0 {
		t.Fatalf("a viewer's page has %d buttons (%v)", n, err)
	}
	forged, err := chromedp.Run(vctx, chromedp.Evaluate[string](fmt.Sprintf(`fetch('/act', {method: 'POST', headers: {'X-Herd-Action': '1'},
		body: new URLSearchParams({action: 'cordon', target: %q})}).then(r => r.text().then(t => r.status + ' ' + t))`, node),
		chromedp.EvalAwaitPromise))
	if err != nil || !strings.HasPrefix(forged, "409") || !strings.Contains(forged, "permission denied") {
		t.Fatalf("a viewer's forged action: %q (%v)", forged, err)
	}
	if out := c.Herdctl("node", "get", node, "-o", "json"); strings.Contains(out, `"cordoned": true`) {
		t.Fatalf("a viewer cordoned a node:\n%s", out)
	}
	checkSerialConsoleRoles(t, c, "before", opArgs, viewerArgs)
	// Another site's page cannot act (no Origin of ours, no header a form can set), nor read
	// (a request for another host name is refused: DNS rebinding).
	for _, x := range []struct {
		args []string
		want string
	}{
		{[]string{"-X", "POST", "-H", "Origin: http://evil.example", "-d", "action=uncordon&target=" + node, operator + "/act"}, "403"},
		{[]string{"-H", "Host: rebind.example", operator + "/vms"}, "421"},
	} {
		out, err := exec.Command("curl", append([]string{"-s", "-o", "/dev/null", "-w", "%{http_code}"}, x.args...)...).Output()
		if err != nil || string(out) != x.want {
			t.Fatalf("curl %v: %s (%v), want %s", x.args, out, err, x.want)
		}
	}
}

// startConsole runs `herdctl ui` with etcd flags and a headless chromium for it, both stopped at
// the end of the test; it returns the console's base URL and the browser's context.
func startConsole(t *testing.T, c *rig.Cluster, browser string, etcdArgs []string) (string, context.Context) {
	base, ctx, _ := startConsoleProc(t, c, browser, etcdArgs)
	return base, ctx
}

// startConsoleProc is startConsole that also returns the console's process.
func startConsoleProc(t *testing.T, c *rig.Cluster, browser string, etcdArgs []string) (string, context.Context, *rig.Proc) {
	port := rig.FreePort(t)
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	name := fmt.Sprintf("herdctl-ui-%d", port)
	p := rig.Start(t, c.Dir, name, bin.Herdctl, append([]string{"ui", "--listen", fmt.Sprintf("127.0.0.1:%d", port)}, etcdArgs...)...)
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(browser), chromedp.NoSandbox,
		chromedp.Flag("headless", true), chromedp.WindowSize(1280, 900), chromedp.UserDataDir(filepath.Join(c.Dir, name+"-chromium")))
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	bctx, cancelBrowser := chromedp.NewContext(actx)
	ctx, cancel := context.WithTimeout(bctx, 3*time.Minute)
	t.Cleanup(func() { cancel(); cancelBrowser(); cancelAlloc() })
	rig.Eventually(t, 10*time.Second, "the console serving", func() error {
		out, err := exec.Command("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", base+"/static/herd.css").Output()
		if err != nil || string(out) != "200" {
			return fmt.Errorf("%s (%v)", out, err)
		}
		return nil
	})
	return base, ctx, p
}

// shot saves a screenshot of the page to $HERD_UI_SCREENSHOTS/NAME.png when that is set.
func shot(t *testing.T, ctx context.Context, name string) {
	dir := os.Getenv("HERD_UI_SCREENSHOTS")
	if dir == "" {
		return
	}
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot %s: %v", name, err)
	}
	if err := os.WriteFile(filepath.Join(dir, name+".png"), png, 0o644); err != nil {
		t.Fatal(err)
	}
}

// checkSerialConsoleRoles: `herdctl vm console` reaches the agent's TLS endpoint, which serves with
// the node's own certificate, lets the caller's role decide, and admits an attach only with a
// console ticket etcd let the caller write (the node reads it with its own credentials). The test
// driver has no guest to type into (e2e/qemu types into real ones): an operator gets that far and
// is told so. An operator deleted from etcd still holds a valid certificate, and gets nowhere.
func checkSerialConsoleRoles(t *testing.T, c *rig.Cluster, vm string, opArgs, viewerArgs []string) {
	hwid := c.VMs()[vm].Placement.Node
	crt, key := c.NodeCert(hwid)
	nodeArgs := []string{"--endpoints", c.Endpoint, "--cacert", filepath.Join(c.PKI, "ca.crt"), "--cert", crt, "--key", key}
	goneArgs := c.UserArgs("operator", "gone-operator")
	rootCrt, rootKey := c.RootCert()
	if out, errOut, code := c.EtcdctlAs(rootCrt, rootKey, "user", "delete", "gone-operator"); code != 0 {
		t.Fatalf("etcdctl user delete: %s%s", out, errOut)
	}
	for _, x := range []struct {
		who       string
		args, cmd []string
		want      string
	}{
		{"viewer", viewerArgs, []string{"vm", "console", vm}, "etcd refused the console ticket"},
		{"viewer", viewerArgs, []string{"vm", "console", vm, "--log"}, "has no console log on this node"},
		{"operator", opArgs, []string{"vm", "console", vm}, "no interactive serial console"},
		{"the VM's own node", nodeArgs, []string{"vm", "console", vm, "--log"}, "may not use consoles"},
		{"an operator deleted from etcd", goneArgs, []string{"vm", "console", vm}, "permission denied"},
	} {
		out, errOut, code := c.Run(c.Bin.Herdctl, append(append([]string{}, x.args...), x.cmd...)...)
		if code == 0 || !strings.Contains(errOut, x.want) {
			t.Fatalf("%s: herdctl %s: exit %d, want %q:\n%s%s", x.who, strings.Join(x.cmd, " "), code, x.want, out, errOut)
		}
	}
	if url := c.Herdctl("node", "get", hwid, "-o", "json"); !strings.Contains(url, `"console_url": "https://127.0.0.1:`) {
		t.Fatalf("the node advertises no TLS console endpoint:\n%s", url)
	}
}
