//go:build !agentonly

package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"

	"github.com/herdhq/herd/agent"
	"github.com/herdhq/herd/agent/hypervisor"
	"github.com/herdhq/herd/coordinator"
	"github.com/herdhq/herd/coordinator/join"
	"github.com/herdhq/herd/lib/ctl"
	"github.com/herdhq/herd/lib/etcdembed"
	"github.com/herdhq/herd/lib/etcdutil"
	ljoin "github.com/herdhq/herd/lib/join"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/logging"
	"github.com/herdhq/herd/lib/pki"
	"github.com/herdhq/herd/lib/rbac"
	"github.com/herdhq/herd/lib/statusserver"
	"github.com/herdhq/herd/lib/units"
	"github.com/herdhq/herd/lib/version"
	"github.com/herdhq/herd/lib/volume"
)

type devOptions struct {
	lo           logging.Options
	sf           schedulerFlags
	ff           failoverFlags
	agents       int
	coordinators int
	dataDir      string
	keep         bool
	clientURL    string
	peerURL      string
	listen       string
	uiListen     string
	nodeCPUs     int
	nodeMemory   string
	leaseTTL     time.Duration
	sessionTTL   time.Duration
	prefix       string
	storage      storageFlags
	insecure     bool
}

func init() { extraCmds = append(extraCmds, devCmd()) }

func devCmd() *cobra.Command {
	var o devOptions
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Run a whole herd on this machine: embedded etcd, coordinators, simulated nodes",
		Long: `herd dev runs an embedded etcd, two coordinators and N agents in one process. Each agent's
hypervisor is libvirt's test driver (a real libvirt connection that keeps domains in memory) on
its own node file, and all agents share one directory of VM disks, like nodes on shared storage.
Ctrl-C stops everything; the data directory is removed unless --keep or --data-dir is given.

Like production, dev runs with TLS and etcd RBAC on: a CA in <data-dir>/pki, certificates for the
coordinators, an operator and a viewer, and simulated nodes that join with one-time tokens through
the coordinators' join endpoints. The banner prints the environment herdctl and etcdctl need.
--insecure runs plain HTTP without authentication instead.`,
		Example: `  herd dev
  herd dev --agents 5 --node-memory 32GiB --data-dir /tmp/herd-dev
  herd dev --ceph-conf /etc/ceph/ceph.conf --ceph-keyring /etc/ceph/ceph.client.admin.keyring   # disks on RBD (pool "rbd")`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runDev(cmd.Context(), o) },
	}
	o.addFlags(cmd.Flags())
	return cmd
}

func (o *devOptions) addFlags(fs *pflag.FlagSet) {
	o.lo.AddFlags(fs)
	o.sf.addFlags(fs)
	o.ff.addFlags(fs)
	// A laptop has no BMCs: dev mode moves VMs without fencing unless told otherwise.
	_ = fs.Set("unsafe-no-fencing", "true")
	fs.Lookup("unsafe-no-fencing").DefValue = "true"
	f := fs
	f.IntVar(&o.agents, "agents", 3, "simulated nodes")
	f.IntVar(&o.coordinators, "coordinators", 2, "coordinator replicas")
	f.StringVar(&o.dataDir, "data-dir", "", "where etcd data, node files and disks live (default: a temporary directory)")
	f.BoolVar(&o.keep, "keep", false, "keep the temporary data directory at exit")
	f.StringVar(&o.clientURL, "etcd-client-url", "http://127.0.0.1:2379", "embedded etcd client URL")
	f.StringVar(&o.peerURL, "etcd-peer-url", "http://127.0.0.1:2380", "embedded etcd peer URL")
	f.StringVar(&o.listen, "listen", "127.0.0.1:9480", "status endpoint: /metrics, /v1/nodes/HWID/domains")
	f.StringVar(&o.uiListen, "ui-listen", "127.0.0.1:8480", "the web console (herdctl ui, as the dev operator); port 0: any free port")
	f.IntVar(&o.nodeCPUs, "node-cpus", 16, "CPUs of each simulated node")
	f.StringVar(&o.nodeMemory, "node-memory", "64GiB", "memory of each simulated node")
	f.DurationVar(&o.leaseTTL, "lease-ttl", defaultAgentParams().leaseTTL, "node lease TTL")
	f.DurationVar(&o.sessionTTL, "session-ttl", defaultCoordinatorParams().sessionTTL, "coordinator election session TTL")
	f.StringVar(&o.prefix, "prefix", keys.DefaultPrefix, "root of herd's keys")
	o.storage.add(f, "admin", false)
	f.StringVar(&o.storage.conf, "ceph", "", "short for --ceph-conf")
	f.BoolVar(&o.insecure, "insecure", false, "no TLS, no RBAC: anyone reaching etcd may do anything")
}

