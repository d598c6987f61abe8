// Package statusserver serves a daemon's HTTP status endpoint: /metrics for Prometheus, /healthz,
// and whatever the daemon adds (an agent's own report of its domains, say).
package statusserver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// NewRegistry is a registry with the Go runtime and process collectors, which every daemon exports.
func NewRegistry() *prometheus.Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return r
}

// Server is a started listener; URL is where it serves.
type Server struct {
	URL string
	srv *http.Server
	l   net.Listener
}

// Listen binds addr (host:port; port 0 picks one) and returns a server ready to Serve. Binding
// first lets the caller learn the real address before it advertises it.
func Listen(addr string, reg *prometheus.Registry, mux *http.ServeMux) (*Server, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("status endpoint %s: %w", addr, err)
	}
	if mux == nil {
		mux = http.NewServeMux()
	}
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	host, port, _ := net.SplitHostPort(l.Addr().String())
	if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	return &Server{
		URL: "http://" + net.JoinHostPort(host, port),
		srv: &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second},
		l:   l,
	}, nil
}

// Serve runs until ctx ends, then shuts down gracefully.
func (s *Server) Serve(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- s.srv.Serve(s.l) }()
	select {
	case err := <-errc:
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return err
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = s.srv.Shutdown(sctx)
		return nil
	}
}

// Profiles adds Go's runtime profiles (CPU, heap, goroutines, ...) under /debug/pprof/ to mux: for
// finding where a leader's time goes at scale. Off by default: a heap profile shows memory
// contents' shapes and a CPU profile costs the daemon while it runs.
func Profiles(mux *http.ServeMux) {
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
}
