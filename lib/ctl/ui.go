package ctl

import (
	"bytes"
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/units"
)

// The operator's console (`herdctl ui`): a local web server, like `kubectl proxy`, that reads the
// cluster with the caller's own etcd credentials through watches (informers) and pushes every
// change to the browser as server-sent events. It holds no state of its own: its caches list
// again after an etcd restart or a compaction, like every informer in herd.

//go:embed ui
var uiFiles embed.FS

var uiTemplates = template.Must(template.New("").ParseFS(uiFiles, "ui/*.html"))

func uiCmd(e *env) *cobra.Command {
	var listen string
	cmd := &cobra.Command{
		Use:   "ui",
		Short: "Serve a live web view of the fleet on this machine, with your own etcd credentials",
		Long: `ui serves the operator's console on a local address (loopback by default): the fleet overview,
VMs and nodes, updated live as etcd changes (no page reloads, no polling of etcd). It reads with
the etcd credentials herdctl uses, so etcd's RBAC decides what it may see; nothing new listens on
the cluster's network. Stop it with Ctrl-C.`,
		Example: `  herdctl ui                          # prints the address to open
  herdctl ui --listen 127.0.0.1:8480`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := e.connect(); err != nil {
				return err
			}
			l, err := net.Listen("tcp", listen)
			if err != nil {
				return usagef("--listen %s: %v", listen, err)
			}
			u := newUI(e)
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			go u.run(ctx)
			srv := &http.Server{Handler: u.handler(l.Addr().String()), ReadHeaderTimeout: 10 * time.Second}
			fmt.Fprintf(e.out, "herd UI: http://%s/\n", l.Addr())
			go func() {
				<-ctx.Done()
				sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				_ = srv.Shutdown(sctx)
			}()
			if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&listen, "listen", "127.0.0.1:0", "address to serve on (port 0: any free port); keep it on loopback: whoever reaches it acts with your credentials")
	return cmd
}

// StartUI serves the console on listen with the etcd options o until ctx ends (herd dev runs it
// with its operator's certificate) and returns the address it serves.
func StartUI(ctx context.Context, o etcdutil.Options, listen string) (string, error) {
	e := &env{opts: o, timeout: 10 * time.Second, out: io.Discard, errOut: io.Discard, rawErr: io.Discard}
	if err := e.connect(); err != nil {
		return "", err
	}
	l, err := net.Listen("tcp", listen)
	if err != nil {
		e.close()
		return "", fmt.Errorf("console: listen on %s: %w", listen, err)
	}
	u := newUI(e)
	go u.run(ctx)
	srv := &http.Server{Handler: u.handler(l.Addr().String()), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(l) }()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
		e.close()
	}()
	return l.Addr().String(), nil
}

// ui keeps the caches and the latest view built from them.
type ui struct {
	e    *env
	infs map[string]*etcdutil.Informer
	// poke is signalled by every cache change; run rebuilds the view from it.
	poke chan struct{}

	mu         sync.Mutex
	view       *clusterView
	discovered []*keys.Discovered
	rollout    *rolloutView
	rolloutErr error
	events     []*keys.Event // newest first
	images     []*imageView
	// canWrite says whether etcd lets the caller make the writes the actions make: a viewer
	// gets pages without buttons (etcd would refuse the writes anyway).
	canWrite bool
	changed  chan struct{} // closed and replaced when view changes
}

