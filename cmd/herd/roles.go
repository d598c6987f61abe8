package main

import (
	"fmt"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/agent"
	"github.com/herdhq/herd/agent/hypervisor"
	"github.com/herdhq/herd/coordinator"
	"github.com/herdhq/herd/coordinator/fence"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/units"
	"github.com/herdhq/herd/lib/volume"
)

// One constructor per role. A role's settings are its flags (with their defaults, stated once, in
// addFlags); config turns them and the role's connections into the package's Config. `herd
// coordinator` and `herd agent` parse the settings from their command line; `herd dev` starts from
// the same defaults (defaultCoordinatorParams, defaultAgentParams) and changes only what a
// simulated cluster on one machine needs, in devCoordinatorParams and devAgentParams. A test checks
// that nothing else differs.

// coordinatorParams are every setting of a coordinator replica.
type coordinatorParams struct {
	name       string
	sessionTTL time.Duration
	pools      []string
	listen     string
	parallel   int
	maxMig     int
	importDir  string
	importWork string
	interval   time.Duration
	pprof      bool
	sched      schedulerFlags
	failover   failoverFlags
	storage    storageFlags
}

func (p *coordinatorParams) addFlags(fs *pflag.FlagSet) {
	p.sched.addFlags(fs)
	p.failover.addFlags(fs)
	fs.StringVar(&p.name, "name", "", "this replica's name in the election and events (default host-pid)")
	fs.DurationVar(&p.sessionTTL, "session-ttl", 5*time.Second, "election session TTL: how long a dead leader blocks a new one")
	fs.StringSliceVar(&p.pools, "pools", []string{"default"}, "disk pools, recorded when this coordinator creates the cluster")
	fs.StringVar(&p.listen, "listen", ":9481", "status endpoint (metrics, /v1/leader)")
	fs.IntVar(&p.parallel, "parallel", 64, "leader transactions in flight at once")
	fs.IntVar(&p.maxMig, "max-migrations-per-node", 2, "open migrations a node may take part in (as source or target)")
	fs.StringVar(&p.importDir, "import-dir", "/var/lib/herd/import", "the only directory VM images may be imported from by file:// URL (\"\": none)")
	fs.StringVar(&p.importWork, "import-work-dir", "/var/tmp", "where an image import keeps its temporary files (room for the image's raw size, sparse; not a tmpfs)")
	fs.DurationVar(&p.interval, "interval", 10*time.Second, "longest time between two leader rounds, changes or not")
	fs.BoolVar(&p.pprof, "pprof", false, "serve Go's profiles under /debug/pprof/ on the status endpoint (keep it private)")
	p.storage.add(fs, "herd-coordinator", false)
}

func defaultCoordinatorParams() coordinatorParams {
	var p coordinatorParams
	p.addFlags(pflag.NewFlagSet("coordinator", pflag.ContinueOnError))
	return p
}

// coordinatorConns are what a coordinator runs with besides its settings.
type coordinatorConns struct {
	client   *clientv3.Client
	user     string
	space    keys.Space
	volumes  volume.Backend
	revoke   bool // the replica may administer etcd users (TLS, RBAC, root)
	log      hclog.Logger
	registry prometheus.Registerer
}

// config is the coordinator's Config.
func (p *coordinatorParams) config(c coordinatorConns) (coordinator.Config, error) {
	so, err := p.sched.options()
	if err != nil {
		return coordinator.Config{}, err
	}
	cfg := coordinator.Config{
		Client: c.client, EtcdUser: c.user, Space: c.space, Name: p.name, SessionTTL: p.sessionTTL, Pools: p.pools,
		Scheduler: so, Parallel: p.parallel, Interval: p.interval, Volumes: c.volumes, ImportDir: p.importDir, ImportWorkDir: p.importWork, MaxMigrationsPerNode: p.maxMig,
		RevokeNodeUsers: c.revoke, Log: c.log, Registry: c.registry,
	}
	admin, _ := c.volumes.(fence.CephAdmin)
	if err := p.failover.apply(&cfg, admin); err != nil {
		return coordinator.Config{}, err
	}
	return cfg, nil
}

