package keys

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// DefaultPrefix is the root of herd's keys unless --prefix says otherwise.
const DefaultPrefix = "/herd"

// Space builds and parses keys under one root prefix. The zero value is not usable; use NewSpace.
type Space struct {
	root string
}

// NewSpace checks the prefix: it must start with '/' and must not end with one, so that every key is
// root + "/" + something and prefixes of different clusters never overlap.
func NewSpace(prefix string) (Space, error) {
	if !strings.HasPrefix(prefix, "/") || len(prefix) < 2 {
		return Space{}, fmt.Errorf("keys: prefix %q must start with '/' and name something, e.g. /herd", prefix)
	}
	if strings.HasSuffix(prefix, "/") {
		return Space{}, fmt.Errorf("keys: prefix %q must not end with '/'", prefix)
	}
	return Space{root: prefix}, nil
}

// MustSpace is NewSpace for constants in tests and defaults.
func MustSpace(prefix string) Space {
	s, err := NewSpace(prefix)
	if err != nil {
		panic(err)
	}
	return s
}

// Root is the prefix itself, e.g. "/herd".
func (s Space) Root() string { return s.root }

// All is the prefix of every herd key, e.g. "/herd/".
func (s Space) All() string { return s.root + "/" }

func (s Space) dir(name string) string { return s.root + "/" + name + "/" }

// Cluster is the single record naming this cluster: /herd/cluster.
func (s Space) Cluster() string { return s.root + "/cluster" }

// HardwarePrefix lists the allow-list of hardware that may boot and join.
func (s Space) HardwarePrefix() string      { return s.dir("hardware") }
func (s Space) Hardware(hwid string) string { return s.HardwarePrefix() + hwid }

// NodePrefix lists live nodes; each key is attached to its agent's lease.
func (s Space) NodePrefix() string      { return s.dir("nodes") }
func (s Space) Node(hwid string) string { return s.NodePrefix() + hwid }
func (s Space) NodeStatePrefix() string { return s.dir("nodestate") }
func (s Space) NodeState(hwid string) string {
	return s.NodeStatePrefix() + hwid
}

// VMPrefix lists what operators write about VMs: each VM's spec and move request. Nothing the
// leader decides lives under it, so etcd's prefix RBAC can let operators write all of it.
func (s Space) VMPrefix() string             { return s.dir("vms") }
func (s Space) VMDir(name string) string     { return s.VMPrefix() + name + "/" }
func (s Space) VMSpec(name string) string    { return s.VMDir(name) + vmSpec }
func (s Space) VMMigrate(name string) string { return s.VMDir(name) + vmMigrate }

// PlacementPrefix and ProblemPrefix hold the leader's decisions about VMs: where each runs, and why
// one is not where it should be. Only the leader (and root) may write them.
func (s Space) PlacementPrefix() string      { return s.dir("placements") }
func (s Space) Placement(name string) string { return s.PlacementPrefix() + name }
func (s Space) ProblemPrefix() string        { return s.dir("problems") }
func (s Space) Problem(name string) string   { return s.ProblemPrefix() + name }
func (s Space) NodeSpecPrefix() string       { return s.dir("nodespec") }
func (s Space) NodeSpec(hwid string) string  { return s.NodeSpecPrefix() + hwid }
func (s Space) RolloutStatus() string        { return s.root + "/rolloutstatus" }
func (s Space) RequestPrefix() string        { return s.dir("requests") }
func (s Space) ConfirmLossRequest() string   { return s.RequestPrefix() + "confirm-loss" }
func (s Space) FenceClearPrefix() string     { return s.RequestPrefix() + "fence-clear/" }
func (s Space) PurgeRequestPrefix() string   { return s.RequestPrefix() + "purge/" }
func (s Space) ForgetRequestPrefix() string  { return s.RequestPrefix() + "forget/" }
func (s Space) ForgetRequest(name string) string {
	return s.ForgetRequestPrefix() + name
}
func (s Space) FenceClearRequest(hwid, bootID string) string {
	return s.FenceClearPrefix() + hwid + "/" + bootID
}
func (s Space) PurgeRequest(pool, image string) string {
	return s.PurgeRequestPrefix() + pool + "/" + image
}