func defaultDevOptions() devOptions {
	var o devOptions
	o.addFlags(pflag.NewFlagSet("dev", pflag.ContinueOnError))
	return o
}

func runDev(ctx context.Context, o devOptions) error {
	log, err := o.lo.New("herd-dev", nil)
	if err != nil {
		return err
	}
	space, err := keys.NewSpace(o.prefix)
	if err != nil {
		return err
	}
	if _, err := o.sf.options(); err != nil {
		return err
	}
	memMiB, err := units.ParseIn(o.nodeMemory, units.MiB)
	if err != nil {
		return fmt.Errorf("--node-memory: %w", err)
	}
	if o.agents < 1 || o.coordinators < 1 {
		return errors.New("--agents and --coordinators must be at least 1")
	}
	dir := o.dataDir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "herd-dev-"); err != nil {
			return err
		}
		if !o.keep {
			defer os.RemoveAll(dir)
		}
	}
	ecfg := etcdembed.Config{
		Name: "herd-dev", Dir: filepath.Join(dir, "etcd"),
		Clients: []string{o.clientURL}, Peers: []string{o.peerURL},
		AutoCompaction: 5 * time.Minute, UnsafeNoFsync: true,
	}
	var sec *devPKI
	if !o.insecure {
		if sec, err = newDevPKI(filepath.Join(dir, "pki")); err != nil {
			return err
		}
		ecfg.Clients = []string{strings.Replace(o.clientURL, "http://", "https://", 1)}
		if ecfg.CertFile, ecfg.KeyFile, err = sec.issue("etcd-server", pki.RoleEtcd, []string{"127.0.0.1", "localhost"}); err != nil {
			return err
		}
		ecfg.TrustedCAFile = sec.caFile()
	}
	etcd, err := etcdembed.Start(ctx, ecfg, 30*time.Second)
	if err != nil {
		return fmt.Errorf("%w (is another etcd or herd dev running? pick free ports with --etcd-client-url and --etcd-peer-url)", err)
	}
	defer etcd.Close()
	endpoints := etcd.Endpoints

	// newClient connects as user in role (a certificate issued on the spot), or plainly with
	// --insecure.
	newClient := func(user string, role pki.Role) (*clientv3.Client, etcdutil.Options, error) {
		eo := etcdutil.Options{Endpoints: endpoints, Prefix: o.prefix}
		if sec != nil {
			var err error
			if eo, err = sec.options(eo, user, role); err != nil {
				return nil, eo, err
			}
		}
		c, err := etcdutil.New(eo)
		return c, eo, err
	}
	admin, _, err := newClient(rbac.Root, pki.RoleRoot)
	if err != nil {
		return err
	}
	defer admin.Close()
	if sec != nil {
		actx, acancel := context.WithTimeout(ctx, 30*time.Second)
		err := rbac.Apply(actx, admin, space)
		acancel()
		if err != nil {
			return fmt.Errorf("apply etcd roles: %w", err)
		}
		var names []string
		for i := 1; i <= o.coordinators; i++ {
			names = append(names, coordinatorName(i))
		}
		if err := sec.users(ctx, admin, names); err != nil {
			return err
		}
	}

	reg := statusserver.NewRegistry()
	mux := http.NewServeMux()
	srv, err := statusserver.Listen(o.listen, reg, mux)
	if err != nil {
		return err
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g, gctx := errgroup.WithContext(ctx)
	// fail stops what already runs before returning a set-up error.
	fail := func(err error) error {
		cancel()
		_ = g.Wait()
		return err
	}
	g.Go(func() error { return srv.Serve(gctx) })
	var joinURLs []string
	for i := 1; i <= o.coordinators; i++ {
		name := coordinatorName(i)
		c, eo, err := newClient(name, pki.RoleCoordinator)
		if err != nil {
			return fail(err)
		}
		defer c.Close()
		p := devCoordinatorParams(o, i)
		vols, err := p.storage.backend(p.pools)
		if err != nil {
			return fail(err)
		}
		if vols == nil {
			// The agents' shared directory: the leader makes disks (and clones images) in it
			// before placing, as it does on Ceph.
			vols = volume.Dir{Root: filepath.Join(dir, "volumes")}
		}
		creg := prometheus.WrapRegistererWith(prometheus.Labels{"coordinator": name}, reg)
		cfg, err := p.config(coordinatorConns{client: c, user: eo.User(), space: space, volumes: vols,
			revoke: sec != nil, log: log.Named("coordinator"), registry: creg})
		if err != nil {
			return fail(err)
		}
		co, err := coordinator.New(cfg)
		if err != nil {
			return fail(err)
		}
		g.Go(func() error { return co.Run(gctx) })
		if sec != nil {
			js := join.New(join.Config{Client: c, Space: space, CA: sec.ca, Events: co.Events(), Log: log.Named("join"), Registry: creg})
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				return fail(err)
			}
			joinURLs = append(joinURLs, "https://"+ln.Addr().String())
			g.Go(func() error { return js.Serve(gctx, ln, eo.Cert, eo.Key) })
		}
	}

	machines := map[string]*devMachine{}
	for i := 1; i <= o.agents; i++ {
		hwid := fmt.Sprintf("52:54:00:00:00:%02x", i)
		vols, err := o.storage.backend(nil)
		if err != nil {
			return fail(err)
		}
		if vols == nil {
			vols = volume.Dir{Root: filepath.Join(dir, "volumes")}
		}
		m := &devMachine{admin: admin, cfg: devAgentConfig{
			space: space, hwid: hwid, index: i, dir: dir, cpus: o.nodeCPUs, memMiB: memMiB, volumes: vols,
			params: devAgentParams(o, dir), endpoints: endpoints, log: log, reg: reg, statusURL: srv.URL,
			sec: sec, joinURLs: joinURLs, prefix: o.prefix,
		}}
		first, err := m.enrolAndBoot(gctx)
		if err != nil {
			return fail(err)
		}
		machines[hwid] = m
		g.Go(func() error { return m.run(gctx, first) })
	}
	mux.HandleFunc("GET /v1/nodes/{hwid}/domains", func(w http.ResponseWriter, r *http.Request) {
		m := machines[r.PathValue("hwid")]
		if m == nil {
			http.NotFound(w, r)
			return
		}
		domainsHandler(m.current().Domains)(w, r)
	})

	// The operator's console, as `herdctl ui` would serve it with the dev operator's certificate.
	uiOpts := etcdutil.Options{Endpoints: endpoints, Prefix: o.prefix, DialTimeout: 5 * time.Second}
	if sec != nil {
		uiOpts.CACert = sec.caFile()
		uiOpts.Cert, uiOpts.Key = sec.files("dev-operator")
	}
	console, err := ctl.StartUI(gctx, uiOpts, o.uiListen)
	if err != nil {
		return fail(err)
	}
	printBanner(endpoints[0], o, dir, srv.URL, "http://"+console+"/", sec)
	err = g.Wait()
	log.Info("stopped")
	if o.keep && o.dataDir == "" {
		fmt.Fprintf(os.Stderr, "data kept in %s\n", dir)
	}
	return err
}

