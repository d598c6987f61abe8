// Package decide is the leader's decision core, in the Nomad spirit: Decide takes a Snapshot of the
// cluster (what the caches hold, and the little the coordinator asked etcd about leases) and the
// term's own State, and returns a Plan: the guarded writes that bring the records in step with what
// operators want and agents report, the side work to start (fencers, disks), and when to decide
// again. The scheduler decides where; this package decides what changes.
//
// It is pure: no etcd, no goroutine, no clock (Snapshot.Now is the time), no randomness but the
// IDs Config.NewID makes. So every decision is a table test: a fixture in, the expected plan out
// (decide_test.go). The coordinator's applier commits a plan under the leader's guard and runs its
// side work in the term's work queue.
package decide

import (
	"sort"
	"strings"
	"time"

	"github.com/herdhq/herd/coordinator/fence"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/volume"
)

// Plan is what one round decided.
type Plan struct {
	// Actions are independent guarded writes: each commits on its own, in any order.
	Actions []Action
	// Work is side work to start (each at most once at a time per Key).
	Work []Work
	// After, when set, is the longest the next round may wait (a grace period ends, a backoff
	// passes, rate-limited moves wait).
	After time.Duration
	// Pending counts valid VMs that fit nowhere (a metric).
	Pending int
	// Rollout counts the current rollout's nodes per phase (a metric); nil when there is none.
	Rollout map[string]int
	// Logs are what the round has to say that no write carries (records it cannot read).
	Logs []Note
	// Full, set by a quick round, says why the next round must be a full one.
	Full FullReason
	// Trusted is the round's judgement of the nodes, for quick rounds from the same snapshot's
	// nodes (Snapshot.Trusted).
	Trusted *Trusted
	// decided are the VMs a quick round decided about (tests compare them with a full round).
	decided []string
}

// Action is one write the leader makes: it commits only while every condition holds (and the
// leader's guard, which the applier adds).
type Action struct {
	Object string // vm/web1, node/<hwid>, cluster, rollout/<id>
	What   string // place, move, commit fence, ...
	Conds  []Cond
	Writes []Write
	// Notes are logged and recorded as events when the write commits.
	Notes []Note
	// Metrics are counted when the write commits; Since dates what they time (a placement
	// from the spec first seen, a migration from its start).
	Metrics []Metric
	Since   time.Time
}

// Cond holds when the key's ModRevision (or, with Create, its CreateRevision) is Rev; 0 means the
// key is absent.
type Cond struct {
	Key    string
	Rev    int64
	Create bool
}

// ModRev is the condition "the key is as read at modRev" (0: absent).
func ModRev(key string, modRev int64) Cond { return Cond{Key: key, Rev: modRev} }

// CreateRev is the condition "the key is the incarnation created at rev" (0: absent).
func CreateRev(key string, rev int64) Cond { return Cond{Key: key, Rev: rev, Create: true} }

// Write puts Value at Key, or deletes Key.
type Write struct {
	Key    string
	Value  string
	Delete bool
}

// Put writes the encoding of v at key.
func Put(key, value string) Write { return Write{Key: key, Value: value} }

// Del deletes key.
func Del(key string) Write { return Write{Key: key, Delete: true} }

// Level of a note's log line.
type Level int

const (
	Info Level = iota
	Warn
	Error
)

// Note is what an action says when it commits: a log line (Log, with key/value Args) and, when
// Event is set, an audit event of Object.
type Note struct {
	Level   Level
	Log     string
	Args    []any
	Object  string
	Event   string // the event's action, "" for none
	Message string
}

// Metric names a counter the applier counts when an action commits.
type Metric int

const (
	MetricPlacement Metric = iota + 1 // a first placement (timed from Action.Since)
	MetricMove                        // a VM moved off a fenced node
	MetricNodeLost                    // a fence record committed
	MetricMigrationStarted
	MetricMigrationDone // timed from Action.Since
	MetricMigrationFailed
)

// WorkKind is what side work does.
type WorkKind int

