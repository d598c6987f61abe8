package tftp

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/ipv4"
)

// The server side of TFTP is herd's own, read-only and small: RFC 1350 with the option extension
// (RFC 2347) for blksize (2348), tsize and timeout (2349) and windowsize (7440). pin/tftp, which
// herd used before, answers every refusal with error code 1, echoes an invalid tsize back in its
// OACK, and, handed anything but a bare *net.UDPConn, falls back to 512-byte blocks sent from an
// unbound address (so a guard in front of it would slow every boot and break multi-homed servers).
// docs/bootserver.md says more; pin/tftp's client stays in the tests as an independent client.

// TFTP opcodes and error codes (RFC 1350, 2347).
const (
	opRRQ   = 1
	opWRQ   = 2
	opDATA  = 3
	opACK   = 4
	opERROR = 5
	opOACK  = 6

	errNotDefined       = 0
	errFileNotFound     = 1
	errAccessViolation  = 2
	errIllegalOperation = 4
	errUnknownTID       = 5
	errOptionRefused    = 8
)

// Limits bound what TFTP clients may take at once.
type Limits struct {
	// Transfers caps transfers running at once (default 50, as dnsmasq's tftp-max). Requests past
	// either limit go unanswered, so that the client retries rather than giving up its boot.
	Transfers int
	// PerClient caps one address's transfers at once (default 4).
	PerClient int
	// Timeout is the default retransmission timeout (default 2 s; a client may ask for another
	// with the timeout option); Retries how often a block is sent before giving up (default 5).
	Timeout time.Duration
	Retries int
}

func (l *Limits) defaults() {
	if l.Transfers == 0 {
		l.Transfers = 50
	}
	if l.PerClient == 0 {
		l.PerClient = 4
	}
	if l.Timeout == 0 {
		l.Timeout = 2 * time.Second
	}
	if l.Retries == 0 {
		l.Retries = 5
	}
}

// Server is the TFTP service.
type Server struct {
	dir     string
	fetched *Fetched
	log     hclog.Logger
	reqs    *prometheus.CounterVec
	lim     Limits

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// slots holds one token per transfer under way. At the limit the server stops reading
	// requests: they wait in the socket's buffer (and the client's retries with them) until a
	// transfer ends, as dnsmasq does past its tftp-max. Neither refused nor lost: an error would end
	// the client's PXE attempt, and a dropped request costs it a whole retry timeout.
	slots chan struct{}

	mu   sync.Mutex
	byIP map[string]int

	files fileCache
}

// New serves the files of dir (e.g. /usr/lib/ipxe) within lim.
func New(dir string, fetched *Fetched, lim Limits, log hclog.Logger, reqs *prometheus.CounterVec) *Server {
	lim.defaults()
	ctx, cancel := context.WithCancel(context.Background())
	return &Server{dir: dir, fetched: fetched, log: log.Named("tftp"), reqs: reqs, lim: lim, ctx: ctx, cancel: cancel, byIP: map[string]int{},
		slots: make(chan struct{}, lim.Transfers)}
}

func (s *Server) count(outcome string) {
	if s.reqs != nil {
		s.reqs.WithLabelValues("tftp", outcome).Inc()
	}
}

// request is one read request as received.
type request struct {
	peer    *net.UDPAddr
	local   net.IP // the address the client sent to; transfers answer from it
	mtu     int    // of the interface it arrived on (0: unknown)
	file    string
	name    string // the file in the directory
	mac     string // from a per-machine path
	options [][2]string
}

