// Package httpboot is the HTTP side of herd's boot server: iPXE scripts that decide, per machine,
// what it boots, and the image files themselves (immutable, versioned URLs with range support).
package httpboot

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"

	"github.com/herdhq/herd/bootserver/ipxe"
	"github.com/herdhq/herd/lib/images"
	"github.com/herdhq/herd/lib/keys"
)

// Machine is what a booting machine tells about itself through iPXE.
type Machine struct {
	MAC    string // normalised
	UUID   string
	Serial string
	Arch   string
	Remote string
}

// Target is what an enrolled machine boots.
type Target struct {
	HWID    string
	Version string
	Image   *keys.Image
}

// ErrUnknown means the machine is not enrolled.
var ErrUnknown = errors.New("machine not enrolled")

// Unknown is ErrUnknown with why the machine is not recognised, when there is more to say than
// that nobody enrolled it ("" for nothing more).
func Unknown(reason string) error {
	if reason == "" {
		return ErrUnknown
	}
	return &unknownError{reason}
}

type unknownError struct{ reason string }

func (e *unknownError) Error() string        { return "machine not enrolled: " + e.reason }
func (e *unknownError) Is(target error) bool { return target == ErrUnknown }

// Reason is why an unknown machine is not recognised ("" when nobody enrolled it).
func Reason(err error) string {
	var u *unknownError
	if errors.As(err, &u) {
		return u.reason
	}
	return ""
}

// Backend answers per machine; the bootserver's etcd backend implements it.
type Backend interface {
	// Resolve finds the enrolled hardware by MAC, else by serial, and the image it boots.
	Resolve(ctx context.Context, m Machine) (Target, error)
	// Discovered records an unknown machine's attempt, with why it is not recognised ("" when
	// nobody enrolled it).
	Discovered(ctx context.Context, m Machine, reason string) error
	// Image returns a catalogue entry.
	Image(version string) (*keys.Image, bool)
	// JoinToken mints a one-time join token for this boot of hwid, spendable only by a join that
	// names the boot NIC mac.
	JoinToken(ctx context.Context, hwid, mac string) (string, error)
}

// Config of the HTTP service.
type Config struct {
	// Base is the URL nodes reach this server at, e.g. http://10.99.0.1:8080.
	Base string
	// Params are kernel command line parameters every node gets (etcd endpoints, syslog target).
	Params []string
	// Retry is how long an unknown machine waits before asking again.
	Retry time.Duration
	// Join, when set, gives every boot a one-time join token and tells the node where to use it
	// (herd.join=, comma-separated coordinator URLs) and which CA to trust (herd.ca=CAHash).
	Join   []string
	CAHash string
}

// Handler serves /boot.ipxe, /ipxe and /images/.
type Handler struct {
	cfg     Config
	backend Backend
	store   *images.Store
	log     hclog.Logger
	reqs    *prometheus.CounterVec
	// reports bounds what unauthenticated /report requests can make this server log.
	reports *rate.Limiter
}

// New builds the handler; reqs counts requests by stage and outcome.
func New(cfg Config, b Backend, store *images.Store, log hclog.Logger, reqs *prometheus.CounterVec) *Handler {
	if cfg.Retry == 0 {
		cfg.Retry = 10 * time.Second
	}
	return &Handler{cfg: cfg, backend: b, store: store, log: log.Named("http"), reqs: reqs, reports: rate.NewLimiter(1, 10)}
}

// Register adds the routes to mux.
func (h *Handler) Register(mux *http.ServeMux) {
	mux.HandleFunc("GET /boot.ipxe", h.chain)
	mux.HandleFunc("GET /ipxe", h.script)
	mux.HandleFunc("GET /report", h.report)
	mux.HandleFunc("GET /images/{version}/{file}", h.image)
	mux.HandleFunc("HEAD /images/{version}/{file}", h.image)
}

func (h *Handler) count(stage, outcome string) {
	if h.reqs != nil {
		h.reqs.WithLabelValues(stage, outcome).Inc()
	}
}

func writeScript(w http.ResponseWriter, s string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write([]byte(s))
}

func (h *Handler) chain(w http.ResponseWriter, r *http.Request) {
	h.count("chain", "ok")
	writeScript(w, ipxe.Chain(h.cfg.Base))
}

