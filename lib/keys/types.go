package keys

import (
	"errors"
	"fmt"
	"slices"
	"time"
)

// Cluster is /herd/cluster: written once by the first coordinator. Agents remember ID and refuse
// destructive actions when it changes, because a new ID means etcd was wiped or replaced and the
// absence of an assignment is then no evidence that a VM should go.
type Cluster struct {
	V       int       `json:"v"`
	ID      string    `json:"id"`
	Created time.Time `json:"created"`
	// Pools are the disk pools a VM spec may name.
	Pools []string `json:"pools"`
	// Schema is the keyspace layout the cluster's keys follow (SchemaVersion): the leader upgrades
	// older layouts in place when it is elected.
	Schema int `json:"schema,omitempty"`
	// Restore is the leader's account of the last etcd restore it recovered from (or is
	// recovering from): see docs/architecture.md, "etcd restored from a backup".
	Restore *Restore `json:"restore,omitempty"`
	Extra   `json:"-"`
}

// Restore is a recovery from etcd going back in time (restored from a backup). While its phase is
// collecting, no agent starts or destroys anything and the leader schedules nothing; the leader
// waits for every live node's inventory (or until Until), rewrites the records to what runs, and
// marks it done.
type Restore struct {
	// Generation counts restores: a daemon that saw etcd go back asks for one above the highest it
	// knew, and stays frozen until that generation is done.
	Generation int       `json:"generation"`
	Phase      string    `json:"phase"`
	Since      time.Time `json:"since"`
	Until      time.Time `json:"until"`
	Done       time.Time `json:"done,omitzero"`
	// Why says who noticed the restore, and how.
	Why string `json:"why,omitempty"`
	// Missing are the live nodes whose inventory had not arrived when the wait ended.
	Missing []string `json:"missing,omitempty"`
	Extra   `json:"-"`
}

// Restore phases.
const (
	RestoreCollecting = "collecting"
	RestoreDone       = "done"
)

// Collecting says whether a restore recovery is waiting for the nodes' inventories.
func (c *Cluster) Collecting() bool { return c.Restore != nil && c.Restore.Phase == RestoreCollecting }

// RestoreGeneration is the generation of the last restore recovery started (0: none).
func (c *Cluster) RestoreGeneration() int {
	if c.Restore == nil {
		return 0
	}
	return c.Restore.Generation
}

// Inventory is a node's account, during a restore recovery, of every herd domain it holds: what
// the leader adopts as the truth, since the restored records may say otherwise.
type Inventory struct {
	// Wants is a restore generation this node asks for: it saw etcd's revision go back.
	Wants int `json:"wants,omitempty"`
	// Generation is the recovery this inventory answers (0: none has started yet).
	Generation int               `json:"generation"`
	Domains    []InventoryDomain `json:"domains"`
	Extra      `json:"-"`
}

// InventoryDomain is one herd domain a node holds.
type InventoryDomain struct {
	Name  string `json:"name"`
	UID   int64  `json:"uid"`
	Epoch int64  `json:"epoch"`
	UUID  string `json:"uuid,omitempty"`
	// State is running, stopped or error.
	State string `json:"state"`
	Extra `json:"-"`
}

// SchemaVersion is the keyspace layout this herd writes. 1: leader decisions beside operator
// specs; 2: every prefix has one kind of writer (operators' intents, the leader's decisions, each
// node's reports), so etcd's prefix RBAC can enforce who decides what.
const SchemaVersion = 2

// Hardware is /herd/hardware/<hwid>: the operator's allow-list entry. Only listed hardware boots
// and joins.
type Hardware struct {
	V         int               `json:"v"`
	MAC       string            `json:"mac,omitempty"`
	Serial    string            `json:"serial,omitempty"`
	Labels    map[string]string `json:"labels,omitempty"`
	StorageIP string            `json:"storage_ip,omitempty"`
	// CPUs and MemoryMiB are the capacity the operator expects of this hardware: a node reporting
	// more is capped to it. Zero: the leader records what the node reports at its first join.
	CPUs      int   `json:"cpus,omitempty"`
	MemoryMiB int64 `json:"memory_mib,omitempty"`
	// MigrationIP, if set, is the only live-migration address the node's migration certificate
	// may name; otherwise the leader vouches for the address the node registers if no other node
	// holds it.
	MigrationIP string `json:"migration_ip,omitempty"`
	Extra       `json:"-"`
}

// Node is /herd/nodes/<hwid>, attached to the agent's lease: the node is alive exactly as long as
// this key exists.
type Node struct {
	V      int    `json:"v"`
	HWID   string `json:"hwid"`
	Lease  int64  `json:"lease"`
	BootID string `json:"boot_id"`
	// Hostname is informational; herd never relies on it.
	Hostname   string    `json:"hostname,omitempty"`
	Addresses  Addresses `json:"addresses,omitzero"`
	LibvirtURI string    `json:"libvirt_uri"`
	Image      string    `json:"image,omitempty"`
	CPUs       int       `json:"cpus"`
	MemoryMiB  int64     `json:"memory_mib"`
	// ReservedMemoryMiB is kept back for the host itself; the scheduler never fills it.
	ReservedMemoryMiB int64  `json:"reserved_memory_mib,omitempty"`
	AgentVersion      string `json:"agent_version,omitempty"`
	// Features are the spec features the agent implements (AgentFeatures): the leader places a
	// VM whose spec uses one only on nodes that list it, so an agent older than a feature never
	// gets a VM it would run without it (a disk left off, a NIC without its network).
	Features []string  `json:"features,omitempty"`
	Started  time.Time `json:"started"`
	// Status is where the agent serves its own report of its hypervisor (metrics, domains).
	StatusURL string `json:"status_url,omitempty"`
	// ConsoleURL is where the agent serves its VMs' serial consoles (lib/console): https, with
	// the node's certificate, on a cluster with TLS.
	ConsoleURL string `json:"console_url,omitempty"`
	// MigrationURI is the libvirt URI peers migrate to (qemu+tcp://addr/system).
	MigrationURI string `json:"migration_uri,omitempty"`
	// Leaving is set by a cleanly stopping agent just before it revokes its lease: the key's
	// disappearance is then a departure, not a death.
	Leaving bool `json:"leaving,omitempty"`
	// BootDir is the directory on this hypervisor that direct kernel boot paths must lie in.
	BootDir string `json:"boot_dir,omitempty"`
	// Uplink is the interface VLAN networks are tagged on (the node makes their bridges); ""
	// carries none, and VMs on VLAN networks are not placed here.
	Uplink string `json:"uplink,omitempty"`
	// Problem, when set, says why this node cannot run VMs although it is up (libvirtd does not
	// start, say): it registers no capacity, and the scheduler skips it with this reason.
	Problem string `json:"problem,omitempty"`
	// Recovery is set while a restore recovery is asked for or under way: every herd domain here.
	Recovery *Inventory `json:"recovery,omitempty"`
	Extra    `json:"-"`
}