func newUI(e *env) *ui {
	u := &ui{e: e, infs: map[string]*etcdutil.Informer{}, poke: make(chan struct{}, 1), changed: make(chan struct{})}
	s := e.space
	for _, p := range []string{s.VMPrefix(), s.NodePrefix(), s.NodeStatePrefix(), s.HardwarePrefix(), s.StatusRoot(),
		s.FenceRoot(), s.LossGuard(), s.PlacementPrefix(), s.ProblemPrefix(), s.NodeSpecPrefix(), s.DiscoveredPrefix(), s.Rollout(),
		s.ImagePrefix(), s.BootserverPrefix()} {
		u.infs[p] = etcdutil.NewInformer(e.client, p, nil, func(string, *etcdutil.KV, *etcdutil.KV) { u.signal() }, nil)
	}
	// The audit trail: each event decoded once as it arrives, its writer checked as herdctl
	// events does, the value dropped.
	ev := etcdutil.NewInformer(e.client, s.EventPrefix(), func(key string, v []byte) (any, error) {
		x, err := keys.Decode[keys.Event](v)
		if err == nil {
			e.writerOf(key, x)
		}
		return x, err
	}, func(string, *etcdutil.KV, *etcdutil.KV) { u.signal() }, nil)
	ev.DropValues = true
	u.infs[s.EventPrefix()] = ev
	return u
}

func (u *ui) signal() {
	select {
	case u.poke <- struct{}{}:
	default:
	}
}

// run keeps the caches current and rebuilds the view after changes, at most a few times a second
// (a burst of placements is one update, not thousands).
func (u *ui) run(ctx context.Context) {
	for _, inf := range u.infs {
		go inf.Run(ctx)
	}
	for _, inf := range u.infs {
		if err := inf.WaitRev(ctx, 0); err != nil {
			return
		}
	}
	u.probeWrite(ctx)
	u.rebuild()
	for {
		select {
		case <-ctx.Done():
			return
		case <-u.poke:
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(150 * time.Millisecond):
		}
		u.rebuild()
	}
}

func (u *ui) rebuild() {
	s := u.e.space
	list := func(p string) []*mvccpb.KeyValue {
		kvs := u.infs[p].Unsorted()
		out := make([]*mvccpb.KeyValue, len(kvs))
		for i, kv := range kvs {
			out[i] = &mvccpb.KeyValue{Key: []byte(kv.Key), Value: kv.Value, CreateRevision: kv.CreateRevision, ModRevision: kv.ModRevision, Version: kv.Version, Lease: kv.Lease}
		}
		return out
	}
	var infs []*etcdutil.Informer
	for _, inf := range u.infs {
		infs = append(infs, inf)
	}
	k := clusterKeys{rev: etcdutil.MaxRev(infs), vms: list(s.VMPrefix()), nodes: list(s.NodePrefix()), states: list(s.NodeStatePrefix()),
		hardware: list(s.HardwarePrefix()), statuses: list(s.StatusRoot()), fences: list(s.FenceRoot()), guard: list(s.LossGuard()),
		placements: list(s.PlacementPrefix()), problems: list(s.ProblemPrefix()), nodeSpecs: list(s.NodeSpecPrefix())}
	v := u.e.buildView(k)
	var disc []*keys.Discovered
	for _, kv := range u.infs[s.DiscoveredPrefix()].List() {
		if d, err := keys.Decode[keys.Discovered](kv.Value); err == nil {
			disc = append(disc, d)
		}
	}
	// One cache holds both rollout keys: the request and the leader's status.
	var req, st []byte
	var reqRev int64
	if kv := u.infs[s.Rollout()].Get(s.Rollout()); kv != nil {
		req, reqRev = kv.Value, kv.ModRevision
	}
	if kv := u.infs[s.Rollout()].Get(s.RolloutStatus()); kv != nil {
		st = kv.Value
	}
	ro, err := u.e.rolloutOf(req, reqRev, st)
	var evs []*keys.Event
	for _, kv := range u.infs[s.EventPrefix()].Unsorted() {
		if x, ok := kv.Obj.(*keys.Event); ok && kv.Err == nil {
			evs = append(evs, x)
		}
	}
	sort.Slice(evs, func(i, j int) bool { return evs[i].Time.After(evs[j].Time) })
	imgs := u.e.imagesOf(list(s.ImagePrefix()), list(s.BootserverPrefix()))
	u.mu.Lock()
	u.view, u.discovered, u.rollout, u.rolloutErr, u.events, u.images = v, disc, ro, err, evs, imgs
	close(u.changed)
	u.changed = make(chan struct{})
	u.mu.Unlock()
}