func coordinatorName(i int) string { return fmt.Sprintf("dev-%d", i) }

// devCoordinatorParams are a coordinator's defaults with what dev changes: its name, the session
// TTL, scheduling and failover as dev's flags say (dev moves VMs without fencing by default: a
// laptop has no BMCs), and dev's storage (pool "rbd" on Ceph).
func devCoordinatorParams(o devOptions, i int) coordinatorParams {
	p := defaultCoordinatorParams()
	p.name, p.sessionTTL = coordinatorName(i), o.sessionTTL
	p.sched, p.failover, p.storage = o.sf, o.ff, o.storage
	if o.storage.conf != "" {
		p.pools = []string{"rbd"}
	}
	return p
}

// devAgentParams are an agent's defaults with what dev changes: the lease TTL dev's flag says, and
// boot files in the data directory. No console logs: the test driver runs no guest to log.
func devAgentParams(o devOptions, dir string) agentParams {
	p := defaultAgentParams()
	p.leaseTTL = o.leaseTTL
	p.bootDir = filepath.Join(dir, "boot")
	p.seedDir = filepath.Join(dir, "seeds")
	p.uplink = "test" // the test driver runs no guest: VLAN networks are bookkeeping only in dev
	p.console = ""
	return p
}

type devAgentConfig struct {
	space     keys.Space
	hwid      string
	index     int
	dir       string
	cpus      int
	memMiB    int64
	params    agentParams
	endpoints []string
	log       hclog.Logger
	reg       prometheus.Registerer
	statusURL string
	volumes   volume.Backend
	sec       *devPKI
	joinURLs  []string
	prefix    string
}