// AssignRoot lists every node's work list; AssignPrefix is one node's.
func (s Space) AssignRoot() string              { return s.dir("assign") }
func (s Space) AssignPrefix(hwid string) string { return s.AssignRoot() + hwid + "/" }
func (s Space) Assign(hwid, name string) string { return s.AssignPrefix(hwid) + name }
func (s Space) StatusRoot() string              { return s.dir("status") }
func (s Space) StatusPrefix(hwid string) string { return s.StatusRoot() + hwid + "/" }
func (s Space) Status(hwid, name string) string { return s.StatusPrefix(hwid) + name }

// Election is the prefix handed to concurrency.NewElection, which adds the '/': candidates' keys
// are /herd/leader/<lease id>.
func (s Space) Election() string    { return s.root + "/leader" }
func (s Space) EventPrefix() string { return s.dir("events") }

// EventWriterPrefix is where one writer appends its events: each writer class (and each node) has
// its own prefix, so etcd's RBAC lets it add and remove only its own records.
func (s Space) EventWriterPrefix(w EventWriter) string { return s.EventPrefix() + string(w) + "/" }

// DiscoveredPrefix lists unknown machines that tried to boot.
func (s Space) DiscoveredPrefix() string      { return s.dir("discovered") }
func (s Space) Discovered(mac string) string  { return s.DiscoveredPrefix() + mac }
func (s Space) ImagePrefix() string           { return s.dir("images") }
func (s Space) Image(version string) string   { return s.ImagePrefix() + version }
func (s Space) ImageCurrent() string          { return s.ImagePrefix() + ImageCurrentName }
func (s Space) BootserverPrefix() string      { return s.dir("bootservers") }
func (s Space) Bootserver(name string) string { return s.BootserverPrefix() + name }
func (s Space) DHCPPrefix() string            { return s.dir("dhcp") }
func (s Space) DHCPLeasePrefix() string       { return s.dir("dhcp/leases") }
func (s Space) DHCPAddressPrefix() string     { return s.dir("dhcp/ips") }
func (s Space) DHCPLease(mac string) string   { return s.DHCPLeasePrefix() + mac }
func (s Space) DHCPAddress(ip string) string  { return s.DHCPAddressPrefix() + ip }

// FenceRoot lists every fence record; FencePrefix one node's.
func (s Space) FenceRoot() string                { return s.dir("fence") }
func (s Space) FencePrefix(hwid string) string   { return s.FenceRoot() + hwid + "/" }
func (s Space) Fence(hwid, bootID string) string { return s.FencePrefix(hwid) + bootID }
func (s Space) LossGuard() string                { return s.root + "/lossguard" }

// ConsolePrefix holds operators' console tickets, ConsoleTicketPrefix those for one node.
func (s Space) ConsolePrefix() string                  { return s.dir("consoles") }
func (s Space) ConsoleTicketPrefix(hwid string) string { return s.ConsolePrefix() + hwid + "/" }
func (s Space) ConsoleTicket(hwid, id string) string   { return s.ConsoleTicketPrefix(hwid) + id }

// JoinTokenPrefix holds the hashes of one-time join tokens; NodeCmdPrefix a node's commands.
func (s Space) JoinTokenPrefix() string          { return s.dir("jointokens") }
func (s Space) JoinToken(hash string) string     { return s.JoinTokenPrefix() + hash }
func (s Space) NodeCmdRoot() string              { return s.dir("nodecmd") }
func (s Space) NodeCmdPrefix(hwid string) string { return s.NodeCmdRoot() + hwid + "/" }
func (s Space) NodeCmd(hwid, id string) string   { return s.NodeCmdPrefix(hwid) + id }
func (s Space) Rollout() string                  { return s.root + "/rollout" }

// VolumeRoot lists every disk record; Volume names one (pool, image).
func (s Space) VolumeRoot() string               { return s.dir("volumes") }
func (s Space) Volume(pool, image string) string { return s.VolumeRoot() + pool + "/" + image }