const (
	// Fence runs the fencer for a fence record (once per record revision) and records the outcome.
	Fence WorkKind = iota + 1
	// Unfence undoes a fence (blocklist entries) and deletes its record.
	Unfence
	// Renew renews a standing fence that is due.
	Renew
	// EnsureVolume creates, clones or grows a VM's disk and records it.
	EnsureVolume
	// PurgeVolume deletes a disk an operator asked to purge and consumes the request.
	PurgeVolume
	// AdoptVolumes records disks found in storage that no record names.
	AdoptVolumes
	// ImportImage fetches, converts and stores a VM image, recording its progress.
	ImportImage
	// DeleteImage removes a deleted image from storage, then its status.
	DeleteImage
)

// Work is one piece of side work: it runs outside the round (it waits on fencers and storage),
// then writes its outcome under the leader's guard.
type Work struct {
	Kind WorkKind
	// Key identifies the work: one at a time per key, and for Fence, once per Rev.
	Key string
	Rev int64
	// Fence is the record as read (Fence, Unfence, Renew); Target what the fencer needs.
	Fence  *keys.Fence
	Target fence.Target
	// Volume is the disk (EnsureVolume, PurgeVolume); Request the purge request it consumes.
	Volume     volume.Volume
	Request    string
	RequestRev int64
	// Image is the VM image (ImportImage, DeleteImage), ImageSpec its record as read, ImageUID
	// the uid (the record's CreateRevision) it is stored under.
	Image     string
	ImageSpec *keys.VMImage
	ImageUID  int64
}

// Count is how many actions count metric m.
func (p *Plan) Count(m Metric) int {
	n := 0
	for _, a := range p.Actions {
		for _, am := range a.Metrics {
			if am == m {
				n++
			}
		}
	}
	return n
}

// Touched is what actions decided about: the VMs they act on and the nodes whose capacity they
// take or change (the nodes of the assignments they write).
type Touched struct {
	VMs   map[string]bool
	Nodes map[string]bool
	// Addresses are the address claims they wrote (keys): a plan decided before allocated from
	// a book without them.
	Addresses map[string]bool
}

// Add notes what acts touch.
func (t *Touched) Add(space keys.Space, acts []Action) {
	if t.VMs == nil {
		t.VMs, t.Nodes, t.Addresses = map[string]bool{}, map[string]bool{}, map[string]bool{}
	}
	for _, a := range acts {
		a.touches(space, func(vm string) { t.VMs[vm] = true }, func(hwid string) { t.Nodes[hwid] = true },
			func(key string) { t.Addresses[key] = true })
	}
}

// touches calls vm with the VM the action acts on, if any, node with the node of every
// assignment it writes, and addr with every address claim it writes.
func (a Action) touches(space keys.Space, vm, node, addr func(string)) {
	if name, ok := strings.CutPrefix(a.Object, "vm/"); ok {
		vm(name)
	}
	for _, w := range a.Writes {
		if hwid, _, ok := keys.ParseNodeScoped(space.AssignRoot(), w.Key); ok {
			node(hwid)
		} else if strings.HasPrefix(w.Key, space.AddressRoot()) {
			addr(w.Key)
		}
	}
}

// Rebase drops what a plan decided from a snapshot that rounds committed after have since
// overtaken (a full round decides while quick rounds go on placing): every action on a VM they
// acted on (its conditions would fail anyway), and every action writing an assignment on a node
// whose capacity they took or changed (the plan counted that node's room without them; nothing
// guards capacity but the leader's own accounting), and every action claiming an address they
// wrote (its condition would fail). It returns the VMs whose actions it dropped,
// for the next round to decide again.
func (p *Plan) Rebase(space keys.Space, since Touched) (dropped []string) {
	if len(since.VMs) == 0 && len(since.Nodes) == 0 && len(since.Addresses) == 0 {
		return nil
	}
	kept := p.Actions[:0:0]
	for _, a := range p.Actions {
		var vm string
		overtaken := false
		a.touches(space,
			func(name string) { vm, overtaken = name, overtaken || since.VMs[name] },
			func(hwid string) { overtaken = overtaken || since.Nodes[hwid] },
			func(key string) { overtaken = overtaken || since.Addresses[key] })
		switch {
		case !overtaken:
			kept = append(kept, a)
		case vm != "":
			dropped = append(dropped, vm)
		}
	}
	p.Actions = kept
	sort.Strings(dropped)
	return dropped
}