// devMachine plays one simulated node's whole life, as firmware and a netboot would: it enrols the
// node (dev mode alone writes hardware records), boots it (a fresh libvirt test-driver connection,
// so nothing runs, and a new boot id), and when the agent executes a reboot command, boots it again
// on the image the boot server would serve it. So rollouts work in `herd dev` too.
type devMachine struct {
	cfg   devAgentConfig
	admin *clientv3.Client

	mu  sync.Mutex
	cur *devBoot
}

// devBoot is one boot of a simulated machine.
type devBoot struct {
	agent    *agent.Agent
	ctx      context.Context
	stop     context.CancelFunc
	close    func()
	rebooted atomic.Bool
}

func (m *devMachine) current() *agent.Agent {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.cur.agent
}

func (m *devMachine) enrolAndBoot(ctx context.Context) (*devBoot, error) {
	c := m.cfg
	hw := keys.Hardware{MAC: c.hwid, Labels: map[string]string{"zone": fmt.Sprintf("z%d", (c.index-1)%2+1)}}
	cctx, cancel := etcdutil.WithTimeout(ctx)
	_, err := m.admin.Put(cctx, c.space.Hardware(c.hwid), keys.MustEncode(&hw))
	cancel()
	if err != nil {
		return nil, fmt.Errorf("enrol %s: %w", c.hwid, err)
	}
	return m.boot(ctx)
}

// run runs boot after boot until ctx ends or an agent stops by itself.
func (m *devMachine) run(ctx context.Context, b *devBoot) error {
	for {
		err := b.agent.Run(b.ctx)
		b.stop()
		b.close()
		if ctx.Err() != nil || !b.rebooted.Load() {
			return err
		}
		if b, err = m.boot(ctx); err != nil {
			return fmt.Errorf("reboot %s: %w", m.cfg.hwid, err)
		}
	}
}