// Addresses of a node, per network role.
type Addresses struct {
	Management string `json:"management,omitempty"`
	Storage    string `json:"storage,omitempty"`
	Migration  string `json:"migration,omitempty"`
	Extra      `json:"-"`
}

// NodeSpec is /herd/nodespec/<hwid>: what operators want of a node. Only operators write it; the
// leader acts on it and records what it did in the node's NodeState.
type NodeSpec struct {
	V int `json:"v"`
	// Cordoned: no new VM is placed on the node; its VMs keep running.
	Cordoned bool      `json:"cordoned,omitempty"`
	Reason   string    `json:"reason,omitempty"`
	Since    time.Time `json:"since,omitzero"`
	// Drain: cordoned, and every VM is moved away (live migration, or restart for VMs that
	// cannot migrate).
	Drain bool `json:"drain,omitempty"`
	// Image pins the image version the node boots next; "" means the current one.
	Image string `json:"image,omitempty"`
	Extra `json:"-"`
}

// Capacity is what a node may offer the scheduler.
type Capacity struct {
	CPUs      int   `json:"cpus"`
	MemoryMiB int64 `json:"memory_mib"`
	Extra     `json:"-"`
}

// NodeState is /herd/nodestate/<hwid>: what the leader knows and decided about a node. Only the
// leader writes it, always by compare-and-swap on its ModRevision; operators say what they want in
// /herd/nodespec/<hwid>.
type NodeState struct {
	V int `json:"v"`
	// Image is the version the node boots next ("" = the current one): the operator's pin as the
	// leader applied it, or the version a rollout moved the node to. It lives here, not in the
	// hardware record, so re-enrolling hardware never loses it.
	Image string `json:"image,omitempty"`
	// PinApplied is the operator's pin (NodeSpec.Image) the leader last applied: a later change of
	// it overrides a rollout's pin, and a later rollout overrides it.
	PinApplied string `json:"pin_applied,omitempty"`
	// BootID and Lease are the last registration the leader saw (Lease is the lease etcd says the
	// node key is attached to, not what the node claims), kept so that a leader which never saw
	// the node alive can still tell which boot died and check its lease.
	BootID    string     `json:"boot_id,omitempty"`
	Lease     int64      `json:"lease,omitempty"`
	Addresses *Addresses `json:"addresses,omitempty"`
	// MigrationIP is the live-migration address the leader vouches for: the only name the node's
	// migration certificate may carry. No two nodes hold the same one.
	MigrationIP string `json:"migration_ip,omitempty"`
	// Left records that this boot's agent stopped cleanly (its VMs were not lost).
	Left bool `json:"left,omitempty"`
	// Drained: the drain the node is under (the operator's or a rollout's) has moved every VM away.
	Drained bool `json:"drained,omitempty"`
	// Waiting says, while the node drains, why it is not drained yet: the first VM on it that
	// cannot leave, in its problem's words ("" while the VMs are simply on their way).
	Waiting string `json:"waiting,omitempty"`
	// Rollout is the rollout that has the node cordoned and draining, until it is back on the image.
	Rollout string `json:"rollout,omitempty"`
	// Capacity is what the node may offer: the hardware record's expected capacity, else what the
	// node reported at its first registration. A node reporting more is capped to it, and Capped
	// says so.
	Capacity *Capacity `json:"capacity,omitempty"`
	Capped   string    `json:"capped,omitempty"`
	// Doubt says why the node's key is not trusted as a live registration (no lease, a lease too
	// long): the node counts as absent while it lasts.
	Doubt string `json:"doubt,omitempty"`
	Extra `json:"-"`
}

// NodeAdmin is a node's administrative state as the operator's wishes and the leader's rollout
// combine: whether it takes new VMs, whether its VMs are being moved away, and why.
type NodeAdmin struct {
	Cordoned, Draining, Drained bool
	Reason                      string
}

// AdminOf combines a node's spec and state (either may be nil).
func AdminOf(spec *NodeSpec, state *NodeState) NodeAdmin {
	var a NodeAdmin
	if spec != nil {
		a.Cordoned, a.Draining, a.Reason = spec.Cordoned || spec.Drain, spec.Drain, spec.Reason
	}
	if state != nil && state.Rollout != "" {
		a.Cordoned, a.Draining = true, true
		if a.Reason == "" {
			a.Reason = "rollout " + state.Rollout
		}
	}
	if state != nil {
		a.Drained = a.Draining && state.Drained
	}
	return a
}