// NetworkPrefix lists the networks; AddressRoot every address claim, AddressPrefix one network's.
func (s Space) NetworkPrefix() string           { return s.dir("networks") }
func (s Space) Network(name string) string      { return s.NetworkPrefix() + name }
func (s Space) AddressRoot() string             { return s.dir("addresses") }
func (s Space) AddressPrefix(net string) string { return s.AddressRoot() + net + "/" }
func (s Space) Address(net, ip string) string   { return s.AddressPrefix(net) + ip }

// VMImagePrefix lists the VM images operators import; VMImageStatusPrefix the leader's account of
// each import.
func (s Space) VMImagePrefix() string            { return s.dir("vmimages") }
func (s Space) VMImage(name string) string       { return s.VMImagePrefix() + name }
func (s Space) VMImageStatusPrefix() string      { return s.dir("vmimagestatus") }
func (s Space) VMImageStatus(name string) string { return s.VMImageStatusPrefix() + name }

// VolumeImage is the name of a VM's first disk in its pool: the VM name for humans, the uid so
// that a VM created again under the same name never gets the old disk.
func VolumeImage(vm string, uid int64) string { return fmt.Sprintf("%s.%d", vm, uid) }

// DiskImage is the name of a VM's disk in its pool: <vm>.<uid> for the disk named root (the name
// disks had before a VM could have several), <vm>.<uid>.<disk> for the others. Disk names start
// with a letter, so the last part tells the two apart (ParseDiskImage).
func DiskImage(vm string, uid int64, disk string) string {
	if disk == "" || disk == RootDisk {
		return VolumeImage(vm, uid)
	}
	return fmt.Sprintf("%s.%d.%s", vm, uid, disk)
}

// ParseDiskImage splits a disk's storage name made by DiskImage; ok is false for any other name
// (an image herd did not make, a VM image).
func ParseDiskImage(name string) (vm string, uid int64, disk string, ok bool) {
	rest, disk := name, RootDisk
	if i := strings.LastIndexByte(rest, '.'); i > 0 && diskNameRE.MatchString(rest[i+1:]) {
		rest, disk = rest[:i], rest[i+1:]
	}
	i := strings.LastIndexByte(rest, '.')
	if i <= 0 {
		return "", 0, "", false
	}
	uid, err := strconv.ParseInt(rest[i+1:], 10, 64)
	if err != nil || uid <= 0 || ValidateName(rest[:i]) != nil {
		return "", 0, "", false
	}
	return rest[:i], uid, disk, true
}

// ImageVolume is the storage name of VM image name of uid: "image_" cannot begin a VM name, so
// no VM's disk is ever taken for an image, nor the reverse.
func ImageVolume(name string, uid int64) string { return fmt.Sprintf("image_%s.%d", name, uid) }

// ImageCurrentName is the key under ImagePrefix that names the default version; it cannot be a
// version itself.
const ImageCurrentName = "current"

// EventWriter names who wrote an event, and so the prefix it lives under: "coordinator",
// "bootserver", "operator", or "node/<hwid>".
type EventWriter string

// Event writers other than nodes.
const (
	EventsByCoordinator EventWriter = "coordinator"
	EventsByBootserver  EventWriter = "bootserver"
	EventsByOperator    EventWriter = "operator"
)

// EventsByNode is the writer of one node's events.
func EventsByNode(hwid string) EventWriter { return EventWriter("node/" + hwid) }

// Event names an audit record of writer; within a writer's prefix the time comes first so keys
// sort by time.
func (s Space) Event(w EventWriter, t time.Time, id string) string {
	return s.EventWriterPrefix(w) + t.UTC().Format(eventTimeLayout) + "-" + id
}

