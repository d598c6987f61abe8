package ctl

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

// TestConsoleServer: against a real etcd, the console's VMs page shows at most uiMaxRows rows and
// says how many match, filters on the server, answers only its own host, and takes actions only
// from its own pages.
func TestConsoleServer(t *testing.T) {
	srv := etcdtest.Start(t)
	c := etcdtest.NewClient(t, srv.Endpoints)
	sp := keys.MustSpace(keys.DefaultPrefix)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, _, err := herdctl(t, srv.Endpoints[0], "hw", "add", "52:54:00:00:00:01"); err != nil {
		t.Fatal(err)
	}
	for i := range uiMaxRows + 100 {
		if _, err := c.Put(ctx, sp.VMSpec(fmt.Sprintf("vm%04d", i)), `{"vcpus":1,"memory_mib":256}`); err != nil {
			t.Fatal(err)
		}
	}
	e := &env{opts: etcdutil.Options{Endpoints: srv.Endpoints, Prefix: keys.DefaultPrefix}, timeout: 10 * time.Second, out: io.Discard, errOut: io.Discard}
	if err := e.connect(); err != nil {
		t.Fatal(err)
	}
	defer e.close()
	u := newUI(e)
	rctx, stop := context.WithCancel(ctx)
	defer stop()
	go u.run(rctx)
	hs := httptest.NewServer(nil)
	defer hs.Close()
	hs.Config.Handler = u.handler(hs.Listener.Addr().String())

	get := func(path string) string {
		t.Helper()
		var body string
		deadline := time.Now().Add(10 * time.Second)
		for {
			resp, err := http.Get(hs.URL + path)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if body = string(b); !strings.Contains(body, "reading the cluster") || time.Now().After(deadline) {
				return body
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	page := get("/vms")
	if n := strings.Count(page, "<tr data-vm="); n != uiMaxRows || !strings.Contains(page, fmt.Sprintf("showing %d of %d matching VMs", uiMaxRows, uiMaxRows+100)) {
		t.Fatalf("%d rows shown", n)
	}
	if page := get("/vms?q=vm0042"); strings.Count(page, "<tr data-vm=") != 1 || strings.Contains(page, "showing") {
		t.Fatalf("filtered page:\n%s", page)
	}
	// A VM placed with an address on a network: its page shows it, and its disk (a spec of the old
	// one-disk form).
	if _, err := c.Put(ctx, sp.VMSpec("vm0007"), `{"vcpus":1,"memory_mib":256,"disk":{"pool":"default","size_gib":3}}`); err != nil {
		t.Fatal(err)
	}
	r, err := c.Get(ctx, sp.VMSpec("vm0007"))
	if err != nil {
		t.Fatal(err)
	}
	pl := keys.Placement{UID: r.Kvs[0].CreateRevision, Node: "52:54:00:00:00:01", Epoch: 1, MACs: []string{"52:54:00:0a:0b:0c"},
		NICs: []*keys.NIC{{Network: "prod", Bridge: "br0", Address: "10.20.0.17/24"}}}
	if _, err := c.Put(ctx, sp.Placement("vm0007"), keys.MustEncode(&pl)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for page := get("/vms/vm0007"); !strings.Contains(page, "<td>prod 10.20.0.17 (52:54:00:0a:0b:0c)</td>") || !strings.Contains(page, "<td>root 3GiB in pool default</td>"); page = get("/vms/vm0007") {
		if time.Now().After(deadline) {
			t.Fatalf("the VM's page shows no address or no disk:\n%s", page)
		}
		time.Sleep(100 * time.Millisecond)
	}

	req, _ := http.NewRequest("GET", hs.URL+"/vms", nil)
	req.Host = "rebind.example"
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusMisdirectedRequest {
		t.Fatalf("another host: %v %v", resp, err)
	}
	for _, h := range []map[string]string{{}, {"X-Herd-Action": "1"}, {"X-Herd-Action": "1", "Origin": "http://evil.example"}} {
		req, _ := http.NewRequest("POST", hs.URL+"/act", strings.NewReader("action=cordon&target=52:54:00:00:00:01"))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		for k, v := range h {
			req.Header.Set(k, v)
		}
		if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusForbidden {
			t.Fatalf("action with %v: %v %v", h, resp, err)
		}
	}
	// From its own page: the action runs (the node is cordoned by herdctl's own command).
	req, _ = http.NewRequest("POST", hs.URL+"/act", strings.NewReader("action=cordon&target=52:54:00:00:00:01"))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("X-Herd-Action", "1")
	req.Header.Set("Origin", hs.URL)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), "cordoned") {
		t.Fatalf("action from the page: %d %s", resp.StatusCode, b)
	}
	if r, err := c.Get(ctx, sp.NodeSpec("52:54:00:00:00:01")); err != nil || len(r.Kvs) != 1 || !strings.Contains(string(r.Kvs[0].Value), `"cordoned":true`) {
		t.Fatalf("node spec after cordon: %v %v", r, err)
	}

	// The images page (each bootserver's verdict) and the fencing page (the guard, the records),
	// live: written after the pages were first served.
	for k, v := range map[string]string{
		sp.Image("2026.12.1"):  `{"kernel":{"size":1048576},"initrd":{"size":2097152},"created":"2026-12-01T10:00:00Z"}`,
		sp.Image("2026.12.2"):  `{"kernel":{"size":1048576},"initrd":{"size":2097152},"created":"2026-12-02T10:00:00Z"}`,
		sp.ImageCurrent():      `{"version":"2026.12.2"}`,
		sp.Bootserver("boot1"): `{"url":"http://10.0.0.2:8080","images":{"2026.12.1":"ok","2026.12.2":"initrd checksum mismatch: refusing to serve"}}`,
		sp.Fence("52:54:00:00:00:07", "b-1"): `{"hwid":"52:54:00:00:00:07","boot_id":"b-1","phase":"fenced","method":"ceph-blocklist",` +
			`"started":"2026-12-03T10:00:00Z","updated":"2026-12-03T10:00:02Z","attempts":1,"details":{"addresses":"10.0.0.7"}}`,
		sp.LossGuard(): `{"nodes":["52:54:00:00:00:07","52:54:00:00:00:08"]}`,
	} {
		if _, err := c.Put(ctx, k, v); err != nil {
			t.Fatal(err)
		}
	}
	eventually := func(path string, want ...string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			page := get(path)
			missing := ""
			for _, w := range want {
				if !strings.Contains(page, w) {
					missing = w
				}
			}
			if missing == "" {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s lacks %q:\n%s", path, missing, page)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	eventually("/images", `data-image="2026.12.1"`, "current</span>", "initrd checksum mismatch: refusing to serve", "<td>1MiB</td>")
	eventually("/nodes/52:54:00:00:00:01", "<h2>node/52:54:00:00:00:01", "has not booted since it was enrolled", `data-action="uncordon"`, `<tr data-action="cordoned">`)
	eventually("/fences", "HELD: 2 nodes lost at once", "confirm the loss", `data-phase="fenced"`, "ceph-blocklist", "addresses=10.0.0.7")
}