// ParseMachine reads the query iPXE sends. Garbage is refused, never guessed at.
func ParseMachine(q url.Values, remote string) (Machine, error) {
	raw := q.Get("mac")
	if raw == "" {
		return Machine{}, errors.New("mac is required")
	}
	mac, err := keys.NormalizeMAC(strings.ReplaceAll(raw, "-", ":"))
	if err != nil {
		return Machine{}, err
	}
	m := Machine{MAC: mac, Remote: remote}
	clean := func(name string, max int) (string, error) {
		v := strings.TrimSpace(q.Get(name))
		if len(v) > max {
			return "", fmt.Errorf("%s is longer than %d", name, max)
		}
		for _, c := range v {
			if c < 0x20 || c > 0x7e {
				return "", fmt.Errorf("%s has a control or non-ASCII character", name)
			}
		}
		return v, nil
	}
	if m.UUID, err = clean("uuid", 64); err != nil {
		return m, err
	}
	if m.Serial, err = clean("serial", 64); err != nil {
		return m, err
	}
	if m.Arch, err = clean("arch", 16); err != nil {
		return m, err
	}
	return m, nil
}

func (m Machine) query() string {
	q := url.Values{}
	q.Set("mac", strings.ReplaceAll(m.MAC, ":", "-"))
	for k, v := range map[string]string{"uuid": m.UUID, "serial": m.Serial, "arch": m.Arch} {
		if v != "" {
			q.Set(k, v)
		}
	}
	// Encode writes spaces as '+', which ipxe.Wait's conservative query check refuses; a literal
	// '+' is already %2B, so every '+' is a space. (SMBIOS serials of white-box machines say "To
	// Be Filled By O.E.M.": found by FuzzParseMachine.)
	return strings.ReplaceAll(q.Encode(), "+", "%20")
}