// Power states a spec can ask for.
const (
	PowerRunning = "running"
	PowerStopped = "stopped"
)

// VMSpec is /herd/vms/<name>/spec: what the operator wants. Its etcd CreateRevision is the VM's
// uid, so a VM deleted and created again under the same name is a different VM; AdoptUID, if set,
// is the uid instead (see SpecUID).
type VMSpec struct {
	V         int   `json:"v"`
	VCPUs     int   `json:"vcpus"`
	MemoryMiB int64 `json:"memory_mib"`
	// Disks are the VM's disks, the first one booted from (see DiskList). Disk is the old form of
	// one disk: a spec written with it still reads (as disks [{"name": "root", ...}]); a spec may
	// not have both.
	Disks []Disk `json:"disks,omitempty"`
	Disk  *Disk  `json:"disk,omitempty"`
	// Power is running (the default when empty) or stopped.
	Power        string            `json:"power,omitempty"`
	Labels       map[string]string `json:"labels,omitempty"`
	NodeSelector map[string]string `json:"node_selector,omitempty"`
	// AntiAffinity names a group: at most one VM of a group runs on a node.
	AntiAffinity string `json:"anti_affinity,omitempty"`
	// Networks are the VM's NICs, each on a bridge of the hypervisor.
	Networks []Network `json:"networks,omitempty"`
	// Boot, if set, boots a kernel directly (paths on the hypervisor) instead of from the disk.
	Boot *KernelBoot `json:"boot,omitempty"`
	// MigrationPolicy says how the VM leaves a node that is drained: migrate (live, the default)
	// or restart (shut down, start elsewhere) for VMs that cannot migrate.
	MigrationPolicy string `json:"migration_policy,omitempty"`
	// Restarts is a generation: raising it (herdctl vm restart) makes the VM shut down and start
	// again.
	Restarts int `json:"restarts,omitempty"`
	// AdoptUID takes over a VM that runs as an orphan after an etcd restore (the restore lost its
	// spec): the spec claims the orphan's uid, so its domain and disks stay its own. The leader
	// honours it only while a placement of the name carries that uid (the orphan it adopts, then
	// the VM it became), and only for a uid older than the spec (herdctl vm adopt).
	AdoptUID int64 `json:"adopt_uid,omitempty"`
	// SSHKeys and UserData configure the guest at its first boot (cloud-init NoCloud: the node
	// attaches a seed with them, the VM's hostname and its NICs' addresses as a CD-ROM).
	SSHKeys  []string `json:"ssh_keys,omitempty"`
	UserData string   `json:"user_data,omitempty"`
	Extra    `json:"-"`
}

// SpecUID is the uid of the VM a spec record describes: its CreateRevision, or the uid it adopts.
func SpecUID(r *Record[VMSpec]) int64 {
	if r.OK() && r.Value.AdoptUID > 0 {
		return r.Value.AdoptUID
	}
	return r.CreateRevision
}

// Migration policies.
const (
	MigrateLive    = "migrate"
	MigrateRestart = "restart"
)

// Network is one NIC: on a herd network (Network, with an address the leader allocates or the
// fixed Address), or on a bridge of the hypervisor named as is (Bridge, no address).
type Network struct {
	Bridge  string `json:"bridge,omitempty"`
	Network string `json:"network,omitempty"`
	// Address is a fixed address on Network, which must lie in its CIDR; "" lets the leader
	// allocate one from the network's range.
	Address string `json:"address,omitempty"`
	// Model defaults to virtio.
	Model string `json:"model,omitempty"`
	Extra `json:"-"`
}

// NetworkSpec is /herd/networks/<name>: a network VMs attach to, carried by every hypervisor (a
// VLAN on its uplink, or untagged on a bridge), whose addresses the leader hands out.
type NetworkSpec struct {
	V int `json:"v"`
	// VLAN is the 802.1Q id the network is tagged with on the hypervisors' uplink; 0: untagged,
	// on Bridge.
	VLAN int `json:"vlan,omitempty"`
	// Bridge is the hypervisor bridge an untagged network's NICs join (default br0); a VLAN
	// network's bridge is named after its id (HostBridge).
	Bridge  string   `json:"bridge,omitempty"`
	CIDR    string   `json:"cidr"`
	Gateway string   `json:"gateway,omitempty"`
	DNS     []string `json:"dns,omitempty"`
	// RangeFirst and RangeLast bound the addresses the leader allocates, both included (default:
	// every host address of the CIDR but the gateway). Fixed addresses may lie outside it.
	RangeFirst string `json:"range_first,omitempty"`
	RangeLast  string `json:"range_last,omitempty"`
	MTU        int    `json:"mtu,omitempty"`
	Extra      `json:"-"`
}

// AddressClaim is /herd/addresses/<network>/<ip>: the address one NIC of a VM holds. The leader
// writes it in the transaction that first places the VM, conditioned on its absence, and deletes
// it with the VM: one key per address, so no two VMs hold an address at any revision.
type AddressClaim struct {
	V     int       `json:"v"`
	VM    string    `json:"vm"`
	UID   int64     `json:"uid"`
	NIC   int       `json:"nic"`
	Since time.Time `json:"since"`
	Extra `json:"-"`
}

// NIC is what a node needs to attach and configure one NIC of a VM on a herd network: resolved by
// the leader from the network's record, so that a node reads no network record to run a VM.
type NIC struct {
	Network string `json:"network"`
	// Bridge is the hypervisor bridge the NIC joins; VLAN, when set, the tag it carries on the
	// uplink (the node makes the bridge).
	Bridge string `json:"bridge"`
	VLAN   int    `json:"vlan,omitempty"`
	// Address is the NIC's address with the network's prefix length (10.20.0.17/22).
	Address string   `json:"address"`
	Gateway string   `json:"gateway,omitempty"`
	DNS     []string `json:"dns,omitempty"`
	MTU     int      `json:"mtu,omitempty"`
	Extra   `json:"-"`
}

