package tftp

import (
	"bytes"
	"encoding/binary"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

func serve(t *testing.T, lim Limits) (net.Addr, string) {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "undionly.kpxe"), bytes.Repeat([]byte("x"), 100000), 0o644); err != nil {
		t.Fatal(err)
	}
	s := New(dir, NewFetched(time.Minute), lim, hclog.NewNullLogger(), nil)
	conn, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = s.Serve(conn); close(done) }()
	t.Cleanup(func() { s.Shutdown(); <-done })
	return conn.LocalAddr(), dir
}

func rq(op uint16, fields ...string) []byte {
	p := binary.BigEndian.AppendUint16(nil, op)
	for _, f := range fields {
		p = append(append(p, f...), 0)
	}
	return p
}

// ask sends p from a fresh socket and returns the first answer.
func ask(t *testing.T, server net.Addr, p []byte) []byte {
	t.Helper()
	c, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.WriteTo(p, server); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 2048)
	n, _, err := c.ReadFrom(buf)
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	return buf[:n]
}

func errCode(t *testing.T, p []byte) (uint16, string) {
	t.Helper()
	if len(p) < 4 || binary.BigEndian.Uint16(p) != opERROR {
		t.Fatalf("not an error packet: %q", p)
	}
	return binary.BigEndian.Uint16(p[2:]), strings.TrimRight(string(p[4:]), "\x00")
}

// TestRefusalsUseRFCCodes: each refusal with the error code RFC 1350 has for it.
func TestRefusalsUseRFCCodes(t *testing.T) {
	server, _ := serve(t, Limits{})
	for _, c := range []struct {
		p    []byte
		code uint16
	}{
		{rq(opRRQ, "missing.efi", "octet"), errFileNotFound},
		{rq(opRRQ, "../etc/passwd", "octet"), errAccessViolation},
		{rq(opRRQ, "a/b/c", "octet"), errAccessViolation},
		{rq(opWRQ, "undionly.kpxe", "octet"), errAccessViolation},
		{rq(opRRQ, "undionly.kpxe", "mail"), errIllegalOperation},
		{append(binary.BigEndian.AppendUint16(nil, opRRQ), "undionly.kpxe"...), errIllegalOperation},
	} {
		code, msg := errCode(t, ask(t, server, c.p))
		if code != c.code {
			t.Errorf("%q: code %d (%s), want %d", c.p, code, msg, c.code)
		}
	}
}

// TestInvalidOptionsAreNotEchoed: tsize=abc is declined (left out of the OACK), a valid blksize is
// accepted; with nothing valid the transfer starts without an OACK.
func TestInvalidOptionsAreNotEchoed(t *testing.T) {
	server, _ := serve(t, Limits{})
	oack := ask(t, server, rq(opRRQ, "undionly.kpxe", "octet", "tsize", "abc", "blksize", "1428"))
	if binary.BigEndian.Uint16(oack) != 6 || bytes.Contains(oack, []byte("abc")) || bytes.Contains(oack, []byte("tsize")) || !bytes.Contains(oack, []byte("1428")) {
		t.Fatalf("OACK %q", oack)
	}
	data := ask(t, server, rq(opRRQ, "undionly.kpxe", "octet", "tsize", "-1", "blksize", "999999"))
	if binary.BigEndian.Uint16(data) != 3 {
		t.Fatalf("with only invalid options the transfer starts with DATA, got %q", data)
	}
	good := ask(t, server, rq(opRRQ, "undionly.kpxe", "octet", "tsize", "0"))
	if !bytes.Contains(good, []byte("100000")) {
		t.Fatalf("tsize=0 answered with the size: %q", good)
	}
}