// uiState is what one render reads.
type uiState struct {
	view       *clusterView
	discovered []*keys.Discovered
	rollout    *rolloutView
	rolloutErr error
	events     []*keys.Event
	canWrite   bool
	images     []*imageView
}

// current returns the latest state (view nil before the first) and a channel closed when it
// changes.
func (u *ui) current() (uiState, <-chan struct{}) {
	u.mu.Lock()
	defer u.mu.Unlock()
	return uiState{u.view, u.discovered, u.rollout, u.rolloutErr, u.events, u.canWrite, u.images}, u.changed
}

// probeWrite asks etcd whether the caller may write what the actions write, without writing: a
// transaction whose comparison can never hold still has every operation of both branches checked
// against the caller's roles first.
func (u *ui) probeWrite(ctx context.Context) {
	s := u.e.space
	never := clientv3.Compare(clientv3.Version(s.NodeSpec("probe")), "<", 0)
	cctx, cancel := u.e.ctx(ctx)
	_, err := u.e.client.Txn(cctx).If(never).Then(clientv3.OpPut(s.NodeSpec("probe"), "{}"), clientv3.OpPut(s.VMSpec("probe"), "{}")).Commit()
	cancel()
	u.mu.Lock()
	u.canWrite = err == nil
	u.mu.Unlock()
}

// handler serves the pages. host is the address served on: requests naming another host are
// refused, so that a web page elsewhere cannot reach this server through DNS rebinding and read
// the cluster with the caller's credentials.
func (u *ui) handler(host string) http.Handler {
	mux := http.NewServeMux()
	static, _ := fs.Sub(uiFiles, "ui")
	mux.Handle("GET /static/", http.StripPrefix("/static/", http.FileServerFS(static)))
	for path, page := range map[string]string{"/{$}": "overview", "/vms": "vms", "/nodes": "nodes", "/hardware": "hardware", "/events": "events",
		"/images": "images", "/fences": "fences"} {
		mux.HandleFunc("GET "+path, func(w http.ResponseWriter, r *http.Request) { u.page(w, r, page, r.URL.Query().Get("q")) })
	}
	// One VM's page: its stream is /sse/vm?q=NAME.
	mux.HandleFunc("GET /vms/{name}", func(w http.ResponseWriter, r *http.Request) { u.page(w, r, "vm", r.PathValue("name")) })
	mux.HandleFunc("GET /vms/{name}/console", u.consoleLog)
	// One node's page: its stream is /sse/node?q=HWID.
	mux.HandleFunc("GET /nodes/{hwid}", func(w http.ResponseWriter, r *http.Request) { u.page(w, r, "node", r.PathValue("hwid")) })
	mux.HandleFunc("GET /sse/{page}", u.sse)
	mux.HandleFunc("POST /act", func(w http.ResponseWriter, r *http.Request) { u.act(w, r, host) })
	_, port, _ := net.SplitHostPort(host)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h, p, err := net.SplitHostPort(r.Host)
		if err != nil || p != port || !(h == "127.0.0.1" || h == "localhost" || h == "::1" || h+":"+p == host) {
			http.Error(w, "this server answers only to "+host, http.StatusMisdirectedRequest)
			return
		}
		w.Header().Set("Content-Security-Policy", "default-src 'self'")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Header().Set("X-Frame-Options", "DENY")
		mux.ServeHTTP(w, r)
	})
}

var uiTitles = map[string]string{"overview": "Overview", "vms": "VMs", "nodes": "Nodes", "hardware": "Hardware", "events": "Events", "vm": "VM",
	"images": "Images", "fences": "Fencing", "node": "Node"}

func (u *ui) page(w http.ResponseWriter, r *http.Request, page, q string) {
	st, _ := u.current()
	frag, err := u.fragment(page, st, q)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	title := uiTitles[page]
	if page == "vm" || page == "node" {
		title = page + "/" + q
	}
	_ = uiTemplates.ExecuteTemplate(w, "page", map[string]any{"Page": page, "Title": title, "Fragment": frag, "Query": q})
}

