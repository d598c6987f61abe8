// Package console carries a VM's serial console between the agent of the node the VM runs on and
// an operator: the agent's endpoint (Server) and herdctl's side (Client).
//
// The agent serves it next to nothing else: on a cluster with TLS, on a listener of its own that
// asks every caller for a certificate of the cluster's CA; the certificate's herd role decides
// (operator and root may type, viewer may read the log, nodes and foreign certificates nothing), and
// its common name is the user every session's event names. Without TLS the cluster has no
// authentication anywhere, the console neither: it is served on the status endpoint.
package console

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/pki"
)

// Protocol: GET LogPath streams the console log (?bytes=N: the last N bytes, 0 all; ?follow=1:
// then what is appended); GET AttachPath with "Connection: Upgrade" and "Upgrade: Protocol" turns
// the connection into the console itself (?force=1 takes it from whoever holds it).
const (
	Protocol   = "herd-console/1"
	LogPath    = "/v1/vms/{name}/console/log"
	AttachPath = "/v1/vms/{name}/console"
	// DefaultLogBytes is how much of the log --log prints unless asked for more.
	DefaultLogBytes = 64 << 10
	// TicketHeader names the console ticket (keys.ConsoleTicket) an attach comes with.
	TicketHeader = "X-Herd-Console-Ticket"
	// TicketTTL is the lease herdctl writes a ticket under; the agent refuses older ones.
	TicketTTL = 60 * time.Second
)

// ErrNoConsole means the domain has no interactive serial console: the hypervisor has none (the
// test driver, the in-memory model), or the running domain was defined with an output-only one.
var ErrNoConsole = errors.New("no interactive serial console")

// ErrBusy means another session holds the domain's console; opening it with force takes it.
var ErrBusy = errors.New("the serial console is in use by another session")

// Access is what a caller may do with consoles.
type Access int

// Accesses, in order.
const (
	NoAccess Access = iota
	ReadLog
	Attach
)

// AccessOf maps a certificate's herd role to console access: those who may change VMs may type
// into them, viewers may read what they print.
func AccessOf(role pki.Role) Access {
	switch role {
	case pki.RoleOperator, pki.RoleRoot:
		return Attach
	case pki.RoleViewer:
		return ReadLog
	}
	return NoAccess
}

// Opener attaches to a domain's serial console (hypervisor.Hypervisor).
type Opener interface {
	OpenConsole(ctx context.Context, name string, force bool) (io.ReadWriteCloser, error)
}

// Server is an agent's console endpoint.
type Server struct {
	Opener Opener
	// LogDir holds <vm>.log, the console history the hypervisor writes ("": none kept).
	LogDir string
	// Running says whether vm is a herd VM running on this node (nil: an error saying why not).
	Running func(ctx context.Context, vm string) error
	// Record writes an event about vm ("vm/<name>") for the audit trail.
	Record func(object, action, format string, args ...any)
	// Secure requires a verified client certificate on every request (the listener's TLS
	// configuration must ask for one: ServerTLS), and a console ticket in etcd for every attach.
	Secure bool
	// Ticket reads this node's console ticket id from etcd: nil when there is none, and the
	// lease it hangs on.
	Ticket func(ctx context.Context, id string) (*keys.ConsoleTicket, int64, error)
	Log    hclog.Logger

	mu      sync.Mutex
	holders map[string]holder    // vm -> the interactive session holding its console
	used    map[string]time.Time // tickets already used, each until it is too old to be valid
}

type holder struct {
	user  string
	since time.Time
}

// Handler serves the console endpoints.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+LogPath, s.serveLog)
	mux.HandleFunc("GET "+AttachPath, s.serveAttach)
	return mux
}

// caller is who is asking and what they may do. Without TLS everyone is "anonymous" with full
// access: such a cluster authenticates nobody, etcd included.
func (s *Server) caller(r *http.Request) (string, Access) {
	if !s.Secure {
		return "anonymous", Attach
	}
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 || len(r.TLS.PeerCertificates) == 0 {
		return "", NoAccess
	}
	c := r.TLS.PeerCertificates[0]
	return c.Subject.CommonName, AccessOf(pki.RoleOf(c))
}