// TestTransfersAreBounded: transfers nobody acknowledges stay open; past the per-client and the
// global limits new requests go unanswered (the client asks again later, as firmware does, rather
// than ending its boot on an error), and a real fetch works again once they end.
func TestTransfersAreBounded(t *testing.T) {
	server, _ := serve(t, Limits{Transfers: 6, PerClient: 4, Timeout: time.Second})
	open := func() []byte { return ask(t, server, rq(opRRQ, "undionly.kpxe", "octet")) }
	for i := 0; i < 4; i++ {
		if p := open(); binary.BigEndian.Uint16(p) != 3 {
			t.Fatalf("transfer %d: %q", i, p)
		}
	}
	// silent sends a request from addr and says whether nothing came back within a second.
	silent := func(addr string) bool {
		c, err := net.ListenPacket("udp4", addr)
		if err != nil {
			t.Skipf("no %s", addr)
		}
		defer c.Close()
		_, _ = c.WriteTo(rq(opRRQ, "undionly.kpxe", "octet"), server)
		_ = c.SetReadDeadline(time.Now().Add(time.Second))
		_, _, err = c.ReadFrom(make([]byte, 2048))
		return err != nil
	}
	if !silent("127.0.0.1:0") {
		t.Fatal("a fifth transfer from one client was answered")
	}
	// Another address (127.0.0.2 is loopback too) meets the global limit.
	other := func() []byte {
		c, err := net.ListenPacket("udp4", "127.0.0.2:0")
		if err != nil {
			t.Skip("no 127.0.0.2")
		}
		// Open but silent: a closed port would end its transfer at the first resend.
		t.Cleanup(func() { c.Close() })
		_, _ = c.WriteTo(rq(opRRQ, "undionly.kpxe", "octet"), server)
		_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
		buf := make([]byte, 2048)
		n, _, err := c.ReadFrom(buf)
		if err != nil {
			t.Fatal(err)
		}
		return buf[:n]
	}
	other()
	other()
	// Past the global limit a request waits, unread, until a transfer ends (here: the silent ones
	// give up after 1 s x 6 tries), and is served then.
	c, err := net.ListenPacket("udp4", "127.0.0.2:0")
	if err != nil {
		t.Skip("no 127.0.0.2")
	}
	defer c.Close()
	_, _ = c.WriteTo(rq(opRRQ, "undionly.kpxe", "octet"), server)
	_ = c.SetReadDeadline(time.Now().Add(time.Second))
	buf := make([]byte, 2048)
	if _, _, err := c.ReadFrom(buf); err == nil {
		t.Fatal("a transfer past the global limit started at once")
	}
	_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
	if n, _, err := c.ReadFrom(buf); err != nil || binary.BigEndian.Uint16(buf[:n]) != 3 {
		t.Fatalf("the waiting request was not served once transfers ended: %v %q", err, buf[:n])
	}
	// The unacknowledged transfers time out; then fetches work again.
	deadline := time.Now().Add(40 * time.Second)
	for {
		p := open()
		if binary.BigEndian.Uint16(p) == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("transfers never freed after their clients went away")
		}
		time.Sleep(time.Second)
	}
}

// fetch is a minimal TFTP client with windowsize (RFC 7440), to test what pin/tftp's client
// cannot ask for. It returns the file and the options the server acknowledged.
func fetch(t *testing.T, server net.Addr, name string, opts ...string) ([]byte, string) {
	t.Helper()
	c, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.WriteTo(rq(opRRQ, append([]string{name, "octet"}, opts...)...), server); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	var peer net.Addr
	var oack string
	blksize, window := 512, 1
	next := uint16(1)
	inWindow := 0
	buf := make([]byte, 70000)
	for {
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			t.Fatalf("after %d bytes: %v", out.Len(), err)
		}
		peer = from
		ack := func(b uint16) {
			p := binary.BigEndian.AppendUint16(nil, opACK)
			_, _ = c.WriteTo(binary.BigEndian.AppendUint16(p, b), peer)
		}
		switch binary.BigEndian.Uint16(buf) {
		case opOACK:
			oack = strings.ReplaceAll(strings.TrimRight(string(buf[2:n]), "\x00"), "\x00", " ")
			f := strings.Fields(oack)
			for i := 0; i+1 < len(f); i += 2 {
				v, _ := strconv.Atoi(f[i+1])
				switch f[i] {
				case "blksize":
					blksize = v
				case "windowsize":
					window = v
				}
			}
			ack(0)
		case opDATA:
			if binary.BigEndian.Uint16(buf[2:]) != next {
				continue // out of order: the window is sent again
			}
			out.Write(buf[4:n])
			inWindow++
			last := n-4 < blksize
			if inWindow == window || last {
				ack(next)
				inWindow = 0
			}
			next++
			if last {
				return out.Bytes(), oack
			}
		case opERROR:
			t.Fatalf("error: %q", buf[4:n])
		}
	}
}

// TestWindowsAndRollover: a 40 MB file in 512-byte blocks (block numbers wrap past 65535) with a
// window of 32, as a UEFI client may ask; the bytes arrive whole and in order.
func TestWindowsAndRollover(t *testing.T) {
	server, dir := serve(t, Limits{})
	big := make([]byte, 40<<20)
	for i := range big {
		big[i] = byte(i * 7)
	}
	if err := os.WriteFile(filepath.Join(dir, "ipxe.efi"), big, 0o644); err != nil {
		t.Fatal(err)
	}
	got, oack := fetch(t, server, "ipxe.efi", "windowsize", "32", "tsize", "0")
	if !bytes.Equal(got, big) {
		t.Fatalf("got %d bytes, differing", len(got))
	}
	if oack != "windowsize 32 tsize 41943040" && oack != "tsize 41943040 windowsize 32" {
		t.Fatalf("OACK %q", oack)
	}
	// A file of exactly n blocks ends with an empty block.
	if err := os.WriteFile(filepath.Join(dir, "snp.efi"), big[:1024], 0o644); err != nil {
		t.Fatal(err)
	}
	if got, _ := fetch(t, server, "snp.efi"); !bytes.Equal(got, big[:1024]) {
		t.Fatalf("exact multiple of the block size: %d bytes", len(got))
	}
}