// consoleLog streams the tail of a VM's console log and what the guest prints from then on, read
// from the agent of its node with the caller's certificate (viewers may read logs).
func (u *ui) consoleLog(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	if err := keys.ValidateName(name); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	ctx, cancel := u.e.ctx(r.Context())
	cl, hwid, err := u.e.consoleClient(ctx, name)
	cancel()
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	fw := &flushWriter{w: w, rc: http.NewResponseController(w)}
	if err := cl.Log(r.Context(), name, uiConsoleBytes, true, fw); err != nil && !fw.wrote {
		http.Error(w, consoleErr(name, hwid, err).Error(), http.StatusBadGateway)
	}
}

// uiConsoleBytes is how much of a console log a VM's page starts with.
const uiConsoleBytes = 16 << 10

// flushWriter sends every write to the browser at once.
type flushWriter struct {
	w     io.Writer
	rc    *http.ResponseController
	wrote bool
}

func (f *flushWriter) Write(p []byte) (int, error) {
	f.wrote = true
	n, err := f.w.Write(p)
	if err == nil {
		err = f.rc.Flush()
	}
	return n, err
}

// sse streams the page's fragment, rendered again at every change of the view.
func (u *ui) sse(w http.ResponseWriter, r *http.Request) {
	page := r.PathValue("page")
	if _, ok := uiTitles[page]; !ok {
		http.NotFound(w, r)
		return
	}
	fl, ok := w.(http.Flusher)
	if !ok {
		http.Error(w, "streaming unsupported", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	last := ""
	keepalive := time.NewTicker(15 * time.Second)
	defer keepalive.Stop()
	for {
		st, changed := u.current()
		frag, err := u.fragment(page, st, r.URL.Query().Get("q"))
		if err == nil && string(frag) != last {
			last = string(frag)
			var b strings.Builder
			for _, line := range strings.Split(last, "\n") {
				b.WriteString("data: ")
				b.WriteString(line)
				b.WriteString("\n")
			}
			b.WriteString("\n")
			if _, err := w.Write([]byte(b.String())); err != nil {
				return
			}
			fl.Flush()
		}
		select {
		case <-r.Context().Done():
			return
		case <-changed:
		case <-keepalive.C:
			if _, err := w.Write([]byte(": keepalive\n\n")); err != nil {
				return
			}
			fl.Flush()
		}
	}
}

// uiMaxRows bounds the rows of the VMs table: a page of 100,000 rows is unreadable and, sent at
// every change, too much for a browser; a filter narrows what is shown.
const uiMaxRows = 500

// fragment renders the live part of a page from st (no view yet: still loading), the VMs table
// narrowed to those matching q.
func (u *ui) fragment(page string, st uiState, q string) (template.HTML, error) {
	if st.view == nil {
		return template.HTML(`<p>reading the cluster…</p>`), nil
	}
	data := uiData(st.view, q)
	data["CanWrite"] = st.canWrite
	var disc []uiDiscovered
	for _, d := range st.discovered {
		// Times as dates, not ages: an age would change the page every second, and a page that
		// changes under the pointer loses clicks.
		disc = append(disc, uiDiscovered{MAC: d.MAC, Serial: orDash(d.Serial), Attempts: d.Attempts, LastSeen: uiTime(d.LastSeen), Reason: d.Reason})
	}
	data["Discovered"] = disc
	switch page {
	case "events":
		data["Events"] = uiEvents(st.events, func(ev *keys.Event) bool {
			return q == "" || strings.Contains(strings.ToLower(ev.Object+" "+ev.Action+" "+ev.Actor+" "+ev.User+" "+ev.Message), strings.ToLower(q))
		}, uiMaxRows)
	case "node":
		data["Node"] = uiOneNode(st.view, q)
		data["Events"] = uiEvents(st.events, func(ev *keys.Event) bool { return match("node/"+q, ev) }, 100)
	case "images":
		data["Images"] = uiImages(st.images, st.view)
	case "fences":
		data["Fences"] = uiFences(st.view)
	case "vm":
		data["VM"] = uiOneVM(st.view, q)
		data["Events"] = uiEvents(st.events, func(ev *keys.Event) bool { return match("vm/"+q, ev) }, 100)
	}
	if st.rolloutErr != nil {
		data["RolloutError"] = st.rolloutErr.Error()
	}
	if ro := st.rollout; ro != nil {
		done, eta := progress(ro, time.Now())
		x := uiRollout{ID: ro.ID, Image: ro.Image, State: ro.State, Reason: ro.Reason, Done: done, Total: len(ro.Nodes), Active: active(ro)}
		if eta > 0 {
			x.ETA = eta.Round(time.Second).String()
		}
		for _, id := range ro.Nodes {
			n := uiRolloutNode{HWID: id, Phase: keys.PhasePending}
			if p := ro.Per[id]; p != nil {
				n.Phase, n.Note = p.Phase, p.Error
				if n.Note == "" && p.Phase == keys.PhaseDraining {
					if ns := st.view.states[id]; ns != nil && ns.Waiting != "" {
						n.Note = "waits: " + ns.Waiting
					}
				}
			}
			x.Nodes = append(x.Nodes, n)
		}
		data["Rollout"] = x
	}
	var b bytes.Buffer
	if err := uiTemplates.ExecuteTemplate(&b, page, data); err != nil {
		return "", err
	}
	return template.HTML(b.String()), nil // rendered by html/template, which escaped every value
}

type uiCount struct {
	Name string
	N    int
}

type uiNode struct {
	Cordoned                               bool
	HWID, Status, StatusClass, Image, Note string
	VMs                                    int
	HasCap                                 bool
	CPUPct, MemPct                         int
	CPUText, MemText                       string
}

type uiRollout struct {
	ID, Image, State, Reason, ETA string
	Done, Total                   int
	Active                        bool
	Nodes                         []uiRolloutNode
}

type uiRolloutNode struct {
	HWID, Phase, Note string
}

type uiDiscovered struct {
	MAC, Serial, LastSeen, Reason string
	Attempts                      int
}

type uiVM struct {
	Name, State, Node, VCPUs, Memory, Problem string
	WantsRunning                              bool
}

func uiData(v *clusterView, q string) map[string]any {
	q = strings.ToLower(strings.TrimSpace(q))
	counts := func(m map[string]int) []uiCount {
		var out []uiCount
		for k, n := range m {
			out = append(out, uiCount{k, n})
		}
		sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
		return out
	}
	vmStates := map[string]int{}
	var vms []uiVM
	matched := 0
	for _, vm := range v.sortedVMs() {
		vmStates[vm.State]++
		x := uiVM{Name: vm.Name, State: vm.State, Node: "-", VCPUs: "-", Memory: "-", Problem: vmProblem(vm)}
		if vm.Placement != nil && vm.Placement.UID == vm.UID {
			x.Node = vm.Placement.Node
		}
		if q != "" && !strings.Contains(strings.ToLower(x.Name+" "+x.State+" "+x.Node+" "+x.Problem), q) {
			continue
		}
		if matched++; matched > uiMaxRows {
			continue
		}
		if vm.Spec != nil {
			x.VCPUs, x.Memory = specSizes(vm.Spec.VCPUs, vm.Spec.MemoryMiB)
			x.WantsRunning = vm.Spec.WantsRunning()
		}
		vms = append(vms, x)
	}
	nodeStates := map[string]int{}
	var nodes []uiNode
	views := v.nodeViews()
	sort.Slice(views, func(i, j int) bool { return views[i].HWID < views[j].HWID })
	for _, n := range views {
		x := uiNodeOf(n)
		nodeStates[x.StatusClass]++
		nodes = append(nodes, x)
	}
	guard := "automatic"
	if g := v.guard; g != nil {
		guard = fmt.Sprintf("HELD: %d nodes lost at once; confirm with 'herdctl cluster confirm-loss'", len(g.Nodes))
		if g.Confirmed {
			guard = fmt.Sprintf("%d nodes lost at once; confirmed by %s, in progress", len(g.Nodes), g.By)
		}
	}
	held := v.guard != nil && !v.guard.Confirmed
	shown := ""
	if matched > len(vms) {
		shown = fmt.Sprintf("showing %d of %d matching VMs: type in the filter to narrow", len(vms), matched)
	}
	return map[string]any{"VMs": vms, "Shown": shown, "Nodes": nodes, "VMCounts": counts(vmStates), "NodeCounts": counts(nodeStates), "Guard": guard, "GuardHeld": held}
}

func pct(used, total int64) int {
	if total <= 0 {
		return 0
	}
	return int(min(100, max(0, used*100/total)))
}

// uiActions are the console's actions: each is the herdctl command that makes the same writes,
// with the same events, run in this process with the caller's credentials.
var uiActions = map[string]func(target string) []string{
	"approve":        func(t string) []string { return []string{"hw", "approve", t} },
	"cordon":         func(t string) []string { return []string{"node", "cordon", t} },
	"uncordon":       func(t string) []string { return []string{"node", "uncordon", t} },
	"drain":          func(t string) []string { return []string{"node", "drain", t} },
	"migrate":        func(t string) []string { return []string{"vm", "migrate", t} },
	"restart":        func(t string) []string { return []string{"vm", "restart", t} },
	"stop":           func(t string) []string { return []string{"vm", "stop", t} },
	"start":          func(t string) []string { return []string{"vm", "start", t} },
	"rollout-pause":  func(string) []string { return []string{"rollout", "pause"} },
	"rollout-resume": func(string) []string { return []string{"rollout", "resume"} },
	"rollout-abort":  func(string) []string { return []string{"rollout", "abort"} },
	"confirm-loss":   func(string) []string { return []string{"cluster", "confirm-loss"} },
}

// act runs one action. Only the page's own script can ask: the request must come from this
// server's origin and carry a header no cross-site form can set, so another site cannot make
// the browser act with the caller's credentials. The answer is the command's output, or etcd's
// refusal with the hint herdctl gives.
func (u *ui) act(w http.ResponseWriter, r *http.Request, host string) {
	if r.Header.Get("X-Herd-Action") != "1" || r.Header.Get("Origin") != "http://"+r.Host {
		http.Error(w, "actions come from the console's own pages", http.StatusForbidden)
		return
	}
	name, target := r.FormValue("action"), r.FormValue("target")
	mk, ok := uiActions[name]
	if !ok {
		http.Error(w, "unknown action "+name, http.StatusBadRequest)
		return
	}
	var out, errOut bytes.Buffer
	root, sub := newRoot(&out, &errOut)
	sub.client, sub.space, sub.shared = u.e.client, u.e.space, true
	// The same connection settings, so that a hint names the right endpoints.
	o := u.e.opts
	args := []string{"--endpoints", strings.Join(o.Endpoints, ","), "--prefix", o.Prefix, "--cacert", o.CACert,
		"--cert", o.Cert, "--key", o.Key, "--timeout", u.e.timeout.String()}
	root.SetArgs(append(args, mk(target)...))
	err := root.ExecuteContext(r.Context())
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if err != nil {
		w.WriteHeader(http.StatusConflict)
		msg := errOut.String() + "herdctl: " + err.Error()
		if h := sub.explain(err); h != "" {
			msg += "\nhint: " + h
		}
		_, _ = w.Write([]byte(msg))
		return
	}
	_, _ = w.Write(out.Bytes())
}

type uiEvent struct {
	Time, Object, VM, Action, Who, Message string
}

// uiEvents are the newest events that keep says to show, at most n.
func uiEvents(evs []*keys.Event, keep func(*keys.Event) bool, n int) []uiEvent {
	var out []uiEvent
	for _, ev := range evs {
		if len(out) == n {
			break
		}
		if !keep(ev) {
			continue
		}
		who := ev.Actor
		if ev.User != "" {
			who += " (" + ev.User + ")"
		}
		vm, _ := strings.CutPrefix(ev.Object, "vm/")
		if vm == ev.Object {
			vm = ""
		}
		out = append(out, uiEvent{Time: uiTime(ev.Time), Object: ev.Object, VM: vm, Action: ev.Action, Who: who, Message: ev.Message})
	}
	return out
}

// uiVMDetail is one VM's page.
type uiVMDetail struct {
	Name, State, Node, Problem, Spec, Status string
	UID, Epoch                               int64
	Migration                                string
	Addresses                                []string // "prod 10.20.0.17 (52:54:00:..)", by NIC
	Disks                                    []string // "root 20GiB in pool rbd from image deb"
	Found                                    bool
}

func uiOneVM(v *clusterView, name string) uiVMDetail {
	vm := v.vms[name]
	if vm == nil {
		return uiVMDetail{Name: name}
	}
	d := uiVMDetail{Name: name, Found: true, State: vm.State, Node: "-", UID: vm.UID, Problem: vmProblem(vm)}
	if vm.Spec != nil {
		b, _ := json.MarshalIndent(vm.Spec, "", "  ")
		d.Spec, d.Disks = string(b), diskLines(vm.Spec)
	} else if vm.SpecError != "" {
		d.Spec = "unreadable: " + vm.SpecError
	}
	if pl := vm.Placement; pl != nil && pl.UID == vm.UID {
		d.Node, d.Epoch = pl.Node, pl.Epoch
		d.Addresses = nicAddresses(pl)
		if m := pl.Migration; m != nil {
			d.Migration = fmt.Sprintf("%s to %s since %s (%s)", m.Mode, m.To, uiTime(m.Started), m.Reason)
		}
	}
	if st := vm.Status; st != nil {
		d.Status = fmt.Sprintf("%s since %s", st.State, uiTime(st.Since))
		if st.Message != "" {
			d.Status += ": " + st.Message
		}
	}
	return d
}

func uiTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Local().Format("2006-01-02 15:04:05")
}

type uiImage struct {
	Version, Kernel, Initrd, Created string
	Current                          bool
	Nodes                            int
	Served                           []uiVerdict
}

type uiVerdict struct {
	Bootserver, Verdict string
	OK                  bool
}

// uiImages is the catalogue with how many nodes run each version and each bootserver's verdict.
func uiImages(images []*imageView, v *clusterView) []uiImage {
	running := map[string]int{}
	for _, nd := range v.nodes {
		running[nd.Image]++
	}
	var out []uiImage
	for _, im := range images {
		x := uiImage{Version: im.Version, Current: im.Current, Nodes: running[im.Version], Kernel: "-", Initrd: "-", Created: "-"}
		if im.Image != nil {
			x.Kernel, x.Initrd, x.Created = units.FormatBytes(im.Image.Kernel.Size), units.FormatBytes(im.Image.Initrd.Size), uiTime(im.Image.Created)
		}
		for name, verdict := range im.Served {
			x.Served = append(x.Served, uiVerdict{Bootserver: name, Verdict: verdict, OK: verdict == "ok"})
		}
		sort.Slice(x.Served, func(i, j int) bool { return x.Served[i].Bootserver < x.Served[j].Bootserver })
		out = append(out, x)
	}
	return out
}

type uiFence struct {
	Node, BootID, Phase, Method, Started, Updated, Error, By, Details string
	Attempts                                                          int
}

// uiFences lists the fence records, newest first.
func uiFences(v *clusterView) []uiFence {
	var all []*keys.Fence
	for _, fs := range v.fences {
		all = append(all, fs...)
	}
	sort.Slice(all, func(i, j int) bool { return all[i].Started.After(all[j].Started) })
	var out []uiFence
	for _, f := range all {
		var det []string
		for k, val := range f.Details {
			det = append(det, k+"="+val)
		}
		sort.Strings(det)
		out = append(out, uiFence{Node: f.HWID, BootID: orDash(f.BootID), Phase: f.Phase, Method: orDash(f.Method), Started: uiTime(f.Started),
			Updated: uiTime(f.Updated), Error: f.Error, By: orDash(f.By), Details: strings.Join(det, " "), Attempts: f.Attempts})
	}
	return out
}

// uiNodeOf is a node's row: its state, use of capacity as bars, image and note.
func uiNodeOf(n *nodeView) uiNode {
	first, _, _ := strings.Cut(n.Status, ",")
	x := uiNode{HWID: n.HWID, Status: n.Status, StatusClass: first, VMs: len(n.VMs), Image: "-", Note: n.note(), Cordoned: n.Admin.Cordoned}
	if nd := n.Node; nd != nil {
		x.Image = orDash(nd.Image)
		if mem := nd.MemoryMiB - nd.ReservedMemoryMiB; nd.CPUs > 0 && mem > 0 {
			x.HasCap = true
			x.CPUPct, x.MemPct = pct(int64(n.UsedVCPUs), int64(nd.CPUs)), pct(n.UsedMiB, mem)
			x.CPUText = fmt.Sprintf("%d/%d vCPUs", n.UsedVCPUs, nd.CPUs)
			x.MemText = fmt.Sprintf("%s/%s", units.FormatMiB(n.UsedMiB), units.FormatMiB(mem))
		}
	}
	return x
}

type uiNodeDetail struct {
	uiNode
	Found bool
	Facts []uiFact
	VMs   []uiVM
}

type uiFact struct{ Name, Value string }

// uiOneNode is one node's page: what it registered, what the operator and the leader hold of it,
// and its VMs.
func uiOneNode(v *clusterView, hwid string) uiNodeDetail {
	var n *nodeView
	for _, x := range v.nodeViews() {
		if x.HWID == hwid {
			n = x
		}
	}
	if n == nil {
		return uiNodeDetail{uiNode: uiNode{HWID: hwid}}
	}
	d := uiNodeDetail{Found: true, uiNode: uiNodeOf(n)}
	fact := func(name, value string) {
		if value != "" {
			d.Facts = append(d.Facts, uiFact{name, value})
		}
	}
	if hw := n.Hardware; hw != nil {
		fact("Serial", hw.Serial)
		var labels []string
		for k, val := range hw.Labels {
			labels = append(labels, k+"="+val)
		}
		sort.Strings(labels)
		fact("Labels", strings.Join(labels, " "))
	}
	if nd := n.Node; nd != nil {
		fact("Hostname", nd.Hostname)
		fact("Boot id", nd.BootID)
		fact("Up since", uiTime(nd.Started))
		fact("Agent", nd.AgentVersion)
		fact("libvirt", nd.LibvirtURI)
		var addrs []string
		for _, a := range []struct{ role, addr string }{{"management", nd.Addresses.Management}, {"storage", nd.Addresses.Storage}, {"migration", nd.Addresses.Migration}} {
			if a.addr != "" {
				addrs = append(addrs, a.role+" "+a.addr)
			}
		}
		fact("Addresses", strings.Join(addrs, ", "))
		fact("Migration URI", nd.MigrationURI)
		fact("Status", nd.StatusURL)
		fact("Console", nd.ConsoleURL)
		if nd.ReservedMemoryMiB > 0 {
			fact("Reserved memory", units.FormatMiB(nd.ReservedMemoryMiB))
		}
	} else if n.NodeError != "" {
		fact("Registration", "unreadable: "+n.NodeError)
	} else {
		fact("Registration", "none: the node is down, or has not booted since it was enrolled")
	}
	if n.Admin.Reason != "" {
		fact("Cordoned because", n.Admin.Reason)
	}
	names := append([]string(nil), n.VMs...)
	sort.Strings(names)
	for _, name := range names {
		x := uiVM{Name: name, State: "-", Node: hwid, VCPUs: "-", Memory: "-"}
		if vm := v.vms[name]; vm != nil {
			x.State, x.Problem = vm.State, vmProblem(vm)
			if vm.Spec != nil {
				x.VCPUs, x.Memory = specSizes(vm.Spec.VCPUs, vm.Spec.MemoryMiB)
			}
		}
		d.VMs = append(d.VMs, x)
	}
	return d
}
