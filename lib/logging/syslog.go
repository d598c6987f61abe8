package logging

import (
	"bytes"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"
)

// Syslog ships log lines to a syslog collector as RFC 5424 messages over UDP: a netbooted hypervisor
// has no disk to keep its logs on. Sending never blocks or fails logging: a lost datagram is a lost
// line, never a stuck agent.
type Syslog struct {
	mu       sync.Mutex
	conn     net.Conn
	hostname string
	app      string
	pid      int
}

// DialSyslog connects to target, written udp://host:port or host:port (port 514 if omitted).
func DialSyslog(target, app string) (*Syslog, error) {
	addr := target
	if u, err := url.Parse(target); err == nil && u.Scheme != "" {
		if u.Scheme != "udp" {
			return nil, fmt.Errorf("syslog target %q: only udp:// is supported", target)
		}
		addr = u.Host
	}
	if _, _, err := net.SplitHostPort(addr); err != nil {
		addr = net.JoinHostPort(addr, "514")
	}
	conn, err := net.Dial("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("syslog target %q: %w", target, err)
	}
	host, _ := os.Hostname()
	if host == "" {
		host = "-"
	}
	return &Syslog{conn: conn, hostname: host, app: app, pid: os.Getpid()}, nil
}

// severity maps hclog's level markers (text or JSON) to syslog severities.
func severity(line []byte) int {
	switch {
	case bytes.Contains(line, []byte("[ERROR]")), bytes.Contains(line, []byte(`"@level":"error"`)):
		return 3
	case bytes.Contains(line, []byte("[WARN]")), bytes.Contains(line, []byte(`"@level":"warn"`)):
		return 4
	case bytes.Contains(line, []byte("[INFO]")), bytes.Contains(line, []byte(`"@level":"info"`)):
		return 6
	}
	return 7
}

// Write sends each line of p as one message (facility daemon).
func (s *Syslog) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, line := range bytes.Split(bytes.TrimRight(p, "\n"), []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		pri := 3*8 + severity(line)
		msg := fmt.Sprintf("<%d>1 %s %s %s %d - - %s", pri, time.Now().UTC().Format(time.RFC3339Nano), s.hostname, s.app, s.pid, strings.TrimSpace(string(line)))
		_, _ = s.conn.Write([]byte(msg))
	}
	return len(p), nil
}

// Close releases the socket.
func (s *Syslog) Close() error { return s.conn.Close() }