// need returns the path of a client program, failing in CI when it is missing (just deps installs
// it) and skipping elsewhere.
func need(t *testing.T, prog string) string {
	t.Helper()
	p, err := exec.LookPath(prog)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is missing: run `just deps`", prog)
		}
		t.Skipf("%s is missing: run `just deps`", prog)
	}
	return p
}

// TestClientsNobodyHereWrote: curl, atftp, tftp-hpa and busybox fetch a 1 MB binary byte-exact,
// each negotiating what it negotiates.
func TestClientsNobodyHereWrote(t *testing.T) {
	server, dir := serve(t, Limits{})
	payload := make([]byte, 1<<20+123)
	for i := range payload {
		payload[i] = byte(i*13 + i/1000)
	}
	if err := os.WriteFile(filepath.Join(dir, "ipxe.efi"), payload, 0o644); err != nil {
		t.Fatal(err)
	}
	host, port, _ := net.SplitHostPort(server.String())
	out := t.TempDir()
	for _, c := range []struct {
		name string
		args func(dst string) []string
	}{
		{"curl", func(dst string) []string {
			return []string{"--silent", "--show-error", "--tftp-blksize", "1428", "-o", dst, "tftp://" + server.String() + "/ipxe.efi"}
		}},
		{"atftp", func(dst string) []string {
			return []string{"--option", "blksize 1428", "--option", "tsize", "-g", "-r", "ipxe.efi", "-l", dst, host, port}
		}},
		{"tftp", func(dst string) []string { return []string{host, port, "-m", "binary", "-c", "get", "ipxe.efi", dst} }},
		{"busybox", func(dst string) []string {
			return []string{"tftp", "-g", "-b", "1428", "-r", "ipxe.efi", "-l", dst, host, port}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			prog := need(t, c.name)
			dst := filepath.Join(out, c.name)
			cmd := exec.Command(prog, c.args(dst)...)
			cmd.Dir = out
			if b, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("%s: %v\n%s", c.name, err, b)
			}
			got, err := os.ReadFile(dst)
			if err != nil || !bytes.Equal(got, payload) {
				t.Fatalf("%s: %d bytes (%v), want %d byte-exact", c.name, len(got), err, len(payload))
			}
		})
	}
	// A missing file: the clients report the server's own words.
	for _, c := range [][]string{
		{"atftp", "-g", "-r", "nope.efi", "-l", filepath.Join(out, "x1"), host, port},
		{"tftp", host, port, "-m", "binary", "-c", "get", "nope.efi", filepath.Join(out, "x2")},
		{"busybox", "tftp", "-g", "-r", "nope.efi", "-l", filepath.Join(out, "x3"), host, port},
	} {
		b, err := exec.Command(need(t, c[0]), c[1:]...).CombinedOutput()
		if !strings.Contains(string(b), "not found") {
			t.Errorf("%s on a missing file: %v %s", c[0], err, b)
		}
	}
}

// TestVanishedClientAndReplacedFile: a client whose port closed mid-transfer frees its transfer
// at the first resend (the kernel's port-unreachable answer), not after every retry; a file
// replaced on disk is sent as it is now, not as an earlier transfer read it.
func TestVanishedClientAndReplacedFile(t *testing.T) {
	// 1,000 tries of 1 s: only the port-unreachable answer frees the slot within fetch's wait.
	server, dir := serve(t, Limits{Transfers: 1, PerClient: 1, Timeout: time.Second, Retries: 1000})
	c, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteTo(rq(opRRQ, "undionly.kpxe", "octet"), server); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, _, err := c.ReadFrom(make([]byte, 2048)); err != nil {
		t.Fatal(err)
	}
	c.Close()                                   // gone, mid-transfer, holding the only slot
	got, _ := fetch(t, server, "undionly.kpxe") // waits, unread, for the slot
	if len(got) != 100000 {
		t.Fatalf("fetched %d bytes", len(got))
	}

	if err := os.WriteFile(filepath.Join(dir, "undionly.kpxe"), bytes.Repeat([]byte("y"), 3000), 0o644); err != nil {
		t.Fatal(err)
	}
	if got, _ := fetch(t, server, "undionly.kpxe"); !bytes.Equal(got, bytes.Repeat([]byte("y"), 3000)) {
		t.Fatalf("after the file was replaced: %d bytes, %q...", len(got), got[:min(len(got), 8)])
	}
}
