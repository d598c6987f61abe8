// Package tftp serves the iPXE binaries, and nothing else, over TFTP (pin/tftp: tsize and blksize
// are negotiated). Bigger files go over HTTP once iPXE runs.
//
// A file may be asked for as "<mac>/<file>" (12 hex digits): the bootserver hands out such names when
// it wants a machine to chainload its own iPXE, and remembers that the machine did, so that the iPXE
// then asking again gets the boot script instead of the same binary in a loop.
package tftp

import (
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/pin/tftp/v3"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/herdhq/herd/lib/keys"
)

var (
	nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
	macRE  = regexp.MustCompile(`^[0-9a-f]{12}$`)
)

// ParsePath splits a requested file name into the optional MAC prefix and the file, refusing
// anything that is not a plain file name (no directories, no "..").
func ParsePath(p string) (mac, name string, err error) {
	p = strings.TrimPrefix(p, "/")
	if dir, file, ok := strings.Cut(p, "/"); ok {
		if !macRE.MatchString(strings.ToLower(dir)) {
			return "", "", fmt.Errorf("bad path %q", p)
		}
		m, _ := keys.NormalizeHWID(dir)
		mac, p = m, file
	}
	if !nameRE.MatchString(p) || strings.Contains(p, "..") {
		return "", "", fmt.Errorf("bad file name %q", p)
	}
	return mac, p, nil
}

// MACPath is the per-machine name of file for mac (as ParsePath reads it).
func MACPath(mac, file string) string {
	return strings.ReplaceAll(mac, ":", "") + "/" + file
}

// Fetched remembers which machines recently loaded the bootserver's iPXE over TFTP.
type Fetched struct {
	TTL time.Duration
	mu  sync.Mutex
	at  map[string]time.Time
}

// NewFetched remembers fetches for ttl.
func NewFetched(ttl time.Duration) *Fetched { return &Fetched{TTL: ttl, at: map[string]time.Time{}} }

// Mark records that mac loaded the binary now.
func (f *Fetched) Mark(mac string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := time.Now()
	for k, t := range f.at { // keep the map small without a janitor
		if now.Sub(t) > f.TTL {
			delete(f.at, k)
		}
	}
	f.at[mac] = now
}

// Recent reports whether mac loaded the binary within the TTL.
func (f *Fetched) Recent(mac string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	t, ok := f.at[mac]
	return ok && time.Since(t) <= f.TTL
}

// Server is the TFTP service.
type Server struct {
	dir     string
	fetched *Fetched
	log     hclog.Logger
	reqs    *prometheus.CounterVec
	srv     *tftp.Server
}

// New serves the files of dir (e.g. /usr/lib/ipxe).
func New(dir string, fetched *Fetched, log hclog.Logger, reqs *prometheus.CounterVec) *Server {
	s := &Server{dir: dir, fetched: fetched, log: log.Named("tftp"), reqs: reqs}
	s.srv = tftp.NewServer(s.read, nil)
	s.srv.SetTimeout(2 * time.Second)
	s.srv.SetRetries(5)
	s.srv.SetHook(s)
	return s
}

func (s *Server) count(outcome string) {
	if s.reqs != nil {
		s.reqs.WithLabelValues("tftp", outcome).Inc()
	}
}

func (s *Server) read(filename string, rf io.ReaderFrom) error {
	remote := ""
	if ot, ok := rf.(tftp.OutgoingTransfer); ok {
		addr := ot.RemoteAddr()
		remote = addr.String()
	}
	_, name, err := ParsePath(filename)
	if err != nil {
		s.count("refused")
		s.log.Warn("refused", "file", filename, "remote", remote, "error", err)
		return err
	}
	f, err := os.Open(filepath.Join(s.dir, name))
	if err != nil {
		s.count("not_found")
		s.log.Warn("file not found", "file", name, "remote", remote)
		return fmt.Errorf("%s: not found", name)
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
		s.count("not_found")
		return fmt.Errorf("%s: not a file", name)
	}
	_, err = rf.ReadFrom(f) // os.File seeks, so tsize is answered
	return err
}

// OnSuccess implements tftp.Hook.
func (s *Server) OnSuccess(st tftp.TransferStats) {
	mac, name, _ := ParsePath(st.Filename)
	if mac != "" && s.fetched != nil {
		s.fetched.Mark(mac)
	}
	s.count("ok")
	s.log.Info("transfer done", "file", name, "mac", mac, "remote", st.RemoteAddr, "duration", st.Duration, "datagrams", st.DatagramsSent)
}

// OnFailure implements tftp.Hook.
func (s *Server) OnFailure(st tftp.TransferStats, err error) {
	s.count("failed")
	s.log.Warn("transfer failed", "file", st.Filename, "remote", st.RemoteAddr, "duration", st.Duration, "error", err)
}

// Serve answers on conn until Shutdown.
func (s *Server) Serve(conn net.PacketConn) error { return s.srv.Serve(conn) }

// Shutdown stops the server.
func (s *Server) Shutdown() { s.srv.Shutdown() }