// agentParams are every setting of a node agent but its identity and connections.
type agentParams struct {
	leaseTTL  time.Duration
	resync    time.Duration
	cpus      int
	memory    string
	reserved  string
	listen    string
	consoleL  string
	image     string
	addrMgmt  string
	addrStore string
	addrMig   string
	domType   string
	console   string
	bootDir   string
	seedDir   string
	uplink    string
	migURI    string
	maxMig    int
	shutdownT time.Duration
	migT      time.Duration
	rebootCmd string
	migTLS    bool
	migTLSDir string
	diskPaths []string
	diskMin   string
	revFile   string
	storage   storageFlags
}

func (p *agentParams) addFlags(fs *pflag.FlagSet) {
	fs.DurationVar(&p.leaseTTL, "lease-ttl", 10*time.Second, "node lease TTL: how long the node outlives a silent agent")
	fs.DurationVar(&p.resync, "resync", 30*time.Second, "period of the full libvirt/etcd comparison")
	fs.IntVar(&p.cpus, "cpus", 0, "CPUs to offer (default: what libvirt reports)")
	fs.StringVar(&p.memory, "memory", "", "memory to offer, e.g. 64GiB (default: what libvirt reports)")
	fs.StringVar(&p.reserved, "reserved-memory", "", "memory kept for the host, never given to VMs, e.g. 2GiB")
	p.storage.add(fs, "herd-agent", true)
	fs.StringVar(&p.listen, "listen", ":9480", "status endpoint (metrics, /v1/domains)")
	fs.StringVar(&p.consoleL, "console-listen", ":9483", "with TLS: serve the VMs' serial consoles here (HTTPS with the node's certificate; callers need an operator or viewer certificate); empty: no consoles. Without TLS the consoles are on --listen")
	fs.StringVar(&p.image, "image", "", "hypervisor image version this node booted")
	fs.StringVar(&p.addrMgmt, "address-management", "", "management address to advertise")
	fs.StringVar(&p.addrStore, "address-storage", "", "storage network address to advertise")
	fs.StringVar(&p.addrMig, "address-migration", "", "live-migration address to advertise")
	fs.StringVar(&p.domType, "domain-type", "auto", "libvirt domain type: auto (kvm if /dev/kvm opens, else qemu), kvm, or qemu (TCG)")
	fs.StringVar(&p.bootDir, "boot-dir", "/var/lib/herd/boot", "the only directory direct kernel boot files (a spec's boot.kernel, boot.initrd) may come from, symlinks resolved; empty: none")
	fs.StringVar(&p.seedDir, "seed-dir", "/var/lib/herd/seeds", "where the VMs' cloud-init seeds (NoCloud CD-ROM images) are built; empty: none, and VMs with NICs on herd networks, SSH keys or user data do not start here")
	fs.StringVar(&p.uplink, "uplink", "", "the interface VLAN networks are tagged on (a trunk port): the agent makes bridge herd-v<id> with link herd-t<id> on it for each VLAN its VMs use; empty: no VMs on VLAN networks here")
	fs.StringVar(&p.console, "console-dir", "/var/log/herd/console", "serial console logs, <dir>/<vm>.log (same path on every node to keep one log across migrations)")
	fs.StringVar(&p.migURI, "migration-uri", "", "libvirt URI other nodes migrate to, e.g. qemu+tcp://10.0.0.17/system (empty: this node takes no live migrations)")
	fs.IntVar(&p.maxMig, "max-migrations", 2, "concurrent outgoing live migrations")
	fs.DurationVar(&p.shutdownT, "shutdown-timeout", time.Minute, "how long a guest gets to power off through ACPI before it is destroyed")
	fs.DurationVar(&p.migT, "migration-timeout", 10*time.Minute, "abort a live migration that takes longer")
	fs.StringVar(&p.rebootCmd, "reboot-command", "systemctl reboot", "what a rollout's reboot command runs (sh -c); the netboot image uses 'reboot -f'")
	fs.BoolVar(&p.migTLS, "migrate-tls", false, "encrypt live migrations with TLS (VIR_MIGRATE_TLS): qemu.conf must set migrate_tls_x509_cert_dir on every node (docs/security.md)")
	fs.StringSliceVar(&p.diskPaths, "disk-path", nil, "a filesystem the node needs room on, repeatable (default: --console-dir, and --volume-dir for directory disks); while one has less than --disk-min-free free the node takes no new VMs")
	fs.StringVar(&p.diskMin, "disk-min-free", "64MiB", "free space each --disk-path must keep, e.g. 1GiB")
	fs.StringVar(&p.revFile, "revision-file", "", "file keeping the newest etcd revision this agent saw, so that a restart still notices etcd restored from a backup (the netboot image uses /run/herd/agent-revision.json); empty: none")
	fs.StringVar(&p.migTLSDir, "migrate-tls-dir", "/etc/pki/qemu", "with --join and --migrate-tls: where to write this node's migration certificate (qemu.conf's migrate_tls_x509_cert_dir)")
}