func (s *Server) authorize(w http.ResponseWriter, r *http.Request, need Access) (user, vm string, ok bool) {
	user, acc := s.caller(r)
	vm = r.PathValue("name")
	switch {
	case acc == NoAccess && user == "":
		http.Error(w, "a client certificate of this cluster's CA is required", http.StatusUnauthorized)
		return "", "", false
	case acc < need && acc == ReadLog:
		http.Error(w, fmt.Sprintf("%s is a viewer: viewers may read a console's log (herdctl vm console %s --log) but not type into it", user, vm), http.StatusForbidden)
		return "", "", false
	case acc < need:
		http.Error(w, fmt.Sprintf("%s may not use consoles: an operator or viewer certificate is needed", user), http.StatusForbidden)
		return "", "", false
	}
	if err := keys.ValidateName(vm); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return "", "", false
	}
	return user, vm, true
}

func (s *Server) serveLog(w http.ResponseWriter, r *http.Request) {
	user, vm, ok := s.authorize(w, r, ReadLog)
	if !ok {
		return
	}
	if s.LogDir == "" {
		http.Error(w, "this node keeps no console logs (its agent runs without --console-dir)", http.StatusNotFound)
		return
	}
	n := int64(DefaultLogBytes)
	if v := r.URL.Query().Get("bytes"); v != "" {
		b, err := strconv.ParseInt(v, 10, 64)
		if err != nil || b < 0 {
			http.Error(w, "bytes: want a count of bytes, 0 for the whole log", http.StatusBadRequest)
			return
		}
		n = b
	}
	f, err := os.Open(filepath.Join(s.LogDir, vm+".log"))
	if errors.Is(err, os.ErrNotExist) {
		http.Error(w, fmt.Sprintf("vm/%s has no console log on this node: it never ran here, or its guest printed nothing yet", vm), http.StatusNotFound)
		return
	}
	if err != nil {
		http.Error(w, "console log: "+err.Error(), http.StatusInternalServerError)
		return
	}
	defer f.Close()
	follow := r.URL.Query().Get("follow") == "1"
	if follow {
		s.record(vm, "console-log", "%s follows the serial console log of vm/%s on this node", user, vm)
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	size, _ := f.Seek(0, io.SeekEnd)
	off := int64(0)
	if n > 0 && size > n {
		off = size - n
	}
	off, err = copyFrom(w, f, off)
	if err != nil || !follow {
		return
	}
	rc := http.NewResponseController(w)
	_ = rc.Flush()
	// Poll rather than inotify: the log is a local file a guest appends to a few times a second
	// at most, and a quarter second is below what a human notices.
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-r.Context().Done():
			return
		case <-t.C:
		}
		fi, err := f.Stat()
		if err != nil {
			return
		}
		if fi.Size() < off { // truncated: start over
			off = 0
		}
		if fi.Size() == off {
			continue
		}
		if off, err = copyFrom(w, f, off); err != nil {
			return
		}
		if rc.Flush() != nil {
			return
		}
	}
}

func copyFrom(w io.Writer, f *os.File, off int64) (int64, error) {
	n, err := io.Copy(w, io.NewSectionReader(f, off, 1<<62))
	return off + n, err
}

func (s *Server) serveAttach(w http.ResponseWriter, r *http.Request) {
	user, vm, ok := s.authorize(w, r, Attach)
	if !ok {
		return
	}
	if r.Header.Get("Upgrade") != Protocol {
		w.Header().Set("Upgrade", Protocol)
		http.Error(w, "the console is a connection upgrade to "+Protocol+" (herdctl vm console)", http.StatusUpgradeRequired)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 15*time.Second)
	defer cancel()
	if s.Secure {
		if status, err := s.checkTicket(ctx, r.Header.Get(TicketHeader), user, vm); err != nil {
			http.Error(w, err.Error(), status)
			return
		}
	}
	if s.Running != nil {
		if err := s.Running(ctx, vm); err != nil {
			http.Error(w, err.Error(), http.StatusConflict)
			return
		}
	}
	force := r.URL.Query().Get("force") == "1"
	con, err := s.Opener.OpenConsole(ctx, vm, force)
	switch {
	case errors.Is(err, ErrBusy):
		msg := err.Error()
		if h, ok := s.holder(vm); ok {
			msg = fmt.Sprintf("%s holds the console of vm/%s since %s", h.user, vm, h.since.UTC().Format(time.RFC3339))
		}
		http.Error(w, msg+"; --force takes it over (their session ends)", http.StatusConflict)
		return
	case errors.Is(err, ErrNoConsole):
		http.Error(w, err.Error(), http.StatusNotImplemented)
		return
	case err != nil:
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		_ = con.Close()
		http.Error(w, "console: "+err.Error(), http.StatusInternalServerError)
		return
	}
	_, _ = io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: "+Protocol+"\r\n\r\n")
	since := time.Now()
	s.setHolder(vm, holder{user: user, since: since})
	how := ""
	if force {
		how = ", taking it over"
	}
	s.record(vm, "console-open", "%s attached to the serial console of vm/%s from %s%s", user, vm, r.RemoteAddr, how)
	typed := pump(conn, brw.Reader, con)
	s.clearHolder(vm, since)
	s.record(vm, "console-close", "%s detached from the serial console of vm/%s after %s (%d bytes typed)", user, vm, time.Since(since).Round(time.Second), typed)
}