// KernelBoot boots a kernel directly.
type KernelBoot struct {
	Kernel  string `json:"kernel"`
	Initrd  string `json:"initrd,omitempty"`
	Cmdline string `json:"cmdline,omitempty"`
	Extra   `json:"-"`
}

// Disk is one of a VM's disks in a pool of shared storage.
type Disk struct {
	// Name tells a VM's disks apart and names its storage (DiskImage): "root" for the first disk
	// when empty; required for the others.
	Name    string `json:"name,omitempty"`
	Pool    string `json:"pool"`
	SizeGiB int64  `json:"size_gib"`
	// Image names a VM image (/herd/vmimages/<name>) to clone; From a backend-specific source
	// (e.g. pool/image@snap) instead. At most one of them.
	Image string `json:"image,omitempty"`
	From  string `json:"from,omitempty"`
	Extra `json:"-"`
}

// Spec features agents announce (Node.Features) and specs need (VMSpec.Needs).
const (
	FeatureDisks    = "disks"    // the disks list: several disks, images
	FeatureNetworks = "networks" // NICs on herd networks, with addresses, and the NoCloud seed
)

// AgentFeatures are the features this herd's agent implements.
var AgentFeatures = []string{FeatureDisks, FeatureNetworks}

// Needs are the features a node's agent must have to run the spec as written.
func (s *VMSpec) Needs() []string {
	var out []string
	if len(s.Disks) > 0 {
		out = append(out, FeatureDisks)
	}
	if len(s.SSHKeys) > 0 || s.UserData != "" || slices.ContainsFunc(s.Networks, func(n Network) bool { return n.Network != "" }) {
		out = append(out, FeatureNetworks)
	}
	return out
}

// RootDisk is the name of a VM's first disk unless the spec names it.
const RootDisk = "root"

// DiskList is the spec's disks, named: Disks, or the old one-disk form as a disk named "root".
func (s *VMSpec) DiskList() []Disk {
	var out []Disk
	if len(s.Disks) > 0 {
		out = slices.Clone(s.Disks)
	} else if s.Disk != nil {
		out = []Disk{*s.Disk}
	}
	if len(out) > 0 && out[0].Name == "" {
		out[0].Name = RootDisk
	}
	return out
}

// Placement is /herd/vms/<name>/placement, written only by the leader, in the same transaction as
// the node's assignment.
type Placement struct {
	V   int   `json:"v"`
	UID int64 `json:"uid"`
	// Node is the hwid the VM runs on.
	Node string `json:"node"`
	// Epoch increases every time the VM moves, so a node can tell a stale copy from the current one.
	Epoch int64 `json:"epoch"`
	// UUID is the domain UUID, fixed for the VM's life so guests and tooling see one machine.
	UUID string `json:"uuid"`
	// SpecRev is the spec ModRevision the assignment carries.
	SpecRev int64 `json:"spec_rev"`
	// VCPUs, MemoryMiB and AntiAffinity are what the placement reserves on its node: those of the
	// spec the node was given, which is not always the newest spec (an invalid edit is never
	// handed to the node).
	VCPUs        int       `json:"vcpus"`
	MemoryMiB    int64     `json:"memory_mib"`
	AntiAffinity string    `json:"anti_affinity,omitempty"`
	Since        time.Time `json:"since"`
	// By and Term name the leader that wrote this placement and its term (the election key's
	// CreateRevision): an audit of which leadership made each decision.
	By   string `json:"by,omitempty"`
	Term int64  `json:"term,omitempty"`
	// MACs are the NICs' addresses, fixed for the VM's life like the UUID.
	MACs []string `json:"macs,omitempty"`
	// NICs are the NICs on herd networks, by NIC (nil for a NIC on a bare bridge): the address
	// each holds (an AddressClaim written in the same transaction) and the network's settings as
	// they were then. Kept across moves like the MACs; a node gets them in its assignment.
	NICs []*NIC `json:"nics,omitempty"`
	// Migration, while set, is an open move to another node; nobody starts or resumes the VM.
	Migration *Migration `json:"migration,omitempty"`
	// Orphan marks a VM found running after an etcd restore whose spec the restore lost: no node
	// is assigned it, its node keeps it, and nothing removes it until an operator forgets it
	// (herdctl vm forget).
	Orphan bool `json:"orphan,omitempty"`
	Extra  `json:"-"`
}

// Migration modes.
const (
	ModeLive    = "live"    // libvirt live migration, peer to peer, shared storage
	ModeRestart = "restart" // shut down on the source, start on the target
)

// Migration is an open move of a VM.
type Migration struct {
	ID      string    `json:"id"`
	To      string    `json:"to"`
	Mode    string    `json:"mode"`
	Reason  string    `json:"reason,omitempty"` // drain, operator, rollout
	Started time.Time `json:"started"`
	Extra   `json:"-"`
}

// MigrateRequest is /herd/vms/<name>/migrate: an operator asks the leader to move the VM.
type MigrateRequest struct {
	V         int       `json:"v"`
	To        string    `json:"to,omitempty"`
	Requested time.Time `json:"requested"`
	Extra     `json:"-"`
}

