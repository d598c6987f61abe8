package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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
	c := rig.NewCluster(t, bin)
	c.AgentArgs = []string{"--lease-ttl", "3s", "--resync", "2s"}
	c.CoordArgs = []string{"--session-ttl", "2s", "--strategy", "spread"}
	c.StartCoordinator()
	c.StartCoordinator()
	for _, id := range nodeIDs[:2] {
		c.StartAgent(id, 8, 16384)
	}
	c.Herdctl("vm", "create", "before", "--memory", "256MiB")
	rig.Eventually(t, 30*time.Second, "a VM running", func() error { return allInState(c, []string{"before"}, "running") })

	port := rig.FreePort(t)
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	rig.Start(t, c.Dir, "herdctl-ui", bin.Herdctl, "ui", "--endpoints", c.Endpoint, "--listen", fmt.Sprintf("127.0.0.1:%d", port))

	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(browser), chromedp.NoSandbox,
		chromedp.Flag("headless", true), chromedp.WindowSize(1280, 900), chromedp.UserDataDir(filepath.Join(c.Dir, "chromium")))
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelAlloc()
	bctx, cancelBrowser := chromedp.NewContext(actx)
	defer cancelBrowser()
	ctx, cancel := context.WithTimeout(bctx, 2*time.Minute)
	defer cancel()

	// The page, live: its event stream is open.
	if err := chromedp.Do(ctx, chromedp.Navigate(base+"/vms"), chromedp.WaitVisible(`tr[data-vm="before"]`)); err != nil {
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
	c.Herdctl("vm", "create", "ui1", "--memory", "256MiB")
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
	// The filter narrows the table as one types.
	if err := chromedp.Do(ctx, chromedp.SendKeys(`#filter`, "ui1")); err != nil {
		t.Fatal(err)
	}
	if shown, err := chromedp.Run(ctx, chromedp.Evaluate[int](`Array.from(document.querySelectorAll('tbody tr')).filter(r=>!r.hidden).length`)); err != nil || shown != 1 {
		t.Fatalf("filtered rows: %d (%v)", shown, err)
	}
	shot(t, ctx, "vms")

	if err := chromedp.Do(ctx, chromedp.Navigate(base+"/"), chromedp.WaitVisible(`table.nodes`)); err != nil {
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
	if err := chromedp.Do(ctx, chromedp.Navigate(base+"/nodes"), chromedp.WaitVisible(`table.nodes`)); err != nil {
		t.Fatal(err)
	}
	shot(t, ctx, "nodes")

	// Another host name: refused (a page elsewhere must not read the cluster through this server).
	out, err := exec.Command("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", fmt.Sprintf("Host: rebind.example:%d", port), base+"/vms").Output()
	if err != nil || string(out) != "421" {
		t.Fatalf("a request for another host: %s (%v)", out, err)
	}
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