// Serve answers on conn until Shutdown. With a *net.UDPConn the transfers answer from the very
// address each request was sent to, and blocks fit the interface's MTU.
func (s *Server) Serve(conn net.PacketConn) error {
	var pc *ipv4.PacketConn
	if uc, ok := conn.(*net.UDPConn); ok {
		pc = ipv4.NewPacketConn(uc)
		if err := pc.SetControlMessage(ipv4.FlagDst|ipv4.FlagInterface, true); err != nil {
			pc = nil // no control messages here: answer from the socket's own address
		}
	}
	stop := context.AfterFunc(s.ctx, func() { conn.Close() })
	defer stop()
	buf := make([]byte, 65536)
	for {
		select {
		case s.slots <- struct{}{}:
		case <-s.ctx.Done():
			return nil
		}
		var (
			n    int
			src  net.Addr
			err  error
			dst  net.IP
			ifix int
		)
		if pc != nil {
			var cm *ipv4.ControlMessage
			n, cm, src, err = pc.ReadFrom(buf)
			if cm != nil {
				dst, ifix = cm.Dst, cm.IfIndex
			}
		} else {
			n, src, err = conn.ReadFrom(buf)
		}
		if err != nil {
			<-s.slots
			if s.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("tftp: read: %w", err)
		}
		if !s.handle(conn, buf[:n], src, dst, ifix) {
			<-s.slots // no transfer started
		}
	}
}

// handle answers one packet on the server port; true when a transfer started (it gives its slot
// back when it ends).
func (s *Server) handle(conn net.PacketConn, p []byte, src net.Addr, dst net.IP, ifix int) bool {
	peer, ok := src.(*net.UDPAddr)
	if !ok || len(p) < 2 {
		return false
	}
	switch binary.BigEndian.Uint16(p) {
	case opRRQ:
		req, code, why := s.parse(p, peer)
		if why != "" {
			s.refuse(conn, peer, req.file, code, why)
			return false
		}
		req.local = localAddr(conn, dst)
		if ifix > 0 {
			if ifc, err := net.InterfaceByIndex(ifix); err == nil {
				req.mtu = ifc.MTU
			}
		}
		if why := s.reserve(peer); why != "" {
			// Not answered: the client sends its request again after a timeout, while an
			// error would end its PXE attempt (most ROMs then try the next boot device).
			s.count("busy")
			s.log.Debug("request ignored: at the per-client transfer limit; the client will ask again", "file", req.file, "remote", peer, "why", why)
			return false
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() { <-s.slots }()
			defer s.release(peer)
			s.transfer(req)
		}()
		return true
	case opWRQ:
		s.refuse(conn, peer, "", errAccessViolation, "this server only sends files")
	}
	// Anything else on the server port is stray: transfers run on their own ports.
	return false
}

// localAddr is the address to answer from: where the request was sent, unless that was a
// broadcast (then the socket's own address, or any).
func localAddr(conn net.PacketConn, dst net.IP) net.IP {
	if dst != nil && !dst.IsUnspecified() && !dst.Equal(net.IPv4bcast) && !dst.IsMulticast() {
		return dst
	}
	if ua, ok := conn.LocalAddr().(*net.UDPAddr); ok && !ua.IP.IsUnspecified() {
		return ua.IP
	}
	return nil
}

// Shutdown stops accepting requests and waits for the transfers under way.
func (s *Server) Shutdown() {
	s.cancel()
	s.wg.Wait()
}

// parse checks a read request; on refusal it returns the RFC 1350 code and why.
func (s *Server) parse(p []byte, peer *net.UDPAddr) (request, uint16, string) {
	req := request{peer: peer}
	parts := bytes.Split(p[2:], []byte{0})
	if len(parts) < 3 || len(parts)%2 == 0 || len(parts[len(parts)-1]) != 0 {
		return req, errIllegalOperation, "malformed request"
	}
	req.file = string(parts[0])
	if mode := string(bytes.ToLower(parts[1])); mode != "octet" && mode != "netascii" {
		return req, errIllegalOperation, "unknown transfer mode"
	}
	// netascii is served as octet: the files are binaries, and every PXE client asks octet.
	mac, name, err := ParsePath(req.file)
	if err != nil {
		return req, errAccessViolation, "not a file this server serves"
	}
	req.mac, req.name = mac, name
	if st, err := os.Stat(filepath.Join(s.dir, name)); err != nil || !st.Mode().IsRegular() {
		return req, errFileNotFound, name + ": not found"
	}
	opts := parts[2 : len(parts)-1]
	for i := 0; i+1 < len(opts); i += 2 {
		req.options = append(req.options, [2]string{string(bytes.ToLower(opts[i])), string(opts[i+1])})
	}
	return req, 0, ""
}