// Assignment is /herd/assign/<hwid>/<name>: one entry of a node's work list. It carries a copy of the
// spec so that an agent needs to watch nothing but its own prefix (and per-node RBAC can keep it away
// from every other tenant's spec).
type Assignment struct {
	V       int      `json:"v"`
	UID     int64    `json:"uid"`
	Epoch   int64    `json:"epoch"`
	UUID    string   `json:"uuid"`
	SpecRev int64    `json:"spec_rev"`
	Spec    *VMSpec  `json:"spec"`
	MACs    []string `json:"macs,omitempty"`
	// NICs configure the NICs on herd networks, by NIC (nil for a NIC on a bare bridge).
	NICs []*NIC `json:"nics,omitempty"`
	// Outgoing, on the source of a migration: where to send the VM.
	Outgoing *Outgoing `json:"outgoing,omitempty"`
	// Incoming, on the target of a migration, is its id: expect the domain, never start it.
	Incoming string `json:"incoming,omitempty"`
	// MinOSDMapEpoch, after a move off a node fenced by Ceph blocklisting, is the osdmap epoch the
	// node must have seen before it starts the VM.
	MinOSDMapEpoch int64 `json:"min_osdmap_epoch,omitempty"`
	// Withdraw: the leader takes the VM back from this node (it runs, or may run, elsewhere): stop
	// and undefine the domain at once, start nothing, and report "withdrawn".
	Withdraw bool `json:"withdraw,omitempty"`
	Extra    `json:"-"`
}

// DecodeAssignmentHead decodes an assignment but its copy of the spec, which stays raw (in Extra,
// so that the value still encodes whole): for the leader, which reads every assignment every round
// and needs a spec only when it restores a placement. SpecCopy decodes it.
func DecodeAssignmentHead(data []byte) (*Assignment, error) {
	var a Assignment
	type plain Assignment
	var p plain
	extra, err := decodeObjectSkipping(data, &p, "spec")
	a = Assignment(p)
	a.Extra = extra
	if err != nil {
		return nil, err
	}
	if err := checkVersion(&a.V); err != nil {
		return nil, err
	}
	return &a, nil
}

// SpecCopy is the assignment's copy of the spec, decoded from the raw member a head decode left.
func (a *Assignment) SpecCopy() (*VMSpec, error) {
	if a.Spec != nil {
		return a.Spec, nil
	}
	raw, ok := a.Extra["spec"]
	if !ok || string(raw) == "null" {
		return nil, errors.New("the assignment carries no spec")
	}
	return Decode[VMSpec](raw)
}

// Outgoing tells a migration's source where the VM goes.
type Outgoing struct {
	ID   string `json:"id"`
	To   string `json:"to"`
	Mode string `json:"mode"`
	// PeerURI is the target libvirtd (peer to peer); Address the target's migration address.
	PeerURI string `json:"peer_uri,omitempty"`
	Address string `json:"address,omitempty"`
	Extra   `json:"-"`
}

// States an agent reports.
const (
	StatePending   = "pending"  // assigned, not defined yet
	StateRunning   = "running"  // the domain is running
	StateStopped   = "stopped"  // defined, not running, as the spec asks
	StateStarting  = "starting" // asked to run, not running yet
	StateStopping  = "stopping"
	StateError     = "error"
	StateOrphan    = "orphan"   // runs here without evidence either way; an operator decides
	StateIncoming  = "incoming" // a migration target waiting for the domain
	StateMigrating = "migrating"
	StateWithdrawn = "withdrawn"  // the leader withdrew the assignment; the domain is gone from here
	StateCrashLoop = "crash-loop" // the guest keeps crashing; restarted with backoff
)

// VMStatus is /herd/status/<hwid>/<name>: what a node's agent observes of a VM it runs.
type VMStatus struct {
	V       int       `json:"v"`
	UID     int64     `json:"uid"`
	Epoch   int64     `json:"epoch"`
	State   string    `json:"state"`
	Since   time.Time `json:"since"`
	Message string    `json:"message,omitempty"`
	// UUID is the domain's UUID, and Domain its state in libvirt (running, stopped, ...; "" when
	// there is no domain), so that the leader can tell where a VM runs from reports alone.
	UUID   string `json:"uuid,omitempty"`
	Domain string `json:"domain,omitempty"`
	// Migration is the id of the migration this status reports on (source or target), and
	// MigrationResult the source's outcome: done, evicted, or failed: why.
	Migration       string `json:"migration,omitempty"`
	MigrationResult string `json:"migration_result,omitempty"`
	Extra           `json:"-"`
}

// DomainRunning says whether the report is of a domain that runs.
func (st *VMStatus) DomainRunning() bool {
	return st.Domain == StateRunning || (st.Domain == "" && (st.State == StateRunning || st.State == StateMigrating || st.State == StateStopping))
}

// Migration results a source reports.
const (
	MigrationDone    = "done"
	MigrationEvicted = "evicted"
	MigrationFailed  = "failed"
)

// Problem kinds.
const (
	// ProblemInvalid: the spec cannot be acted on until someone fixes it.
	ProblemInvalid = "invalid"
	// ProblemPending: valid, but no node can take it now; may change on its own.
	ProblemPending = "pending"
	// ProblemNodeLost: its node is lost and cannot be fenced yet; the VM stays placed.
	ProblemNodeLost = "node-lost"
	// ProblemMigration: the last migration failed; the VM runs on its source. Kept until a move
	// succeeds, so that an operator sees it.
	ProblemMigration = "migration-failed"
	// ProblemRestoreHold: after an etcd restore the VM ran on no node that reported, so it may have
	// been deleted after the backup was taken; it is not started until an operator writes its spec
	// (herdctl vm release) or deletes it.
	ProblemRestoreHold = "restore-hold"
	// ProblemCrashLoop: the guest crashed again and again on its node (the report says how often);
	// its node keeps starting it with backoff.
	ProblemCrashLoop = "crash-loop"
)

