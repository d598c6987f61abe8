package console

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/pki"
	"github.com/herdhq/herd/lib/rbac"
)

// guests is a hypervisor whose guests answer every line typed with "heard: <line>", holding one
// session per console as libvirt does.
type guests struct {
	mu   sync.Mutex
	open map[string]net.Conn
}

func (g *guests) OpenConsole(_ context.Context, name string, force bool) (io.ReadWriteCloser, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if old, ok := g.open[name]; ok {
		if !force {
			return nil, ErrBusy
		}
		old.Close()
	}
	ours, guest := net.Pipe()
	g.open[name] = guest
	go func() {
		defer func() {
			g.mu.Lock()
			if g.open[name] == guest {
				delete(g.open, name)
			}
			g.mu.Unlock()
			guest.Close()
		}()
		sc := bufio.NewScanner(guest)
		for sc.Scan() {
			if _, err := fmt.Fprintf(guest, "heard: %s\n", sc.Text()); err != nil {
				return
			}
		}
	}()
	return ours, nil
}

type recorded struct {
	mu     sync.Mutex
	events []string
}

func (r *recorded) record(object, action, format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, object+" "+action+": "+fmt.Sprintf(format, args...))
}

func (r *recorded) all() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return strings.Join(r.events, "\n")
}

type pkiFiles struct {
	dir string
	ca  string
}