// reserve counts a transfer for peer, or says why it may not start.
func (s *Server) reserve(peer *net.UDPAddr) string {
	ip := peer.IP.String()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.byIP[ip] >= s.lim.PerClient {
		return fmt.Sprintf("too many transfers from %s (%d at once)", ip, s.lim.PerClient)
	}
	s.byIP[ip]++
	return ""
}

func (s *Server) release(peer *net.UDPAddr) {
	ip := peer.IP.String()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.byIP[ip]--; s.byIP[ip] <= 0 {
		delete(s.byIP, ip)
	}
}

func errorPacket(code uint16, msg string) []byte {
	p := binary.BigEndian.AppendUint16(nil, opERROR)
	p = binary.BigEndian.AppendUint16(p, code)
	return append(append(p, msg...), 0)
}

// refuse answers a request with an error, from a port of its own as a transfer would be (clients
// such as curl take the first answer's port as the transfer's and cannot read an error from port
// 69); from the server port only if no port can be had.
func (s *Server) refuse(conn net.PacketConn, peer net.Addr, file string, code uint16, why string) {
	var local net.IP
	if ua, ok := conn.LocalAddr().(*net.UDPAddr); ok && !ua.IP.IsUnspecified() {
		local = ua.IP
	}
	if c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: local}); err == nil {
		_, _ = c.WriteTo(errorPacket(code, why), peer)
		c.Close()
	} else {
		_, _ = conn.WriteTo(errorPacket(code, why), peer)
	}
	s.count("refused")
	s.log.Debug("refused", "file", file, "remote", peer, "code", code, "why", why)
}

// negotiated are a transfer's parameters after option negotiation.
type negotiated struct {
	blksize, window int
	timeout         time.Duration
	oack            [][2]string // the options accepted, as answered
}

// negotiate accepts the options whose values are valid (an option left out of the OACK is one the
// server declines, RFC 2347): tsize must be 0 in a read request and is answered with the size,
// blksize is 8..65464 (capped to what fits the interface's MTU), timeout 1..255 s, windowsize
// 1..64 here. Unknown options are ignored.
func (s *Server) negotiate(req request, size int64) negotiated {
	n := negotiated{blksize: 512, window: 1, timeout: s.lim.Timeout}
	num := func(v string, lo, hi int) (int, bool) {
		x, err := strconv.Atoi(v)
		return x, err == nil && x >= lo && x <= hi && strconv.Itoa(x) == v
	}
	for _, o := range req.options {
		switch o[0] {
		case "tsize":
			if o[1] == "0" {
				n.oack = append(n.oack, [2]string{"tsize", strconv.FormatInt(size, 10)})
			}
		case "blksize":
			if v, ok := num(o[1], 8, 65464); ok {
				limit := 1468 // an Ethernet frame, when the interface is not known
				if req.mtu > 0 {
					limit = req.mtu - 32 // IPv4 + UDP + TFTP headers
				}
				n.blksize = min(v, limit)
				n.oack = append(n.oack, [2]string{"blksize", strconv.Itoa(n.blksize)})
			}
		case "timeout":
			if v, ok := num(o[1], 1, 255); ok {
				n.timeout = time.Duration(v) * time.Second
				n.oack = append(n.oack, [2]string{"timeout", o[1]})
			}
		case "windowsize":
			if v, ok := num(o[1], 1, 65535); ok {
				n.window = min(v, 64)
				n.oack = append(n.oack, [2]string{"windowsize", strconv.Itoa(n.window)})
			}
		}
	}
	return n
}