func (m *devMachine) boot(ctx context.Context) (*devBoot, error) {
	image, err := devBootImage(ctx, m.admin, m.cfg.space, m.cfg.hwid)
	if err != nil {
		return nil, err
	}
	b := &devBoot{}
	b.ctx, b.stop = context.WithCancel(ctx)
	reboot := func(context.Context) error {
		b.rebooted.Store(true)
		// Like `systemctl reboot`, return first (the agent records the result), go down after.
		time.AfterFunc(500*time.Millisecond, b.stop)
		return nil
	}
	b.agent, b.close, err = devAgent(b.ctx, m.cfg, m.admin, image, reboot)
	if err != nil {
		b.stop()
		return nil, err
	}
	m.mu.Lock()
	m.cur = b
	m.mu.Unlock()
	return b, nil
}

// nextBootRegisterer lets a simulated machine's next boot take over its agent's metrics: the
// previous boot's collectors are replaced, where registering them again would panic. It must wrap
// the labelling registerer (the registry reports the existing collector without its labels, and
// only the labelling registerer can unregister it).
type nextBootRegisterer struct{ prometheus.Registerer }

func (r nextBootRegisterer) Register(c prometheus.Collector) error {
	err := r.Registerer.Register(c)
	if are, ok := errors.AsType[prometheus.AlreadyRegisteredError](err); ok {
		r.Registerer.Unregister(are.ExistingCollector)
		return r.Registerer.Register(c)
	}
	return err
}

func (r nextBootRegisterer) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		if err := r.Register(c); err != nil {
			panic(err)
		}
	}
}

// devBootImage is the image the boot server would serve the node: its pin, else the current one
// ("" before any image is added).
func devBootImage(ctx context.Context, c *clientv3.Client, space keys.Space, hwid string) (string, error) {
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	resp, err := c.Txn(cctx).Then(clientv3.OpGet(space.NodeState(hwid)), clientv3.OpGet(space.ImageCurrent())).Commit()
	if err != nil {
		return "", fmt.Errorf("read the image of %s: %w", hwid, err)
	}
	var ns *keys.NodeState
	var cur *keys.ImageCurrent
	if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
		ns, _ = keys.Decode[keys.NodeState](kvs[0].Value) // unreadable: as if unpinned, like the boot server
	}
	if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) > 0 {
		cur, _ = keys.Decode[keys.ImageCurrent](kvs[0].Value)
	}
	return keys.BootImage(ns, cur), nil
}

// devAgent builds the agent of one boot of a simulated node. The returned func closes the agent's
// connections once it has stopped.
func devAgent(ctx context.Context, c devAgentConfig, admin *clientv3.Client, image string, reboot func(context.Context) error) (*agent.Agent, func(), error) {
	nodes := filepath.Join(c.dir, "nodes")
	for _, d := range []string{nodes, filepath.Join(c.dir, "boot")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, nil, err
		}
	}
	uri, err := hypervisor.WriteTestNode(nodes, fmt.Sprintf("node%d", c.index), c.cpus, c.memMiB)
	if err != nil {
		return nil, nil, err
	}
	log := c.log.Named("agent")
	hv, err := hypervisor.Open(ctx, uri, c.params.domType, log)
	if err != nil {
		return nil, nil, err
	}
	eo := etcdutil.Options{Endpoints: c.endpoints, Prefix: c.prefix}
	if c.sec != nil {
		// The node's way in, as on real hardware: a one-time token per boot, traded at a
		// coordinator's join endpoint for a certificate naming the node's own etcd user.
		tok, err := ljoin.Mint(ctx, admin, c.space, ljoin.Grant{HWID: c.hwid, TTL: ljoin.DefaultTokenTTL, IssuedBy: "herd-dev"})
		if err != nil {
			hv.Close()
			return nil, nil, err
		}
		// The credentials live in the boot's tmpfs on a real node: a boot starts without them.
		creds := filepath.Join(nodes, "node"+fmt.Sprint(c.index)+"-creds")
		if err := os.RemoveAll(creds); err != nil {
			hv.Close()
			return nil, nil, err
		}
		jc := &ljoin.Client{URLs: c.joinURLs, CAFile: c.sec.caFile(), Dir: creds, HWID: c.hwid, Log: log}
		if err := jc.Ensure(ctx, tok); err != nil {
			hv.Close()
			return nil, nil, fmt.Errorf("node %s join: %w", c.hwid, err)
		}
		eo.CACert, eo.Cert, eo.Key = jc.CAPath(), jc.CertPath(), jc.KeyPath()
	}
	client, err := etcdutil.New(eo)
	if err != nil {
		hv.Close()
		return nil, nil, err
	}
	closeAll := func() { client.Close(); hv.Close() }
	p := c.params
	p.image = image
	cfg, err := p.config(agentConns{client: client, user: eo.User(), space: c.space, hwid: c.hwid, bootID: uuid.NewString(),
		hypervisor: hv, volumes: c.volumes, hostname: fmt.Sprintf("dev-node%d", c.index), version: version.Version,
		statusURL: fmt.Sprintf("%s/v1/nodes/%s/domains", c.statusURL, c.hwid),
		log:       log, registry: nextBootRegisterer{prometheus.WrapRegistererWith(prometheus.Labels{"node": c.hwid}, c.reg)}})
	if err != nil {
		closeAll()
		return nil, nil, err
	}
	cfg.Reboot = reboot
	a, err := agent.New(cfg)
	if err != nil {
		closeAll()
		return nil, nil, err
	}
	return a, closeAll, nil
}

