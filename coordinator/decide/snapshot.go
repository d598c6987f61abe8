package decide

import (
	"maps"
	"time"

	"github.com/google/uuid"

	"github.com/herdhq/herd/coordinator/scheduler"
	"github.com/herdhq/herd/lib/keys"
)

type rec[T any] = keys.Record[T]

// Config is what the leader decides with: who it is, and the operator's settings.
type Config struct {
	Space keys.Space
	// Name is the leader's name and Term its election key's CreateRevision: every record it
	// writes names them.
	Name string
	Term int64

	// Pools seed the cluster record should it be missing.
	Pools     []string
	Scheduler scheduler.Options
	// Grace is how long a node's lease must have been gone before it is fenced.
	Grace time.Duration
	// The mass-failure guard holds failover when more than MassFailureMin nodes AND more than
	// MassFailureFraction of all nodes are lost within MassFailureWindow.
	MassFailureFraction float64
	MassFailureMin      int
	MassFailureWindow   time.Duration
	// FencerName is recorded as a fence record's method.
	FencerName string
	// MaxMigrationsPerNode bounds the open migrations a node takes part in.
	MaxMigrationsPerNode int
	// ManagedDisks: the leader creates, grows and purges disks (a volume backend is configured).
	ManagedDisks bool
	// RecoveryWait bounds how long a restore recovery waits for live nodes' inventories
	// (0: DefaultRecoveryWait).
	RecoveryWait time.Duration
	// NewID makes domain UUIDs, migration ids and MACs; nil means random UUIDs. Tests count.
	NewID func() string
}

func (c *Config) id() string {
	if c.NewID != nil {
		return c.NewID()
	}
	return uuid.NewString()
}

// MaxNodeLeaseTTL bounds the lease a node key may hang on: a node that took a longer one could hide
// its death for that long.
const MaxNodeLeaseTTL = 120 * time.Second

// Snapshot is everything a round decides from: the caches as one view, and what the coordinator
// asked etcd about leases. Records are shared with the caches: never modify a Value.
type Snapshot struct {
	Now     time.Time
	Cluster *rec[keys.Cluster]
	VMs     map[string]*VM
	// Assigns are every node's assignments, by VM then node, decoded without their spec copies
	// (keys.DecodeAssignmentHead).
	Assigns map[string]map[string]*rec[keys.Assignment]
	// Reports are the nodes' status reports, by VM then node.
	Reports map[string]map[string]*rec[keys.VMStatus]
	// Nodes are the node keys present, trusted or not; LeaseTTL the granted TTL of their leases
	// (absent when etcd could not say).
	Nodes    map[string]*rec[keys.Node]
	LeaseTTL map[int64]time.Duration
	// LeaseAlive says, for the recorded leases of nodes whose key is gone or untrusted, whether
	// etcd still has the lease (absent when etcd could not say: then it counts as alive).
	LeaseAlive map[int64]bool
	States     map[string]*rec[keys.NodeState]
	Specs      map[string]*rec[keys.NodeSpec]
	Hardware   map[string]*keys.Hardware
	Fences     map[string][]*rec[keys.Fence]
	Guard      *rec[keys.LossGuard]
	Volumes    map[string]*rec[keys.VolumeRecord] // "pool/image"
	Requests   map[string]*rec[keys.Request]      // by key
	Rollout    *rec[keys.Rollout]
	Progress   *rec[keys.RolloutStatus]
	NodeCmds   map[string]*rec[keys.NodeCommand] // by key
	Networks   map[string]*rec[keys.NetworkSpec] // by name
	// Images are the VM images operators want and ImageStatus the leader's account of each, by name.
	Images      map[string]*rec[keys.VMImage]
	ImageStatus map[string]*rec[keys.VMImageStatus]
	// Claims are the addresses held, by network and address. A quick round needs only those of
	// the networks its VMs' NICs name.
	Claims map[string]map[string]*rec[keys.AddressClaim]
	// Vanished are VMs' last placements the caches saw deleted by someone else.
	Vanished map[string]*keys.Placement
	// Left are clean departures the replica saw: hwid -> boot id.
	Left map[string]string
	// FirstSeen dates each VM's spec, for the placement latency.
	FirstSeen map[string]time.Time
	// MoveBudget is how many VMs may move off fenced nodes this round (the reschedule rate).
	MoveBudget int
	// RestoreWant is the restore recovery generation the coordinator asks for: it saw etcd's
	// revision go back (0: it did not).
	RestoreWant int
	// Focus, when not nil, makes the round a quick one (quick.go): it decides about these VMs
	// only (Ledger.Quick: those whose records changed since the last round, and the unplaced
	// ones). VMs, Assigns, Reports, Volumes and FirstSeen need only hold theirs; Held is the
	// capacity every other VM holds, Occupied the fenced nodes that have VMs placed on them.
	Focus    []string
	Held     []scheduler.VM
	Occupied map[string]bool
	// Trusted, when set, is a full round's judgement of these same node records (Plan.Trusted).
	Trusted *Trusted
	// Avoid, in a quick round, are nodes whose records changed since those the round was given
	// were read (a full round that will see them is still deciding): the round places nothing on
	// them and leaves every VM with records on them to a full round.
	Avoid map[string]bool
}