// Fence phases.
const (
	FenceFencing = "fencing" // committed: this boot of the node is dead to the cluster
	FenceFailed  = "failed"  // the fencer failed; retried with backoff; VMs stay placed
	FenceFenced  = "fenced"  // fenced: its VMs may run elsewhere
	// FenceClearing: an operator cleared the fence (or the node rebooted); the leader undoes it
	// (removes blocklist entries) and deletes the record. Until then the boot stays fenced.
	FenceClearing = "clearing"
)

// Fence is /herd/fence/<hwid>/<bootid>: the commit point of one boot of a node's death. Written by
// the leader only while the node key is absent; any later leader finishes the job.
type Fence struct {
	V       int       `json:"v"`
	HWID    string    `json:"hwid"`
	BootID  string    `json:"boot_id"`
	Phase   string    `json:"phase"`
	Method  string    `json:"method"`
	Started time.Time `json:"started"`
	Updated time.Time `json:"updated"`
	// Attempts counts fencer runs; Error is the last failure.
	Attempts int    `json:"attempts,omitempty"`
	Error    string `json:"error,omitempty"`
	By       string `json:"by,omitempty"`
	// Details are the fencer's own record (blocklisted addresses, osdmap epoch, expiry).
	Details map[string]string `json:"details,omitempty"`
	Extra   `json:"-"`
}

// ConsoleTicket is /herd/consoles/<hwid>/<id>: an operator's leave to attach to one VM's serial
// console on that node, written by herdctl with the operator's own etcd credentials under a short
// lease just before it connects. etcd's RBAC decides, at that moment, who may write one (operators
// and root): a user deleted or demoted in etcd writes none, whatever certificate they still hold.
// It holds no secret: the agent also requires the caller's certificate to name User.
type ConsoleTicket struct {
	V       int       `json:"v"`
	VM      string    `json:"vm"`
	User    string    `json:"user"`
	Created time.Time `json:"created"`
	Extra   `json:"-"`
}

// LossGuard is /herd/lossguard: set by the leader when too many nodes were lost at once to be a
// hardware failure (a partition of the coordinators from the nodes, a power event); fencing and
// rescheduling of the listed nodes wait until an operator confirms.
type LossGuard struct {
	V         int       `json:"v"`
	Nodes     []string  `json:"nodes"`
	Since     time.Time `json:"since"`
	Confirmed bool      `json:"confirmed,omitempty"`
	By        string    `json:"confirmed_by,omitempty"`
	Extra     `json:"-"`
}

// Problem is /herd/vms/<name>/problem, written by the leader: why a VM is not where it should be.
// It is kept apart from the status so that each key has exactly one writer.
type Problem struct {
	V       int    `json:"v"`
	UID     int64  `json:"uid"`
	Kind    string `json:"kind"`
	Message string `json:"message"`
	// Reasons counts nodes per rejection reason ("insufficient memory": 3).
	Reasons map[string]int `json:"reasons,omitempty"`
	Since   time.Time      `json:"since"`
	// SpecRev, on a restore hold, is the spec revision held: any later write of the spec by an
	// operator releases it.
	SpecRev int64 `json:"spec_rev,omitempty"`
	Extra   `json:"-"`
}

// Event is /herd/events/<time>-<id>: an audit record, kept for a week under a shared lease.
type Event struct {
	V       int       `json:"v"`
	Time    time.Time `json:"time"`
	Actor   string    `json:"actor"`
	Object  string    `json:"object"` // e.g. vm/web1, node/52:54:00:00:00:01
	Action  string    `json:"action"`
	Message string    `json:"message,omitempty"`
	// User is the etcd user the writer authenticated as (its certificate's CN), when TLS is on.
	User  string `json:"user,omitempty"`
	Extra `json:"-"`
}

// Discovered is /herd/discovered/<mac>: a machine that tried to boot and is not enrolled. It
// expires about a day after its last attempt.
type Discovered struct {
	V          int       `json:"v"`
	MAC        string    `json:"mac"`
	Serial     string    `json:"serial,omitempty"`
	UUID       string    `json:"uuid,omitempty"`
	Arch       string    `json:"arch,omitempty"`
	FirstSeen  time.Time `json:"first_seen"`
	LastSeen   time.Time `json:"last_seen"`
	Attempts   int       `json:"attempts"`
	Bootserver string    `json:"bootserver,omitempty"`
	// Reason says why the machine is not booted when it is not simply unknown (a serial that cannot
	// identify it, say).
	Reason string `json:"reason,omitempty"`
	Extra  `json:"-"`
}

