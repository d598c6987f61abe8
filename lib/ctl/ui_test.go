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
}