// VM is one VM's records.
type VM struct {
	Spec      *rec[keys.VMSpec]
	Migrate   *rec[keys.MigrateRequest]
	Placement *rec[keys.Placement]
	Problem   *rec[keys.Problem]
}

// State is what one leadership term remembers between its rounds; a new term starts afresh, so
// nothing of it can outlive the leadership that made it.
type State struct {
	// Absent: when each node was first found absent with a dead lease (the grace period).
	Absent map[string]time.Time
	// LostAt: when each node was found dead, for the mass-failure window.
	LostAt map[string]time.Time
	// MigFailed: when each VM's last migration failed, to back off.
	MigFailed map[string]time.Time
	// LastAdopt: when disks in storage were last compared with the records.
	LastAdopt time.Time
}

// NewState is a term's state at its start.
func NewState() *State {
	return &State{Absent: map[string]time.Time{}, LostAt: map[string]time.Time{}, MigFailed: map[string]time.Time{}}
}

// Clone is a copy for a round to change while the term keeps the original (a full round deciding
// in the background).
func (st *State) Clone() *State {
	return &State{Absent: maps.Clone(st.Absent), LostAt: maps.Clone(st.LostAt), MigFailed: maps.Clone(st.MigFailed), LastAdopt: st.LastAdopt}
}

// view is a snapshot with what a round derives from it once.
type view struct {
	*Snapshot
	cfg   *Config
	st    *State
	plan  *Plan
	live  map[string]*rec[keys.Node] // trusted node keys
	doubt map[string]string          // present but untrusted node keys, and why
	// capped: live nodes whose reported capacity exceeds what they may offer, and how.
	capped     map[string]string
	nodes      []scheduler.Node
	migHolders map[string]string
	book       *addressBook // the addresses held, with those this round allocates
}

// lastSeen returns the node's state as the leader recorded it, or nil.
func (s *view) lastSeen(hwid string) *keys.NodeState {
	if r := s.States[hwid]; r.OK() {
		return r.Value
	}
	return nil
}

// admin is a node's administrative state (the operator's spec and the leader's state combined).
func (s *view) admin(hwid string) keys.NodeAdmin {
	var spec *keys.NodeSpec
	if r := s.Specs[hwid]; r.OK() {
		spec = r.Value
	}
	return keys.AdminOf(spec, s.lastSeen(hwid))
}

// draining says whether a node is being drained.
func (s *view) draining(hwid string) bool { return s.admin(hwid).Draining }

// fenceFor returns the fence record of one boot of a node.
func (s *view) fenceFor(hwid, boot string) *rec[keys.Fence] {
	for _, r := range s.Fences[hwid] {
		if r.OK() && r.Value.BootID == boot {
			return r
		}
	}
	return nil
}

// nodeFenced says whether the node's last known boot is fenced (its VMs may run elsewhere).
func (s *view) nodeFenced(hwid string) bool {
	ns := s.lastSeen(hwid)
	if ns == nil || ns.BootID == "" {
		return false
	}
	if n := s.live[hwid]; n != nil && n.Value.BootID != ns.BootID {
		return false
	}
	r := s.fenceFor(hwid, ns.BootID)
	return r != nil && r.Value.Phase == keys.FenceFenced
}

// status returns a VM's decoded status on a node, or nil.
func (s *view) status(node, name string) *keys.VMStatus {
	if r := s.Reports[name][node]; r.OK() {
		return r.Value
	}
	return nil
}

// after asks for the next round within d.
func (s *view) after(d time.Duration) {
	d += 50 * time.Millisecond
	if s.plan.After == 0 || d < s.plan.After {
		s.plan.After = d
	}
}

// log says something this round, whatever commits.
func (s *view) log(level Level, msg string, args ...any) {
	s.plan.Logs = append(s.plan.Logs, Note{Level: level, Log: msg, Args: args})
}

// note helpers.
func info(log string, args ...any) Note { return Note{Level: Info, Log: log, Args: args} }

// event is an audit record (and no log line).
func event(object, action, message string) Note {
	return Note{Object: object, Event: action, Message: message}
}