// ParseEvent splits an event key into its writer and time. ok is false for keys of any other
// shape (written by hand, or by a herd older than per-writer prefixes).
func (s Space) ParseEvent(key string) (w EventWriter, t time.Time, ok bool) {
	rest, found := strings.CutPrefix(key, s.EventPrefix())
	if !found {
		return "", time.Time{}, false
	}
	i := strings.LastIndexByte(rest, '/')
	if i <= 0 {
		return "", time.Time{}, false
	}
	writer, leaf := rest[:i], rest[i+1:]
	switch {
	case writer == string(EventsByCoordinator), writer == string(EventsByBootserver), writer == string(EventsByOperator):
	case strings.HasPrefix(writer, "node/") && len(writer) > len("node/") && !strings.Contains(writer[len("node/"):], "/"):
	default:
		return "", time.Time{}, false
	}
	stamp, _, _ := strings.Cut(leaf, "-")
	t, err := time.Parse(eventTimeLayout, stamp)
	if err != nil {
		return "", time.Time{}, false
	}
	return EventWriter(writer), t, true
}

const (
	vmSpec    = "spec"
	vmMigrate = "migrate"

	// eventTimeLayout sorts lexicographically in time order (fixed width, UTC).
	eventTimeLayout = "20060102T150405.000000000Z"
)

// VMPart names which of a VM's keys a key is.
type VMPart int

const (
	VMPartUnknown VMPart = iota
	VMPartSpec
	VMPartMigrate
)

// ParseVM splits a key under VMPrefix into the VM's name and the part. The name is everything between
// the prefix and the last '/', so a hand-written key with a '/' in the name still parses (to a name
// that fails validation) instead of being silently misread as another VM's key.
func (s Space) ParseVM(key string) (name string, part VMPart, ok bool) {
	rest, found := strings.CutPrefix(key, s.VMPrefix())
	if !found {
		return "", VMPartUnknown, false
	}
	i := strings.LastIndexByte(rest, '/')
	if i <= 0 {
		return "", VMPartUnknown, false
	}
	name = rest[:i]
	switch rest[i+1:] {
	case vmSpec:
		return name, VMPartSpec, true
	case vmMigrate:
		return name, VMPartMigrate, true
	}
	return name, VMPartUnknown, false
}

// ParseLeaf returns the last element of a key directly under prefix (a hwid under NodePrefix, a VM
// name under AssignPrefix(hwid)); ok is false for keys deeper than one level.
func ParseLeaf(prefix, key string) (leaf string, ok bool) {
	rest, found := strings.CutPrefix(key, prefix)
	if !found || rest == "" || strings.Contains(rest, "/") {
		return "", false
	}
	return rest, true
}

// ParseVMName returns the VM name a key under a per-VM prefix (PlacementPrefix, ProblemPrefix)
// names: everything after the prefix, so that a hand-written name with a '/' still maps to one VM
// (whose name then fails validation) instead of being lost.
func ParseVMName(prefix, key string) (name string, ok bool) {
	rest, found := strings.CutPrefix(key, prefix)
	if !found || rest == "" {
		return "", false
	}
	return rest, true
}

// ParseNodeScoped splits a key under a per-node root (AssignRoot, StatusRoot) into hwid and VM name.
func ParseNodeScoped(root, key string) (hwid, name string, ok bool) {
	rest, found := strings.CutPrefix(key, root)
	if !found {
		return "", "", false
	}
	hwid, name, found = strings.Cut(rest, "/")
	if !found || hwid == "" || name == "" {
		return "", "", false
	}
	return hwid, name, true
}

// Schema-1 keys (herd before the authority split), read and removed only by the keyspace upgrade:
// the leader's placement and problem records used to live beside the operator's spec.
func (s Space) V1Placement(name string) string { return s.VMDir(name) + "placement" }
func (s Space) V1Problem(name string) string   { return s.VMDir(name) + "problem" }

// ParseV1VMRecord splits a schema-1 key under VMPrefix into the VM's name and "placement" or
// "problem" ("" for any other key).
func ParseV1VMRecord(s Space, key string) (name, part string) {
	rest, ok := strings.CutPrefix(key, s.VMPrefix())
	if !ok {
		return "", ""
	}
	i := strings.LastIndexByte(rest, '/')
	if i <= 0 {
		return "", ""
	}
	switch rest[i+1:] {
	case "placement", "problem":
		return rest[:i], rest[i+1:]
	}
	return "", ""
}
