package tftp

import (
	"bytes"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/pin/tftp/v3"
)

func TestParsePath(t *testing.T) {
	good := map[string][2]string{
		"undionly.kpxe":              {"", "undionly.kpxe"},
		"/ipxe.efi":                  {"", "ipxe.efi"},
		"525400AABB01/undionly.kpxe": {"52:54:00:aa:bb:01", "undionly.kpxe"},
	}
	for in, want := range good {
		mac, name, err := ParsePath(in)
		if err != nil || mac != want[0] || name != want[1] {
			t.Errorf("ParsePath(%q) = %q %q %v", in, mac, name, err)
		}
	}
	for _, bad := range []string{"", "../etc/passwd", "a/b/c", "x/undionly.kpxe", "525400aabb01/../../x", ".hidden", "..", "a b"} {
		if _, _, err := ParsePath(bad); err == nil {
			t.Errorf("ParsePath(%q) accepted", bad)
		}
	}
}

func TestServeOverLoopback(t *testing.T) {
	dir := t.TempDir()
	payload := bytes.Repeat([]byte("iPXE"), 50000) // 200 KB: many blocks
	if err := os.WriteFile(filepath.Join(dir, "undionly.kpxe"), payload, 0o644); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(filepath.Dir(dir), "secret")
	_ = os.WriteFile(secret, []byte("no"), 0o644)
	fetched := NewFetched(time.Minute)
	s := New(dir, fetched, Limits{}, hclog.NewNullLogger(), nil)
	conn, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = s.Serve(conn) }()
	defer s.Shutdown()

	c, err := tftp.NewClient(conn.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetBlockSize(1428)
	c.RequestTSize(true)
	wt, err := c.Receive("525400aabb01/undionly.kpxe", "octet")
	if err != nil {
		t.Fatal(err)
	}
	if n, ok := wt.(tftp.IncomingTransfer).Size(); !ok || n != int64(len(payload)) {
		t.Fatalf("tsize %d %v", n, ok)
	}
	var buf bytes.Buffer
	if _, err := wt.WriteTo(&buf); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf.Bytes(), payload) {
		t.Fatal("content differs")
	}
	deadline := time.Now().Add(5 * time.Second)
	for !fetched.Recent("52:54:00:aa:bb:01") {
		if time.Now().After(deadline) {
			t.Fatal("fetch not remembered")
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, bad := range []string{"../secret", "nope.efi"} {
		if _, err := c.Receive(bad, "octet"); err == nil {
			t.Errorf("%s served", bad)
		}
	}
	// Garbage datagrams do not stop the server.
	junk, _ := net.Dial("udp4", conn.LocalAddr().String())
	for _, p := range [][]byte{{0}, {0, 1}, {0, 9, 1, 2}, bytes.Repeat([]byte{0xff}, 600)} {
		_, _ = junk.Write(p)
	}
	junk.Close()
	wt, err = c.Receive("undionly.kpxe", "octet")
	if err != nil {
		t.Fatalf("server dead after garbage: %v", err)
	}
	buf.Reset()
	if _, err := wt.WriteTo(&buf); err != nil || buf.Len() != len(payload) {
		t.Fatalf("second transfer: %d %v", buf.Len(), err)
	}
}