func (p pkiFiles) issue(t *testing.T, ca *pki.CA, cn string, role pki.Role) (string, string) {
	t.Helper()
	crt, key, err := ca.IssueFiles(p.dir, strings.ReplaceAll(cn, ":", "_"), cn, role, nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return crt, key
}

// TestConsoleAuthorization: over real TLS, the node's certificate serves and the caller's role
// decides: operators type, viewers read the log only, nodes and foreign certificates nothing, and
// herdctl's side refuses a server that is not the node it asked for.
func TestConsoleAuthorization(t *testing.T) {
	dir := t.TempDir()
	ca, err := pki.InitCA(filepath.Join(dir, "ca"), "test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	p := pkiFiles{dir: dir, ca: filepath.Join(dir, "ca", pki.CACert)}
	nodeCrt, nodeKey := p.issue(t, ca, rbac.NodeUser("aa"), pki.RoleNode)
	opCrt, opKey := p.issue(t, ca, "alice", pki.RoleOperator)
	viewCrt, viewKey := p.issue(t, ca, "victor", pki.RoleViewer)
	otherCrt, otherKey := p.issue(t, ca, rbac.NodeUser("bb"), pki.RoleNode)
	foreign, err := pki.InitCA(filepath.Join(dir, "foreign"), "foreign", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	fCrt, fKey := p.issue(t, foreign, "mallory", pki.RoleOperator)

	logs := filepath.Join(dir, "logs")
	_ = os.MkdirAll(logs, 0o755)
	if err := os.WriteFile(filepath.Join(logs, "vm1.log"), []byte("line one\nline two\nline three\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ev := &recorded{}
	// Tickets as etcd would hold them: id -> ticket and its lease.
	var tmu sync.Mutex
	tickets := map[string]*keys.ConsoleTicket{}
	leases := map[string]int64{}
	ticket := func(user, vm string, lease int64) string {
		tmu.Lock()
		defer tmu.Unlock()
		id := fmt.Sprintf("t%d", len(tickets)+1)
		tickets[id], leases[id] = &keys.ConsoleTicket{User: user, VM: vm, Created: time.Now()}, lease
		return id
	}
	srv := &Server{Opener: &guests{open: map[string]net.Conn{}}, LogDir: logs, Record: ev.record, Secure: true,
		Ticket: func(_ context.Context, id string) (*keys.ConsoleTicket, int64, error) {
			tmu.Lock()
			defer tmu.Unlock()
			return tickets[id], leases[id], nil
		},
		Running: func(_ context.Context, vm string) error {
			if vm != "vm1" {
				return fmt.Errorf("vm/%s does not run on node aa", vm)
			}
			return nil
		}}
	cfg, err := ServerTLS(p.ca, nodeCrt, nodeKey)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = hs.Serve(tls.NewListener(l, cfg)) }()
	t.Cleanup(func() { _ = hs.Close() })
	url := "https://" + l.Addr().String()
	client := func(crt, key, hwid string) *Client {
		t.Helper()
		c, err := ClientTLS(p.ca, crt, key, hwid)
		if err != nil {
			t.Fatal(err)
		}
		return &Client{URL: url, TLS: c}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	// No attach without a ticket etcd let the caller write: none, someone else's, one for another
	// VM, one on no lease.
	op := client(opCrt, opKey, "aa")
	var ref *Refused
	for _, x := range []struct{ ticket, want string }{
		{"", "no console ticket"},
		{ticket("bob", "vm1", 7), "is for bob on vm/vm1, not for alice"},
		{ticket("alice", "vm2", 7), "not for alice on vm/vm1"},
		{ticket("alice", "vm1", 0), "hangs on no lease"},
		{"nope", "is not in etcd"},
	} {
		if _, err := op.Attach(ctx, "vm1", false, x.ticket); !errors.As(err, &ref) || ref.Status != http.StatusForbidden || !strings.Contains(ref.Message, x.want) {
			t.Fatalf("attach with ticket %q: %v, want %q", x.ticket, err, x.want)
		}
	}

	// An operator types and the guest answers; the ticket serves once; a second session is
	// refused naming the holder.
	first := ticket("alice", "vm1", 7)
	con, err := op.Attach(ctx, "vm1", false, first)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(con, "hello\n"); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(con).ReadString('\n')
	if err != nil || line != "heard: hello\n" {
		t.Fatalf("guest answered %q, %v", line, err)
	}
	if _, err := op.Attach(ctx, "vm1", false, first); !errors.As(err, &ref) || !strings.Contains(ref.Message, "used already") {
		t.Fatalf("a ticket used twice: %v", err)
	}
	if _, err := op.Attach(ctx, "vm1", false, ticket("alice", "vm1", 7)); !errors.As(err, &ref) || ref.Status != http.StatusConflict || !strings.Contains(ref.Message, "alice holds the console") {
		t.Fatalf("second session: %v", err)
	}
	// --force takes it: the first session's stream ends.
	con2, err := op.Attach(ctx, "vm1", true, ticket("alice", "vm1", 7))
	if err != nil {
		t.Fatal(err)
	}
	// The first session ends (EOF, or a closed connection).
	_, _ = io.ReadAll(con)
	con2.Close()
	con.Close()
	if _, err := op.Attach(ctx, "vm9", false, ticket("alice", "vm9", 7)); !errors.As(err, &ref) || !strings.Contains(ref.Message, "does not run") {
		t.Fatalf("VM elsewhere: %v", err)
	}

	// The log, its tail, and a name that tries to leave the directory.
	var b strings.Builder
	if err := op.Log(ctx, "vm1", 0, false, &b); err != nil || b.String() != "line one\nline two\nline three\n" {
		t.Fatalf("log: %q %v", b.String(), err)
	}
	b.Reset()
	if err := op.Log(ctx, "vm1", 11, false, &b); err != nil || b.String() != "line three\n" {
		t.Fatalf("log tail: %q %v", b.String(), err)
	}
	if err := op.Log(ctx, "../ca/ca", 0, false, io.Discard); !errors.As(err, &ref) || ref.Status != http.StatusBadRequest {
		t.Fatalf("path outside the log directory: %v", err)
	}

	// A viewer reads the log but may not type.
	view := client(viewCrt, viewKey, "aa")
	if err := view.Log(ctx, "vm1", 0, false, io.Discard); err != nil {
		t.Fatalf("viewer log: %v", err)
	}
	if _, err := view.Attach(ctx, "vm1", false, ticket("victor", "vm1", 7)); !errors.As(err, &ref) || ref.Status != http.StatusForbidden || !strings.Contains(ref.Message, "viewer") {
		t.Fatalf("viewer attach: %v", err)
	}
	// Another node's certificate may do nothing.
	if err := client(otherCrt, otherKey, "aa").Log(ctx, "vm1", 0, false, io.Discard); !errors.As(err, &ref) || ref.Status != http.StatusForbidden {
		t.Fatalf("node certificate: %v", err)
	}
	// A certificate of another CA does not get past TLS.
	if err := client(fCrt, fKey, "aa").Log(ctx, "vm1", 0, false, io.Discard); err == nil || errors.As(err, &ref) {
		t.Fatalf("foreign certificate: %v", err)
	}
	// herdctl asked for node bb: the server's certificate is aa's, and herdctl refuses to talk.
	if err := client(opCrt, opKey, "bb").Log(ctx, "vm1", 0, false, io.Discard); err == nil || !strings.Contains(err.Error(), "not herd-node:bb") {
		t.Fatalf("wrong node: %v", err)
	}

	got := ev.all()
	for _, want := range []string{"vm/vm1 console-open: alice attached", "taking it over", "vm/vm1 console-close: alice detached"} {
		if !strings.Contains(got, want) {
			t.Fatalf("events lack %q:\n%s", want, got)
		}
	}
	if strings.Contains(got, "victor") {
		t.Fatalf("a refused session was recorded as one:\n%s", got)
	}
}
