package dhcp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"

	"github.com/hashicorp/go-hclog"
	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/dhcpv4/server4"
	"github.com/prometheus/client_golang/prometheus"
)

// Listen opens the DHCP socket on ifname at port (67, or 4011 for proxyDHCP requests), bound to the
// device so that the bootserver only ever answers on the provisioning interface.
func Listen(ifname string, port int) (net.PacketConn, error) {
	conn, err := server4.NewIPv4UDPConn(ifname, &net.UDPAddr{IP: net.IPv4zero, Port: port})
	if err != nil {
		return nil, fmt.Errorf("dhcp: listen on %s port %d: %w", ifname, port, err)
	}
	return conn, nil
}

// Server reads DHCP packets and sends the handler's replies. A bounded pool of workers handles them:
// a flood of packets is dropped and counted, never turned into unbounded goroutines.
type Server struct {
	Handler *Handler
	Log     hclog.Logger
	Reqs    *prometheus.CounterVec // stage, outcome
	Workers int
}

type packet struct {
	peer net.Addr
	req  *dhcpv4.DHCPv4
}

func (s *Server) count(outcome string) {
	if s.Reqs != nil {
		s.Reqs.WithLabelValues("dhcp", outcome).Inc()
	}
}

// Serve answers on conn (which the server closes) until ctx ends. port is the logical port the
// socket serves (67 or 4011).
func (s *Server) Serve(ctx context.Context, conn net.PacketConn, port int) error {
	workers := s.Workers
	if workers == 0 {
		workers = 16
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	jobs := make(chan packet, 256)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for p := range jobs {
				s.handle(ctx, conn, p, port)
			}
		}()
	}
	defer func() { close(jobs); wg.Wait() }()
	buf := make([]byte, 4096)
	for {
		n, peer, err := conn.ReadFrom(buf)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("dhcp: read: %w", err)
		}
		req, err := dhcpv4.FromBytes(append([]byte(nil), buf[:n]...))
		if err != nil {
			s.count("garbage")
			s.Log.Debug("unparsable packet", "peer", peer, "error", err)
			continue
		}
		select {
		case jobs <- packet{peer: peer, req: req}:
		default:
			s.count("dropped")
		}
	}
}

func (s *Server) handle(ctx context.Context, conn net.PacketConn, p packet, port int) {
	defer func() {
		if r := recover(); r != nil {
			s.count("panic")
			s.Log.Error("handler panic; packet dropped", "peer", p.peer, "panic", r)
		}
	}()
	reply, c, err := s.Handler.Reply(ctx, p.req, port)
	if errors.Is(err, ErrBusy) {
		s.count("busy")
		s.Log.Debug("not answered now", "mac", c.MAC, "why", err)
		return
	}
	if err != nil {
		s.count("error")
		s.Log.Warn("request failed", "mac", c.MAC, "type", p.req.MessageType(), "error", err)
		return
	}
	if reply == nil {
		s.count("ignored")
		s.Log.Trace("ignored", "mac", c.MAC, "type", p.req.MessageType(), "why", c.Reason)
		return
	}
	dest := replyAddr(p.req, p.peer)
	if _, err := conn.WriteTo(reply.ToBytes(), dest); err != nil {
		s.count("error")
		s.Log.Warn("send reply failed", "mac", c.MAC, "dest", dest, "error", err)
		return
	}
	s.count("ok")
	s.Log.Info("answered", "mac", c.MAC, "request", p.req.MessageType(), "reply", reply.MessageType(),
		"pxe", c.PXE, "ipxe", c.IPXE, "arch", c.Arch, "file", c.File, "ip", c.IP, "port", port)
}

// replyAddr follows RFC 2131 4.1: to the relay if there is one, to the client's address if it has one,
// else broadcast.
func replyAddr(req *dhcpv4.DHCPv4, peer net.Addr) net.Addr {
	if !req.GatewayIPAddr.IsUnspecified() && req.GatewayIPAddr != nil {
		return &net.UDPAddr{IP: req.GatewayIPAddr, Port: 67}
	}
	if !req.ClientIPAddr.IsUnspecified() && req.ClientIPAddr != nil {
		if u, ok := peer.(*net.UDPAddr); ok {
			return u
		}
		return &net.UDPAddr{IP: req.ClientIPAddr, Port: 68}
	}
	if u, ok := peer.(*net.UDPAddr); ok && !u.IP.IsUnspecified() && !u.IP.Equal(net.IPv4bcast) {
		return u // a test client on loopback
	}
	return &net.UDPAddr{IP: net.IPv4bcast, Port: 68}
}