// ImageFile is one file of a boot image, as the catalogue records it.
type ImageFile struct {
	Name   string `json:"name"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
	Extra  `json:"-"`
}

// Image is /herd/images/<version>: one immutable hypervisor image in the catalogue. The files live
// in each bootserver's image directory as <dir>/<version>/<name>.
type Image struct {
	V       int       `json:"v"`
	Kernel  ImageFile `json:"kernel"`
	Initrd  ImageFile `json:"initrd"`
	Cmdline string    `json:"cmdline,omitempty"`
	Created time.Time `json:"created"`
	Extra   `json:"-"`
}

// ImageCurrent is /herd/images/current: the version nodes without a pin boot.
type ImageCurrent struct {
	V       int    `json:"v"`
	Version string `json:"version"`
	Extra   `json:"-"`
}

// BootImage is the image version a node boots next: its pin (state.Image), else the current
// version; "" when there is neither. Either argument may be nil.
func BootImage(state *NodeState, current *ImageCurrent) string {
	if state != nil && state.Image != "" {
		return state.Image
	}
	if current != nil {
		return current.Version
	}
	return ""
}

// Bootserver is /herd/bootservers/<name>, under the bootserver's lease: where it serves and which
// image versions it verified.
type Bootserver struct {
	V       int       `json:"v"`
	URL     string    `json:"url"`
	Started time.Time `json:"started"`
	// Images maps each catalogue version to "ok" or why it cannot be served.
	Images map[string]string `json:"images"`
	Extra  `json:"-"`
}

// DHCPLease is /herd/dhcp/leases/<mac> (and /herd/dhcp/ips/<ip> names the same holder), under an
// etcd lease as long as the DHCP lease: full-mode bootservers share their address pool through it.
type DHCPLease struct {
	V   int    `json:"v"`
	MAC string `json:"mac"`
	IP  string `json:"ip"`
	// State: offered (held for the client's REQUEST), bound (leased), declined (a client found the
	// address in use: not offered until Expires).
	State string `json:"state,omitempty"`
	// Expires ends the record's hold: after it the address is free, whether or not etcd has removed
	// the key yet (keys hang on a lease shared by many records).
	Expires time.Time `json:"expires,omitzero"`
	// By is the bootserver replica that wrote the record.
	By    string `json:"by,omitempty"`
	Extra `json:"-"`
}

// DHCP lease states.
const (
	DHCPOffered  = "offered"
	DHCPBound    = "bound"
	DHCPDeclined = "declined"
)

// Volume states.
const (
	VolumeReady = "ready"
	VolumeError = "error"
)

// VolumeRecord is /herd/volumes/<pool>/<image>: a disk the leader made (or found) in shared
// storage, and which VM it belongs to. Disks outlive their VM unless purged.
type VolumeRecord struct {
	V       int    `json:"v"`
	VM      string `json:"vm"`
	UID     int64  `json:"uid"`
	SizeGiB int64  `json:"size_gib"`
	// Disk is the name of the VM's disk it is ("root" when empty: records older than disk names).
	Disk    string    `json:"disk,omitempty"`
	From    string    `json:"from,omitempty"`
	State   string    `json:"state"`
	Error   string    `json:"error,omitempty"`
	Updated time.Time `json:"updated"`
	Extra   `json:"-"`
}

// VMImage is /herd/vmimages/<name>: a disk image VMs clone from, written by operators (herdctl
// volume import). The leader fetches Source once, converts it to raw and stores it in Pool as a
// protected snapshot (VMImageStatus says how far it got); a disk whose spec names the image is a
// copy-on-write clone of it. The record's CreateRevision is the image's uid: an image deleted and
// imported again under the same name is a different image, stored under another name.
type VMImage struct {
	V int `json:"v"`
	// Source is where the leader fetches the file: http://, https:// or file:// (a path on the
	// coordinators' hosts).
	Source string `json:"source"`
	// Format is raw or qcow2; empty means found out from the file.
	Format string `json:"format,omitempty"`
	Pool   string `json:"pool"`
	// SHA256, if set, is the file's checksum: an import whose bytes differ fails.
	SHA256 string `json:"sha256,omitempty"`
	Extra  `json:"-"`
}

// VM image states.
const (
	ImageImporting = "importing"
	ImageReady     = "ready"
	ImageError     = "error"
)

// VMImageStatus is /herd/vmimagestatus/<name>, written only by the leader: how the import of the
// image of uid UID went, and, once ready, what a disk clones (From) and how big it must be.
type VMImageStatus struct {
	V     int    `json:"v"`
	UID   int64  `json:"uid"`
	State string `json:"state"`
	// Pool is where the image is (being) stored.
	Pool string `json:"pool,omitempty"`
	// Phase is the step an import is at (fetch, convert, store); Bytes of Total are its progress
	// (Total 0 when the source does not say).
	Phase string `json:"phase,omitempty"`
	Bytes int64  `json:"bytes,omitempty"`
	Total int64  `json:"total,omitempty"`
	// Format is what the file turned out to be; SizeBytes its virtual size, which a disk cloned
	// from it must at least have.
	Format    string `json:"format,omitempty"`
	SizeBytes int64  `json:"size_bytes,omitempty"`
	SHA256    string `json:"sha256,omitempty"`
	// From is the backend's clone source, e.g. pool/image@snap.
	From    string    `json:"from,omitempty"`
	Error   string    `json:"error,omitempty"`
	Updated time.Time `json:"updated"`
	Extra   `json:"-"`
}

// Progress says how far an import is, in words.
func (s *VMImageStatus) Progress() string {
	switch {
	case s.Total > 0:
		return fmt.Sprintf("%s %d%%", s.Phase, s.Bytes*100/s.Total)
	case s.Bytes > 0:
		return fmt.Sprintf("%s %d MiB", s.Phase, s.Bytes>>20)
	}
	return s.Phase
}

// MinDiskGiB is the smallest disk that holds the image.
func (s *VMImageStatus) MinDiskGiB() int64 { return (s.SizeBytes + 1<<30 - 1) >> 30 }

// JoinToken is /herd/jointokens/<sha256 of the token>: a one-time credential that lets the machine
// with this hardware id join once. Only the hash is stored; the key's lease ends it at Expires.
type JoinToken struct {
	V       int       `json:"v"`
	HWID    string    `json:"hwid"`
	Expires time.Time `json:"expires"`
	// IssuedBy is who minted it: bootserver/<name> for a netboot, or the operator's user.
	IssuedBy string `json:"issued_by"`
	// MAC, when set, is the boot NIC of the machine the token was served to: only a join that
	// names the same MAC may spend it.
	MAC   string `json:"mac,omitempty"`
	Extra `json:"-"`
}

// Rollout is /herd/rollout: the rolling image upgrade an operator asked for (herdctl rollout start).
// Operators write it by compare-and-swap; the leader carries it out and records its progress in
// /herd/rolloutstatus, never here.
type Rollout struct {
	V     int    `json:"v"`
	ID    string `json:"id"`
	Image string `json:"image"`
	// MaxUnavailable bounds the nodes of the fleet that are cordoned by the rollout or not ready.
	MaxUnavailable int `json:"max_unavailable"`
	// Nodes is the fleet chosen at start, in the order they are upgraded; the leader extends it
	// with hardware enrolled later when Selector follows enrolment (see NodeSelector).
	Nodes []string `json:"nodes"`
	// Selector is how Nodes is chosen (ParseNodeSelector).
	Selector string `json:"selector,omitempty"`
	// NodeTimeoutSeconds: a node that has not rejoined on the new image this long after it began
	// pauses the rollout.
	NodeTimeoutSeconds int64 `json:"node_timeout_seconds"`
	// State is what the operator wants: running, paused or aborting.
	State string `json:"state"`
	// Resumes is raised by 'herdctl rollout resume': the leader retries a node the rollout
	// paused on.
	Resumes int       `json:"resumes,omitempty"`
	By      string    `json:"by,omitempty"`
	Started time.Time `json:"started"`
	Extra   `json:"-"`
}

// RolloutStatus is /herd/rolloutstatus: the leader's progress of the rollout whose ID it names.
type RolloutStatus struct {
	V  int    `json:"v"`
	ID string `json:"id"`
	// State is running, paused, done or aborted.
	State string `json:"state"`
	// Reason says why the rollout waits or paused.
	Reason string `json:"reason,omitempty"`
	// Nodes is the fleet as the leader follows it (the request's, extended by enrolment).
	Nodes []string `json:"nodes"`
	// Resumes is the request's Resumes the leader last acted on.
	Resumes int                     `json:"resumes,omitempty"`
	Updated time.Time               `json:"updated"`
	Ended   time.Time               `json:"ended,omitzero"`
	Per     map[string]*RolloutNode `json:"per_node,omitempty"`
	Extra   `json:"-"`
}

// Rollout states. Operators ask for running, paused and aborting; the leader reports running,
// paused, done and aborted.
const (
	RolloutRunning  = "running"
	RolloutPaused   = "paused"
	RolloutAborting = "aborting"
	RolloutAborted  = "aborted"
	RolloutDone     = "done"
)

// RolloutNode is one node's progress in a rollout.
type RolloutNode struct {
	Phase string    `json:"phase"`
	Since time.Time `json:"since,omitzero"`
	// Began and Finished time the node's whole upgrade (for the ETA and the report).
	Began    time.Time `json:"began,omitzero"`
	Finished time.Time `json:"finished,omitzero"`
	// BootID is the boot being replaced; the node is back when it registers with another one.
	BootID string `json:"boot_id,omitempty"`
	// Attempt numbers the reboot commands sent (the command id is <rollout id>-<attempt>).
	Attempt int `json:"attempt,omitempty"`
	// PrevImage is the pin abort restores.
	PrevImage string `json:"prev_image,omitempty"`
	// SpecRev is the node spec's revision when the node began: an operator who uncordons the node
	// after that pauses the rollout on it.
	SpecRev int64  `json:"spec_rev,omitempty"`
	Error   string `json:"error,omitempty"`
	Extra   `json:"-"`
}

// Rollout node phases.
const (
	PhasePending   = "pending"
	PhaseDraining  = "draining"
	PhaseRebooting = "rebooting"
	PhaseDone      = "done"
	PhaseSkipped   = "skipped" // already on the image
	PhaseAborted   = "aborted"
	PhaseRemoved   = "removed" // its hardware record was deleted before its turn
)

// Over says whether the node has nothing left to do in the rollout.
func (p *RolloutNode) Over() bool {
	switch p.Phase {
	case PhaseDone, PhaseSkipped, PhaseAborted, PhaseRemoved:
		return true
	}
	return false
}

// NodeCommand is /herd/nodecmd/<hwid>/<id>: something the node's agent does once. It applies only
// to the boot IfBootID, so a command can never run again after the reboot it asked for. The agent
// records Result by compare-and-swap before it acts.
type NodeCommand struct {
	V        int        `json:"v"`
	Command  string     `json:"command"` // "reboot"
	IfBootID string     `json:"if_boot_id"`
	Issued   time.Time  `json:"issued"`
	By       string     `json:"by,omitempty"`
	Result   *CmdResult `json:"result,omitempty"`
	Extra    `json:"-"`
}

// CmdResult is what the agent did with a command.
type CmdResult struct {
	State string    `json:"state"` // started, done, failed
	At    time.Time `json:"at"`
	Error string    `json:"error,omitempty"`
}

// Node command names and result states.
const (
	CmdReboot  = "reboot"
	CmdStarted = "started"
	CmdDone    = "done"
	CmdFailed  = "failed"
)

// Request is an operator's one-shot request under /herd/requests/: clear a fence
// (fence-clear/<hwid>/<boot id>), confirm a mass loss (confirm-loss), purge a disk
// (purge/<pool>/<image>). Of is the CreateRevision of the record it concerns (the fence record, the
// loss guard, the disk record), so a request can never apply to a later record at the same key.
// The leader acts on it, records the outcome in its own keys, and deletes the request.
type Request struct {
	V  int       `json:"v"`
	Of int64     `json:"of"`
	By string    `json:"by,omitempty"`
	At time.Time `json:"at"`
	// Listed, on a confirm-loss request, is how many nodes the guard listed when the operator
	// looked: the list grows while failover is held, and a confirmation covers only what was seen
	// (0: whatever the guard lists, for requests written by hand).
	Listed int `json:"listed,omitempty"`
	Extra  `json:"-"`
}