func (h *Handler) script(w http.ResponseWriter, r *http.Request) {
	host, _, _ := net.SplitHostPort(r.RemoteAddr)
	m, err := ParseMachine(r.URL.Query(), host)
	if err != nil {
		h.count("script", "bad_request")
		h.log.Warn("bad iPXE request", "remote", r.RemoteAddr, "error", err)
		http.Error(w, "bad request: "+err.Error(), http.StatusBadRequest)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	t, err := h.backend.Resolve(ctx, m)
	switch {
	case errors.Is(err, ErrUnknown):
		why := Reason(err)
		if derr := h.backend.Discovered(ctx, m, why); derr != nil {
			h.log.Warn("could not record discovered machine", "mac", m.MAC, "error", derr)
		}
		h.count("script", "unknown")
		msg := "this machine is not enrolled, waiting for approval"
		if why != "" {
			// The reason quotes what the machine sent: it stays out of the script.
			msg = "not recognised by its serial number: enrol it by MAC (herdctl hw discovered says why)"
		}
		writeScript(w, ipxe.Wait(h.cfg.Base, m.query(), msg, h.cfg.Retry))
		return
	case err != nil:
		h.count("script", "not_bootable")
		h.log.Warn("enrolled machine cannot boot yet", "mac", m.MAC, "error", err)
		writeScript(w, ipxe.Wait(h.cfg.Base, m.query(), "no bootable image yet", h.cfg.Retry))
		return
	}
	// herd.boot lets a node that cannot run its image say why (GET /report) before it has anything
	// else: no certificate, no etcd, maybe not even enough memory to unpack all of the image.
	params := append([]string{"herd.hwid=" + t.HWID, "herd.mac=" + m.MAC, "herd.image=" + t.Version, "herd.boot=" + h.cfg.Base}, h.cfg.Params...)
	if t.Image.Cmdline != "" {
		params = append(params, strings.Fields(t.Image.Cmdline)...)
	}
	if len(h.cfg.Join) > 0 {
		// Minted per script served: every boot, and every retry of a boot, has its own token,
		// valid once and briefly. Never logged.
		tok, err := h.backend.JoinToken(ctx, t.HWID, m.MAC)
		if err != nil {
			h.count("script", "not_bootable")
			h.log.Error("cannot mint a join token; the node waits", "mac", m.MAC, "hwid", t.HWID, "error", err)
			writeScript(w, ipxe.Wait(h.cfg.Base, m.query(), "cannot mint a join token, retrying", h.cfg.Retry))
			return
		}
		params = append(params, "herd.join="+strings.Join(h.cfg.Join, ","), "herd.ca="+h.cfg.CAHash, "herd.token="+tok)
	}
	s, err := ipxe.Boot(h.cfg.Base, t.Version, t.Image.Kernel.Name, t.Image.Initrd.Name, params)
	if err != nil {
		h.count("script", "error")
		h.log.Error("cannot render boot script", "mac", m.MAC, "error", err)
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	h.count("script", "boot")
	h.log.Info("boot script served", "mac", m.MAC, "hwid", t.HWID, "image", t.Version, "remote", m.Remote)
	writeScript(w, s)
}

func (h *Handler) image(w http.ResponseWriter, r *http.Request) {
	version, file := r.PathValue("version"), r.PathValue("file")
	im, ok := h.backend.Image(version)
	if !ok {
		h.count("image", "not_found")
		http.NotFound(w, r)
		return
	}
	f, err := h.store.Open(version, file, im)
	if err != nil {
		h.count("image", "not_served")
		h.log.Warn("image file not served", "version", version, "file", file, "remote", r.RemoteAddr, "error", err)
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	start := time.Now()
	// The server's write timeout suits scripts; a file gets time for its size at a slow 1 MB/s.
	_ = http.NewResponseController(w).SetWriteDeadline(start.Add(30*time.Second + time.Duration(st.Size()/(1<<20))*time.Second))
	// Versions are immutable: a URL always means the same bytes.
	w.Header().Set("Cache-Control", "public, max-age=31536000, immutable")
	w.Header().Set("Content-Type", "application/octet-stream")
	http.ServeContent(w, r, file, st.ModTime(), f)
	h.count("image", "ok")
	h.log.Debug("image file served", "version", version, "file", file, "remote", r.RemoteAddr, "range", r.Header.Get("Range"), "duration", time.Since(start))
}

// Problems a booting node can report before it can reach etcd.
var reportProblems = map[string]string{
	"memory": "too little memory for its image",
}

// Report is a booting node's GET /report: a problem that keeps it from running its image.
type Report struct {
	MAC     string
	Problem string
	Image   string
	HaveMiB int64
	NeedMiB int64
}

// ParseReport reads a /report query; anything unexpected is refused.
func ParseReport(q url.Values) (Report, error) {
	mac, err := keys.NormalizeMAC(strings.ReplaceAll(q.Get("mac"), "-", ":"))
	if err != nil {
		return Report{}, err
	}
	r := Report{MAC: mac, Problem: q.Get("problem"), Image: q.Get("image")}
	if _, ok := reportProblems[r.Problem]; !ok {
		return r, fmt.Errorf("unknown problem %q", r.Problem)
	}
	if r.Image == "" || len(r.Image) > 64 || !ipxe.Safe(r.Image) {
		return r, errors.New("bad image version")
	}
	for name, dst := range map[string]*int64{"have_mib": &r.HaveMiB, "need_mib": &r.NeedMiB} {
		v, err := strconv.ParseInt(q.Get(name), 10, 64)
		if err != nil || v < 0 || v > 1<<32 {
			return r, fmt.Errorf("%s: want a number of MiB", name)
		}
		*dst = v
	}
	return r, nil
}

// report logs what a node that cannot run its image says about itself. Anyone on the boot network
// can send one: it is only ever logged and counted, at a bounded rate, never acted upon.
func (h *Handler) report(w http.ResponseWriter, r *http.Request) {
	rep, err := ParseReport(r.URL.Query())
	if err != nil {
		h.count("report", "bad_request")
		http.Error(w, "bad request: "+err.Error(), http.StatusBadRequest)
		return
	}
	if !h.reports.Allow() {
		h.count("report", "rate_limited")
		http.Error(w, "too many reports", http.StatusTooManyRequests)
		return
	}
	h.count("report", rep.Problem)
	h.log.Error("machine cannot run its image: "+reportProblems[rep.Problem], "mac", rep.MAC, "image", rep.Image,
		"memory_mib", rep.HaveMiB, "needs_mib", rep.NeedMiB, "remote", r.RemoteAddr)
	w.WriteHeader(http.StatusNoContent)
}
