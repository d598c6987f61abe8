package bootserver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/bootserver/dhcp"
	"github.com/herdhq/herd/bootserver/httpboot"
	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
	"github.com/herdhq/herd/lib/images"
	"github.com/herdhq/herd/lib/join"
	"github.com/herdhq/herd/lib/keys"
)

var space = keys.MustSpace("/herd")

type rig struct {
	t      *testing.T
	c      *clientv3.Client
	dir    string
	srv    *httptest.Server
	b      *backend
	cancel context.CancelFunc
}

func newRig(t *testing.T) *rig {
	c := etcdtest.Client(t)
	dir := t.TempDir()
	store := images.NewStore(dir)
	b := newBackend(c, space, "bs1", store, hclog.NewNullLogger(), 0)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { b.run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	if err := b.synced(ctx); err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	r := &rig{t: t, c: c, dir: dir, b: b, cancel: cancel}
	r.srv = httptest.NewServer(mux)
	t.Cleanup(r.srv.Close)
	httpboot.New(httpboot.Config{Base: r.srv.URL, Params: []string{"herd.endpoints=http://10.99.0.1:2379"}, Retry: time.Second}, b, store, hclog.NewNullLogger(), nil).Register(mux)
	return r
}

func (r *rig) get(path string, hdr ...string) (int, string) {
	r.t.Helper()
	req, _ := http.NewRequest("GET", r.srv.URL+path, nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		r.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func (r *rig) put(k, v string) {
	r.t.Helper()
	if _, err := r.c.Put(context.Background(), k, v); err != nil {
		r.t.Fatal(err)
	}
}

// eventually waits for the backend's caches to see a write.
func (r *rig) eventually(what string, cond func() bool) {
	r.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			r.t.Fatal(what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// addImage writes files into the image dir and the catalogue.
func (r *rig) addImage(version, kernel, initrd string) {
	r.t.Helper()
	d := filepath.Join(r.dir, version)
	_ = os.MkdirAll(d, 0o755)
	_ = os.WriteFile(filepath.Join(d, "vmlinuz"), []byte(kernel), 0o644)
	_ = os.WriteFile(filepath.Join(d, "initrd.gz"), []byte(initrd), 0o644)
	k, _ := images.Describe(filepath.Join(d, "vmlinuz"))
	i, _ := images.Describe(filepath.Join(d, "initrd.gz"))
	r.put(space.Image(version), keys.MustEncode(&keys.Image{Kernel: k, Initrd: i, Created: time.Now()}))
}

const query = "/ipxe?mac=52-54-00-aa-bb-01&uuid=0000&serial=SVC123&arch=x86_64"

func TestBootFlow(t *testing.T) {
	r := newRig(t)
	code, body := r.get("/boot.ipxe")
	if code != 200 || !strings.Contains(body, "/ipxe?mac=${netX/mac:hexhyp}&uuid=${uuid}&serial=${serial:uristring}&arch=${buildarch}") {
		t.Fatalf("chain script: %d %s", code, body)
	}

	// Unknown: recorded, told to wait and retry with the same query.
	for i := 1; i <= 2; i++ {
		code, body = r.get(query)
		if code != 200 || !strings.Contains(body, "not enrolled") || !strings.Contains(body, "chain "+r.srv.URL+"/ipxe?arch=x86_64&mac=52-54-00-aa-bb-01&serial=SVC123&uuid=0000") {
			t.Fatalf("unknown machine: %s", body)
		}
	}
	resp, err := r.c.Get(context.Background(), space.Discovered("52:54:00:aa:bb:01"))
	if err != nil || len(resp.Kvs) != 1 || resp.Kvs[0].Lease == 0 {
		t.Fatalf("discovered record: %v %v", resp, err)
	}
	d, _ := keys.Decode[keys.Discovered](resp.Kvs[0].Value)
	if d.Attempts != 2 || d.Serial != "SVC123" || d.Arch != "x86_64" || d.Bootserver != "bs1" {
		t.Fatalf("discovered %+v", d)
	}

	// Enrolled by service tag, no image yet: still waits, with the reason.
	r.put(space.Hardware("SVC123"), keys.MustEncode(&keys.Hardware{Serial: "SVC123"}))
	r.eventually("hardware cached", func() bool { return r.b.hw.Get(space.Hardware("SVC123")) != nil })
	if _, body = r.get(query); !strings.Contains(body, "no bootable image yet") {
		t.Fatalf("enrolled without image: %s", body)
	}

	r.addImage("v1", "KERNEL-ONE", "INITRD-ONE")
	r.put(space.ImageCurrent(), keys.MustEncode(&keys.ImageCurrent{Version: "v1"}))
	r.eventually("image cached", func() bool { _, ok := r.b.Image("v1"); return ok && r.b.imgs.Get(space.ImageCurrent()) != nil })
	_, body = r.get(query)
	for _, want := range []string{
		"kernel " + r.srv.URL + "/images/v1/vmlinuz initrd=initrd.gz herd.hwid=SVC123 herd.image=v1 herd.endpoints=http://10.99.0.1:2379",
		"initrd " + r.srv.URL + "/images/v1/initrd.gz",
		"boot",
	} {
		if !strings.Contains(body, want) {
			t.Fatalf("boot script lacks %q:\n%s", want, body)
		}
	}

	// Range requests on immutable URLs.
	code, body = r.get("/images/v1/vmlinuz", "Range", "bytes=2-5")
	if code != http.StatusPartialContent || body != "RNEL" {
		t.Fatalf("range: %d %q", code, body)
	}
	if code, _ = r.get("/images/v1/..%2F..%2Fsecret"); code == 200 {
		t.Fatal("path games served a file")
	}
	if code, _ = r.get("/images/v1/other"); code != 404 {
		t.Fatalf("a file outside the catalogue: %d", code)
	}

	// A pin to a version this bootserver lacks: not served; once copied, served.
	r.put(space.Image("v2"), keys.MustEncode(&keys.Image{Kernel: keys.ImageFile{Name: "vmlinuz", Size: 10, SHA256: strings.Repeat("a", 64)}, Initrd: keys.ImageFile{Name: "initrd.gz", Size: 10, SHA256: strings.Repeat("b", 64)}}))
	r.put(space.NodeState("SVC123"), keys.MustEncode(&keys.NodeState{Image: "v2"}))
	r.eventually("pin cached", func() bool { return r.b.states.Get(space.NodeState("SVC123")) != nil })
	if _, body = r.get(query); !strings.Contains(body, "no bootable image yet") {
		t.Fatalf("pinned to an unserved image: %s", body)
	}
	r.addImage("v2", "KERNEL-TWO", "INITRD-TWO")
	r.eventually("v2 servable", func() bool { _, b := r.get(query); return strings.Contains(b, "/images/v2/vmlinuz") })

	// Corruption (same size, other bytes) is caught before a node gets it.
	time.Sleep(10 * time.Millisecond)
	_ = os.WriteFile(filepath.Join(r.dir, "v2", "vmlinuz"), []byte("KERNEL-BAD"), 0o644)
	now := time.Now().Add(time.Second)
	_ = os.Chtimes(filepath.Join(r.dir, "v2", "vmlinuz"), now, now)
	if code, body = r.get("/images/v2/vmlinuz"); code != 404 || !strings.Contains(body, "sha256") {
		t.Fatalf("corrupted file served: %d %s", code, body)
	}
	if v := r.b.verdicts(); v["v1"] != images.OK || !strings.Contains(v["v2"], "sha256") {
		t.Fatalf("verdicts %v", v)
	}
	if code, _ = r.get("/ipxe?mac=zz"); code != 400 {
		t.Fatalf("garbage query: %d", code)
	}
}

func TestLeasesSharedThroughEtcd(t *testing.T) {
	srv := etcdtest.Start(t)
	c1, c2 := etcdtest.NewClient(t, srv.Endpoints), etcdtest.NewClient(t, srv.Endpoints)
	start, end := net.IPv4(10, 99, 0, 100), net.IPv4(10, 99, 0, 102)
	a, _ := newLeases(c1, space, start, end, time.Hour)
	b, _ := newLeases(c2, space, start, end, time.Hour) // a second replica
	ctx := context.Background()
	got := map[string]string{}
	for i, l := range []*leases{a, b, a} {
		mac := fmt.Sprintf("52:54:00:00:00:%02x", i)
		ip, err := l.Offer(ctx, mac)
		if err != nil {
			t.Fatal(err)
		}
		if other, dup := got[ip.String()]; dup {
			t.Fatalf("%v offered to %s and %s", ip, other, mac)
		}
		got[ip.String()] = mac
		if err := l.Confirm(ctx, mac, ip); err != nil {
			t.Fatal(err)
		}
		if again, _ := b.Offer(ctx, mac); !again.Equal(ip) {
			t.Fatalf("%s got %v then %v", mac, ip, again)
		}
	}
	if _, err := a.Offer(ctx, "52:54:00:00:00:99"); err == nil || !strings.Contains(err.Error(), "exhausted") {
		t.Fatalf("full pool: %v", err)
	}
	for ip, mac := range got {
		if err := b.Confirm(ctx, "52:54:00:00:00:99", net.ParseIP(ip)); !errors.Is(err, dhcp.ErrNotOurs) {
			t.Fatalf("%s's address %s confirmed to another: %v", mac, ip, err)
		}
	}
	if err := a.Release(ctx, "52:54:00:00:00:00"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Offer(ctx, "52:54:00:00:00:99"); err != nil {
		t.Fatalf("released address not reused: %v", err)
	}
}

// TestBootScriptCarriesJoinToken: with join endpoints configured, each boot script carries a fresh
// one-time token bound to the machine, whose hash (only) is in etcd under a lease.
func TestBootScriptCarriesJoinToken(t *testing.T) {
	r := newRig(t)
	mux := http.NewServeMux()
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	httpboot.New(httpboot.Config{Base: srv.URL, Retry: time.Second, Join: []string{"https://10.99.0.1:9443", "https://10.99.0.2:9443"}, CAHash: "sha256:abcd"},
		r.b, images.NewStore(r.dir), hclog.NewNullLogger(), nil).Register(mux)
	r.put(space.Hardware("SVC123"), keys.MustEncode(&keys.Hardware{Serial: "SVC123"}))
	r.addImage("v1", "K", "I")
	r.put(space.ImageCurrent(), keys.MustEncode(&keys.ImageCurrent{Version: "v1"}))
	r.eventually("bootable", func() bool { _, b := r.get(query); return strings.Contains(b, "boot\n") })

	tokens := map[string]bool{}
	for range 2 {
		resp, err := http.Get(srv.URL + query)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		body := string(b)
		if !strings.Contains(body, " herd.join=https://10.99.0.1:9443,https://10.99.0.2:9443 herd.ca=sha256:abcd herd.token=") {
			t.Fatalf("boot script without join parameters:\n%s", body)
		}
		tok := strings.Fields(body[strings.Index(body, "herd.token=")+len("herd.token="):])[0]
		tokens[tok] = true
		got, err := r.c.Get(context.Background(), space.JoinToken(join.Hash(tok)))
		if err != nil || len(got.Kvs) != 1 || got.Kvs[0].Lease == 0 {
			t.Fatalf("token record: %v %v", got, err)
		}
		rec, err := keys.Decode[keys.JoinToken](got.Kvs[0].Value)
		if err != nil || rec.HWID != "SVC123" || rec.IssuedBy != "bootserver/bs1" {
			t.Fatalf("token record %+v %v", rec, err)
		}
		if strings.Contains(string(got.Kvs[0].Value), tok) {
			t.Fatal("etcd holds the token itself, not only its hash")
		}
	}
	if len(tokens) != 2 {
		t.Fatal("two boots got the same token")
	}
}