// checkTicket admits an attach only with a ticket that etcd let the user write moments ago: the
// certificate says who the caller is, the ticket that etcd's RBAC lets them open consoles now
// (a user deleted or demoted in etcd since their certificate was issued writes none). A ticket
// serves once.
func (s *Server) checkTicket(ctx context.Context, id, user, vm string) (int, error) {
	if id == "" {
		return http.StatusForbidden, errors.New("no console ticket: this herdctl is older than the node's agent (herdctl writes one in etcd with your credentials, so that etcd's RBAC decides who may type into a VM); upgrade herdctl")
	}
	if len(id) > 64 || keys.ValidateName(id) != nil {
		return http.StatusBadRequest, fmt.Errorf("console ticket %q: not a ticket id", id)
	}
	if s.Ticket == nil {
		return http.StatusInternalServerError, errors.New("this agent cannot read console tickets")
	}
	t, lease, err := s.Ticket(ctx, id)
	switch {
	case err != nil:
		return http.StatusBadGateway, fmt.Errorf("read console ticket %s: %w", id, err)
	case t == nil:
		return http.StatusForbidden, fmt.Errorf("console ticket %s is not in etcd (expired, or never written)", id)
	case t.User != user || t.VM != vm:
		return http.StatusForbidden, fmt.Errorf("console ticket %s is for %s on vm/%s, not for %s on vm/%s", id, t.User, t.VM, user, vm)
	case lease == 0:
		return http.StatusForbidden, fmt.Errorf("console ticket %s hangs on no lease: refused (herdctl writes tickets under a %s lease)", id, TicketTTL)
	case time.Since(t.Created) > 2*TicketTTL || time.Until(t.Created) > TicketTTL:
		return http.StatusForbidden, fmt.Errorf("console ticket %s was written at %s: too old (or the clocks disagree by over a minute)", id, t.Created.UTC().Format(time.RFC3339))
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	for k, at := range s.used {
		if now.Sub(at) > 3*TicketTTL {
			delete(s.used, k)
		}
	}
	if _, dup := s.used[id]; dup {
		return http.StatusForbidden, fmt.Errorf("console ticket %s was used already", id)
	}
	if s.used == nil {
		s.used = map[string]time.Time{}
	}
	s.used[id] = now
	return 0, nil
}

// pump copies both ways until either side ends, then closes both, and returns how many bytes the
// caller typed. in holds what the HTTP server buffered beyond the request.
func pump(conn io.ReadWriteCloser, in *bufio.Reader, con io.ReadWriteCloser) int64 {
	var typed int64
	done := make(chan struct{}, 2)
	go func() {
		typed, _ = io.Copy(con, in)
		done <- struct{}{}
	}()
	go func() {
		_, _ = io.Copy(conn, con)
		done <- struct{}{}
	}()
	<-done
	_ = conn.Close()
	_ = con.Close()
	<-done
	return typed
}

func (s *Server) record(vm, action, format string, args ...any) {
	if s.Log != nil {
		s.Log.Info(fmt.Sprintf(format, args...), "vm", vm, "action", action)
	}
	if s.Record != nil {
		s.Record("vm/"+vm, action, format, args...)
	}
}

func (s *Server) holder(vm string) (holder, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	h, ok := s.holders[vm]
	return h, ok
}

func (s *Server) setHolder(vm string, h holder) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.holders == nil {
		s.holders = map[string]holder{}
	}
	s.holders[vm] = h
}

// clearHolder forgets the session that started at since, unless a forced one replaced it.
func (s *Server) clearHolder(vm string, since time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if h, ok := s.holders[vm]; ok && h.since.Equal(since) {
		delete(s.holders, vm)
	}
}