func defaultAgentParams() agentParams {
	var p agentParams
	p.addFlags(pflag.NewFlagSet("agent", pflag.ContinueOnError))
	return p
}

// agentConns are who a node is and what it runs with besides its settings.
type agentConns struct {
	client     *clientv3.Client
	user       string
	space      keys.Space
	hwid       string
	bootID     string
	hypervisor hypervisor.Hypervisor
	volumes    volume.Backend
	cephKey    string
	hostname   string
	version    string
	statusURL  string
	consoleURL string
	log        hclog.Logger
	registry   prometheus.Registerer
}

// config is the agent's Config.
func (p *agentParams) config(c agentConns) (agent.Config, error) {
	memMiB, err := parseOptionalMiB("--memory", p.memory)
	if err != nil {
		return agent.Config{}, err
	}
	resMiB, err := parseOptionalMiB("--reserved-memory", p.reserved)
	if err != nil {
		return agent.Config{}, err
	}
	diskMin, err := units.ParseBytes(p.diskMin, 1)
	if err != nil || diskMin <= 0 {
		return agent.Config{}, fmt.Errorf("--disk-min-free %q: want a size such as 64MiB", p.diskMin)
	}
	diskPaths := p.diskPaths
	if len(diskPaths) == 0 {
		if p.console != "" {
			diskPaths = append(diskPaths, p.console)
		}
		if d, ok := c.volumes.(volume.Dir); ok && d.Root != "" {
			diskPaths = append(diskPaths, d.Root)
		}
	}
	return agent.Config{
		DiskPaths: diskPaths, DiskMinFree: uint64(diskMin),
		Client: c.client, EtcdUser: c.user, Space: c.space, HWID: c.hwid, BootID: c.bootID,
		Hypervisor: c.hypervisor, Volumes: c.volumes, CephUser: p.storage.user, CephKey: c.cephKey,
		LeaseTTL: p.leaseTTL, Resync: p.resync,
		CPUs: p.cpus, MemoryMiB: memMiB, ReservedMemoryMiB: resMiB,
		Addresses:    keys.Addresses{Management: p.addrMgmt, Storage: p.addrStore, Migration: p.addrMig},
		MigrationURI: p.migURI, ConsoleDir: p.console, BootDir: p.bootDir, SeedDir: p.seedDir, Uplink: p.uplink, MaxMigrations: p.maxMig, RevisionFile: p.revFile,
		ShutdownTimeout: p.shutdownT, MigrationTimeout: p.migT, RebootCommand: p.rebootCmd,
		Hostname: c.hostname, Image: p.image, Version: c.version,
		StatusURL: c.statusURL, ConsoleURL: c.consoleURL, Log: c.log, Registry: c.registry,
	}, nil
}