// transfer sends one file to one client from its own port.
func (s *Server) transfer(req request) {
	start := time.Now()
	f, err := os.Open(filepath.Join(s.dir, req.name))
	if err != nil {
		s.count("not_found")
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return
	}
	// A socket connected to the client: the kernel delivers only its packets (a stray packet from
	// another port is answered with ICMP port unreachable, the connected-socket form of RFC 1350's
	// "unknown transfer ID" error), and no packet needs an address resolved or allocated.
	conn, err := net.DialUDP("udp4", &net.UDPAddr{IP: req.local}, req.peer)
	if err != nil {
		s.count("failed")
		s.log.Warn("cannot open a transfer port", "remote", req.peer, "error", err)
		return
	}
	defer conn.Close()
	// A shutdown ends a transfer waiting for its client at once.
	defer context.AfterFunc(s.ctx, func() { conn.Close() })()
	var file io.ReaderAt = f
	if st.Size() <= inMemory {
		data, err := s.files.get(f, st)
		if err != nil {
			s.count("failed")
			s.log.Warn("cannot read the file to send", "file", req.name, "error", err)
			return
		}
		file = bytes.NewReader(data)
	}
	// Senders are reused: each carries 65 KiB of packet buffer, garbage 200 times over in a boot
	// storm otherwise.
	t := senders.Get().(*sender)
	defer senders.Put(t)
	*t = sender{ctx: s.ctx, conn: conn, file: file, size: st.Size(), lim: s.lim, buf: t.buf, in: t.in}
	t.negotiated = s.negotiate(req, st.Size())
	sent, err := t.run()
	if err != nil {
		s.count("failed")
		s.log.Warn("transfer failed", "file", req.name, "remote", req.peer, "sent", sent, "duration", time.Since(start), "error", err)
		return
	}
	if req.mac != "" && s.fetched != nil {
		s.fetched.Mark(req.mac)
	}
	s.count("ok")
	s.log.Info("transfer done", "file", req.name, "mac", req.mac, "remote", req.peer, "bytes", sent, "blksize", t.blksize, "window", t.window, "duration", time.Since(start))
}

// sender runs one transfer's lock-step (or windowed) exchange.
// inMemory is the largest file a transfer reads whole before sending.
const inMemory = 8 << 20

// fileCache holds the small files transfers send (iPXE's first stages: every booting machine
// fetches the same one), so a storm of 200 machines reads each once rather than 200 times. An
// entry is used only while the file's size and modification time are what they were when it was
// read: a file replaced on disk is read again.
type fileCache struct {
	mu    sync.Mutex
	files map[string]cachedFile
	bytes int
}

type cachedFile struct {
	size  int64
	mtime time.Time
	data  []byte
}

// cacheBytes bounds the cache: past it, it starts over.
const cacheBytes = 64 << 20

// get returns f's contents, st being f's stat.
func (c *fileCache) get(f *os.File, st os.FileInfo) ([]byte, error) {
	name := f.Name()
	c.mu.Lock()
	e, ok := c.files[name]
	c.mu.Unlock()
	if ok && e.size == st.Size() && e.mtime.Equal(st.ModTime()) {
		return e.data, nil
	}
	data := make([]byte, st.Size())
	if _, err := io.ReadFull(f, data); err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.files == nil || c.bytes+len(data) > cacheBytes {
		c.files, c.bytes = map[string]cachedFile{}, 0
	}
	c.bytes += len(data) - len(c.files[name].data)
	c.files[name] = cachedFile{size: st.Size(), mtime: st.ModTime(), data: data}
	return data, nil
}

type sender struct {
	negotiated
	ctx  context.Context
	conn *net.UDPConn // connected to the client
	file io.ReaderAt
	size int64
	lim  Limits
	buf  *[65536]byte
	in   *[1024]byte
	// deadline is the socket's read deadline now.
	deadline time.Time
}

var senders = sync.Pool{New: func() any { return &sender{buf: new([65536]byte), in: new([1024]byte)} }}

// errClient: the client ended the transfer with an error packet.
var errClient = errors.New("the client ended the transfer")