func printBanner(endpoint string, o devOptions, dir, status, console string, sec *devPKI) {
	b := &strings.Builder{}
	spec := keys.MustSpace(o.prefix).VMSpec("db1")
	fmt.Fprintf(b, `
herd dev is running: embedded etcd, %d coordinators, %d simulated nodes (%d CPUs, %s each).%s
  etcd endpoint   %s
  status/metrics  %s/metrics
  web console     %s
  data            %s
`, o.coordinators, o.agents, o.nodeCPUs, o.nodeMemory, unsafeBanner(o), endpoint, status, console, dir)
	etcdctl := "etcdctl --endpoints " + endpoint
	b.WriteString("\nIn another terminal:\n  export HERD_ENDPOINTS=" + endpoint + "\n")
	if sec != nil {
		crt, key := sec.files("dev-operator")
		fmt.Fprintf(b, "  export HERD_CACERT=%s HERD_CERT=%s HERD_KEY=%s   # user dev-operator\n", sec.caFile(), crt, key)
		etcdctl += " --cacert $HERD_CACERT --cert $HERD_CERT --key $HERD_KEY"
	}
	fmt.Fprintf(b, `  herdctl vm create web1 --vcpus 2 --memory 1GiB --disk 10GiB
  herdctl vm list
  herdctl node list
  %s put %s '{"vcpus":1,"memory_mib":512,"disk":{"pool":"default","size_gib":5}}'
  herdctl vm delete web1

A rolling upgrade (simulated nodes reboot in-process; libvirt's test driver cannot live-migrate,
so these VMs move by restart; the image files can be any files, nothing boots them here):
  herdctl vm create app1 --memory 1GiB --migration-policy restart
  herdctl image add v2 --kernel /etc/hostname --initrd /etc/os-release
  herdctl rollout start --image v2 --watch
`, etcdctl, spec)
	if sec != nil {
		crt, key := sec.files("dev-viewer")
		fmt.Fprintf(b, `
TLS and etcd RBAC are on (--insecure turns them off). Read-only: HERD_CERT=%s HERD_KEY=%s
Root (keep it for set-up): %s/root.crt
`, crt, key, sec.dir)
	}
	b.WriteString("\nCtrl-C stops everything.\n")
	fmt.Fprint(os.Stdout, b.String())
}

func unsafeBanner(o devOptions) string {
	if !o.ff.unsafeNoFence {
		return ""
	}
	return "\n  UNSAFE: lost nodes are not fenced (--unsafe-no-fencing): fine for simulated nodes, never in production."
}