// run sends the OACK (if any option was accepted) and the data, and returns the bytes sent.
func (t *sender) run() (int64, error) {
	if len(t.oack) > 0 {
		p := binary.BigEndian.AppendUint16(nil, opOACK)
		for _, o := range t.oack {
			p = append(append(append(append(p, o[0]...), 0), o[1]...), 0)
		}
		if err := t.exchange(func() error { _, err := t.conn.Write(p); return err }, 0); err != nil {
			return 0, fmt.Errorf("option acknowledgement: %w", err)
		}
	}
	// Block numbers are uint16 and wrap (RFC 1350 says nothing; every client of note rolls over to
	// 0), so progress is counted in blocks and converted per packet.
	blocks := t.size/int64(t.blksize) + 1 // the last one is short, possibly empty
	var acked int64                       // blocks the client has confirmed
	for acked < blocks {
		first := acked
		last := min(first+int64(t.window), blocks)
		send := func() error {
			for b := first; b < last; b++ {
				if err := t.sendBlock(b); err != nil {
					return err
				}
			}
			return nil
		}
		got, err := t.exchangeUpTo(send, first, last)
		if err != nil {
			return min(acked*int64(t.blksize), t.size), err
		}
		acked = got
	}
	return t.size, nil
}

// sendBlock sends block b (counted from 0; numbered b+1 on the wire).
func (t *sender) sendBlock(b int64) error {
	p := t.buf[:4+t.blksize]
	binary.BigEndian.PutUint16(p, opDATA)
	binary.BigEndian.PutUint16(p[2:], uint16(b+1))
	n, err := t.file.ReadAt(p[4:], b*int64(t.blksize))
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("read: %w", err)
	}
	_, err = t.conn.Write(p[:4+n])
	return err
}

// exchange sends (and resends on timeout) until the client acknowledges block number want.
func (t *sender) exchange(send func() error, want uint16) error {
	got, err := t.exchangeUpTo(send, -1, int64(want))
	if err == nil && got < int64(want) {
		return fmt.Errorf("acknowledged %d, wanted %d", got, want)
	}
	return err
}

// exchangeUpTo sends a window of blocks [first, last) and waits for an acknowledgement in it,
// resending the window on timeout. It returns the blocks acknowledged (the window's first block
// number plus those the ACK confirms). With first = -1 it waits for ACK number last exactly (the
// OACK's ACK 0).
func (t *sender) exchangeUpTo(send func() error, first, last int64) (int64, error) {
	in := t.in[:]
	for try := 0; try <= t.lim.Retries; try++ {
		if err := send(); err != nil {
			return first, err
		}
		// A try waits between half the timeout and the whole of it: the deadline is moved only
		// when less than half is left, so a transfer in lockstep with a quick client does not pay
		// a timer update per block. The shutdown closes the socket: nothing needs waking early.
		if now := time.Now(); t.deadline.Sub(now) < t.timeout/2 {
			t.deadline = now.Add(t.timeout)
			if err := t.conn.SetReadDeadline(t.deadline); err != nil {
				return first, err
			}
		}
		for {
			n, err := t.conn.Read(in)
			if err != nil {
				if t.ctx.Err() != nil {
					return first, t.ctx.Err()
				}
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					break // resend
				}
				if errors.Is(err, syscall.ECONNREFUSED) {
					// ICMP port unreachable for an earlier packet: the client is gone.
					return first, fmt.Errorf("the client's port is closed: %w", err)
				}
				return first, err
			}
			if n < 4 {
				continue
			}
			switch binary.BigEndian.Uint16(in) {
			case opERROR:
				return first, errClient
			case opACK:
				num := binary.BigEndian.Uint16(in[2:])
				if first < 0 {
					if int64(num) == last {
						return last, nil
					}
					continue
				}
				// Which block of the window this number names (block b travels as b+1).
				for b := last - 1; b >= first; b-- {
					if uint16(b+1) == num {
						return b + 1, nil
					}
				}
				// An older duplicate ACK: keep waiting for this window's.
			}
		}
	}
	return first, fmt.Errorf("no acknowledgement after %d tries of %s", t.lim.Retries+1, t.timeout)
}
