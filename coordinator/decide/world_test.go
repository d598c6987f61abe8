package decide

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/herdhq/herd/coordinator/scheduler"
	"github.com/herdhq/herd/lib/keys"
)

// world is a cluster for table tests of Decide: a key/value store with revisions and leases as
// etcd keeps them, turned into a Snapshot the way the coordinator's observe does, and plans applied
// to it with their conditions checked the way a guarded transaction checks them. Agents and
// fencers are whatever a test writes into it.
type world struct {
	t      testing.TB
	sp     keys.Space
	now    time.Time
	rev    int64
	kv     map[string]*stored
	leases map[int64]time.Duration // live leases and their granted TTL
	st     *State
	cfg    Config
	ids    int
	// vanished and left are what the coordinator's watch handlers would have remembered.
	vanished map[string]*keys.Placement
	left     map[string]string
	budget   int
	// images are what each node boots, as its key says.
	images map[string]string
	// last is the last plan decided.
	last Plan
	// restoreWant is the restore recovery the coordinator asks for (it saw etcd go back).
	restoreWant int
	// touched are the keys written or deleted since a test last cleared it (quick rounds).
	touched map[string]bool
}

type stored struct {
	val          string
	create, mod  int64
	lease        int64
	decodedCache any
}

func newWorld(t testing.TB) *world {
	t.Helper()
	sp, err := keys.NewSpace("/herd")
	if err != nil {
		t.Fatal(err)
	}
	w := &world{t: t, sp: sp, now: time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC), kv: map[string]*stored{},
		leases: map[int64]time.Duration{}, st: NewState(), vanished: map[string]*keys.Placement{}, left: map[string]string{}, budget: 100, images: map[string]string{},
		touched: map[string]bool{}}
	w.cfg = Config{Space: sp, Name: "c1", Term: 1, Pools: []string{"default", "ssd"},
		Scheduler: scheduler.Options{Strategy: scheduler.Spread, CPUOvercommit: 4},
		Grace:     5 * time.Second, MassFailureFraction: 0.5, MassFailureMin: 2, MassFailureWindow: 10 * time.Minute,
		FencerName: "test", MaxMigrationsPerNode: 2}
	w.cfg.NewID = func() string { w.ids++; return fmt.Sprintf("00000000-0000-4000-8000-%012d", w.ids) }
	w.put(sp.Cluster(), &keys.Cluster{ID: "test", Pools: []string{"default", "ssd"}, Schema: keys.SchemaVersion}, 0)
	return w
}

// put writes v (a keyspace type, or a raw string) at key.
func (w *world) put(key string, v any, lease int64) {
	w.rev++
	w.touched[key] = true
	val, ok := v.(string)
	if !ok {
		b, err := v.(json.Marshaler).MarshalJSON()
		if err != nil {
			w.t.Fatal(err)
		}
		val = string(b)
	}
	s := w.kv[key]
	if s == nil {
		s = &stored{create: w.rev}
		w.kv[key] = s
	}
	s.val, s.mod, s.lease, s.decodedCache = val, w.rev, lease, nil
}

func (w *world) del(key string) {
	if _, ok := w.kv[key]; ok {
		w.rev++
		w.touched[key] = true
		delete(w.kv, key)
	}
}

// has says whether key exists.
func (w *world) has(key string) bool { _, ok := w.kv[key]; return ok }

// get decodes the value at key (failing the test when absent).
func get[T any, P interface {
	*T
	keys.Decodable
}](w *world, key string) *T {
	w.t.Helper()
	s := w.kv[key]
	if s == nil {
		w.t.Fatalf("%s: absent", key)
	}
	v, err := keys.Decode[T, P]([]byte(s.val))
	if err != nil {
		w.t.Fatalf("%s: %v", key, err)
	}
	return v
}

// advance moves the clock.
func (w *world) advance(d time.Duration) { w.now = w.now.Add(d) }

// node enrols a machine and registers it as an agent would: hardware record, node key on a lease.
func (w *world) node(hwid string, cpus int, memGiB int64, labels ...string) {
	hw := &keys.Hardware{MAC: hwid, Labels: map[string]string{}}
	for _, l := range labels {
		k, v, _ := strings.Cut(l, "=")
		hw.Labels[k] = v
	}
	w.put(w.sp.Hardware(hwid), hw, 0)
	w.register(hwid, "boot-1", cpus, memGiB)
}

// register puts the node key of a boot on a fresh 10 s lease.
func (w *world) register(hwid, boot string, cpus int, memGiB int64) {
	lease := w.rev + 1000
	w.leases[lease] = 10 * time.Second
	w.put(w.sp.Node(hwid), &keys.Node{HWID: hwid, Lease: lease, BootID: boot, CPUs: cpus, MemoryMiB: memGiB * 1024, Image: w.images[hwid],
		MigrationURI: "qemu+tls://" + hwid + "/system", Features: keys.AgentFeatures,
		Addresses: keys.Addresses{Management: "10.0.0." + hwid[len(hwid)-1:], Migration: "10.1.0." + hwid[len(hwid)-1:]}}, lease)
}

// crash is a node's death: its lease expires, its key goes with it.
func (w *world) crash(hwid string) {
	s := w.kv[w.sp.Node(hwid)]
	if s == nil {
		w.t.Fatalf("crash %s: not registered", hwid)
	}
	delete(w.leases, s.lease)
	w.del(w.sp.Node(hwid))
}

// vm writes a VM's spec.
func (w *world) vm(name string, vcpus int, memMiB int64, opts ...func(*keys.VMSpec)) {
	spec := &keys.VMSpec{VCPUs: vcpus, MemoryMiB: memMiB}
	for _, o := range opts {
		o(spec)
	}
	w.put(w.sp.VMSpec(name), spec, 0)
}

func (w *world) uid(name string) int64 { return w.kv[w.sp.VMSpec(name)].create }

// report writes a node's status report of a VM as its agent would, from its assignment.
func (w *world) report(hwid, name, state string, opts ...func(*keys.VMStatus)) {
	st := &keys.VMStatus{UID: w.uid(name), State: state, Since: w.now}
	if a := w.kv[w.sp.Assign(hwid, name)]; a != nil {
		as := get[keys.Assignment](w, w.sp.Assign(hwid, name))
		st.Epoch, st.UUID = as.Epoch, as.UUID
	}
	for _, o := range opts {
		o(st)
	}
	w.put(w.sp.Status(hwid, name), st, 0)
}

// snapshot is what the coordinator's observe builds from its caches.
func (w *world) snapshot() *Snapshot {
	sp := w.sp
	s := &Snapshot{Now: w.now, VMs: map[string]*VM{}, Assigns: map[string]map[string]*rec[keys.Assignment]{},
		Reports: map[string]map[string]*rec[keys.VMStatus]{}, Nodes: map[string]*rec[keys.Node]{},
		LeaseTTL: map[int64]time.Duration{}, LeaseAlive: map[int64]bool{}, States: map[string]*rec[keys.NodeState]{},
		Specs: map[string]*rec[keys.NodeSpec]{}, Hardware: map[string]*keys.Hardware{}, Fences: map[string][]*rec[keys.Fence]{},
		Volumes: map[string]*rec[keys.VolumeRecord]{}, Requests: map[string]*rec[keys.Request]{}, NodeCmds: map[string]*rec[keys.NodeCommand]{},
		Vanished: w.vanished, Left: w.left, FirstSeen: map[string]time.Time{}, MoveBudget: w.budget,
		RestoreWant: w.restoreWant}
	vm := func(name string) *VM {
		if s.VMs[name] == nil {
			s.VMs[name] = &VM{}
		}
		return s.VMs[name]
	}
	ks := make([]string, 0, len(w.kv))
	for k := range w.kv {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	for _, k := range ks {
		st := w.kv[k]
		switch {
		case k == sp.Cluster():
			s.Cluster = record[keys.Cluster](k, st)
		case k == sp.LossGuard():
			s.Guard = record[keys.LossGuard](k, st)
		case k == sp.Rollout():
			s.Rollout = record[keys.Rollout](k, st)
		case k == sp.RolloutStatus():
			s.Progress = record[keys.RolloutStatus](k, st)
		case strings.HasPrefix(k, sp.HardwarePrefix()):
			if r := record[keys.Hardware](k, st); r.OK() {
				s.Hardware[strings.TrimPrefix(k, sp.HardwarePrefix())] = r.Value
			}
		case strings.HasPrefix(k, sp.NodePrefix()):
			s.Nodes[strings.TrimPrefix(k, sp.NodePrefix())] = record[keys.Node](k, st)
			if ttl, ok := w.leases[st.lease]; ok {
				s.LeaseTTL[st.lease] = ttl
			}
		case strings.HasPrefix(k, sp.NodeStatePrefix()):
			r := record[keys.NodeState](k, st)
			s.States[strings.TrimPrefix(k, sp.NodeStatePrefix())] = r
			if r.OK() && r.Value.Lease != 0 {
				_, alive := w.leases[r.Value.Lease]
				s.LeaseAlive[r.Value.Lease] = alive
			}
		case strings.HasPrefix(k, sp.NodeSpecPrefix()):
			s.Specs[strings.TrimPrefix(k, sp.NodeSpecPrefix())] = record[keys.NodeSpec](k, st)
		case strings.HasPrefix(k, sp.VMPrefix()):
			name, part, _ := sp.ParseVM(k)
			if part == keys.VMPartSpec {
				vm(name).Spec = record[keys.VMSpec](k, st)
				s.FirstSeen[name] = w.now
			} else {
				vm(name).Migrate = record[keys.MigrateRequest](k, st)
			}
		case strings.HasPrefix(k, sp.PlacementPrefix()):
			vm(strings.TrimPrefix(k, sp.PlacementPrefix())).Placement = record[keys.Placement](k, st)
		case strings.HasPrefix(k, sp.ProblemPrefix()):
			vm(strings.TrimPrefix(k, sp.ProblemPrefix())).Problem = record[keys.Problem](k, st)
		case strings.HasPrefix(k, sp.AssignRoot()):
			hwid, name, _ := keys.ParseNodeScoped(sp.AssignRoot(), k)
			if s.Assigns[name] == nil {
				s.Assigns[name] = map[string]*rec[keys.Assignment]{}
			}
			r := &rec[keys.Assignment]{Key: k, Raw: []byte(st.val), CreateRevision: st.create, ModRevision: st.mod}
			r.Value, r.Err = keys.DecodeAssignmentHead([]byte(st.val))
			s.Assigns[name][hwid] = r
		case strings.HasPrefix(k, sp.StatusRoot()):
			hwid, name, _ := keys.ParseNodeScoped(sp.StatusRoot(), k)
			if s.Reports[name] == nil {
				s.Reports[name] = map[string]*rec[keys.VMStatus]{}
			}
			s.Reports[name][hwid] = record[keys.VMStatus](k, st)
		case strings.HasPrefix(k, sp.FenceRoot()):
			hwid, _, _ := keys.ParseNodeScoped(sp.FenceRoot(), k)
			s.Fences[hwid] = append(s.Fences[hwid], record[keys.Fence](k, st))
		case strings.HasPrefix(k, sp.VolumeRoot()):
			pool, image, _ := keys.ParseNodeScoped(sp.VolumeRoot(), k)
			s.Volumes[pool+"/"+image] = record[keys.VolumeRecord](k, st)
		case strings.HasPrefix(k, sp.RequestPrefix()):
			s.Requests[k] = record[keys.Request](k, st)
		case strings.HasPrefix(k, sp.NodeCmdRoot()):
			s.NodeCmds[k] = record[keys.NodeCommand](k, st)
		}
	}
	// The placements and problems of VMs deleted since: the caches keep what the keys say.
	for name, v := range s.VMs {
		if v.Spec == nil && v.Placement == nil && v.Problem == nil && v.Migrate == nil {
			delete(s.VMs, name)
		}
	}
	return s
}

func record[T any, P interface {
	*T
	keys.Decodable
}](k string, st *stored) *rec[T] {
	r := &rec[T]{Key: k, Raw: []byte(st.val), CreateRevision: st.create, ModRevision: st.mod, Lease: st.lease, Size: len(st.val)}
	r.Value, r.Err = keys.Decode[T, P]([]byte(st.val))
	return r
}

// decide runs one round.
func (w *world) decide() Plan {
	w.last = Decide(w.snapshot(), w.st, w.cfg)
	return w.last
}

// apply commits a plan as the applier does: each action on its own, only if its conditions hold.
// It returns the actions that committed, as "what object".
func (w *world) apply(p Plan) []string {
	var done []string
	for _, a := range p.Actions {
		if !w.holds(a.Conds) {
			continue
		}
		for _, wr := range a.Writes {
			if wr.Delete {
				w.del(wr.Key)
			} else {
				w.put(wr.Key, wr.Value, 0)
			}
		}
		done = append(done, a.What+" "+a.Object)
	}
	return done
}

func (w *world) holds(conds []Cond) bool {
	for _, c := range conds {
		s := w.kv[c.Key]
		var rev int64
		if s != nil {
			rev = s.mod
			if c.Create {
				rev = s.create
			}
		}
		if rev != c.Rev {
			return false
		}
	}
	return true
}

// round decides and applies once, returning what committed.
func (w *world) round() []string { return w.apply(w.decide()) }

// settle runs rounds until nothing more is decided (the system is level: it must get there).
func (w *world) settle() {
	w.t.Helper()
	for i := 0; i < 20; i++ {
		if len(w.round()) == 0 {
			return
		}
	}
	w.t.Fatalf("no fixed point after 20 rounds; last plan: %v", actions(w.last))
}

// actions lists a plan's actions as "what object", sorted.
func actions(p Plan) []string {
	out := make([]string, 0, len(p.Actions))
	for _, a := range p.Actions {
		out = append(out, a.What+" "+a.Object)
	}
	sort.Strings(out)
	return out
}

// works lists a plan's side work as "kind key".
func works(p Plan) []string {
	names := map[WorkKind]string{Fence: "fence", Unfence: "unfence", Renew: "renew", EnsureVolume: "ensure-volume", PurgeVolume: "purge-volume", AdoptVolumes: "adopt-volumes"}
	out := make([]string, 0, len(p.Work))
	for _, wk := range p.Work {
		out = append(out, names[wk.Kind]+" "+wk.Key)
	}
	sort.Strings(out)
	return out
}

// placedOn is the node a VM's placement names ("" when unplaced).
func (w *world) placedOn(name string) string {
	if !w.has(w.sp.Placement(name)) {
		return ""
	}
	return get[keys.Placement](w, w.sp.Placement(name)).Node
}

// runnable lists the nodes holding a runnable assignment of a VM: never more than one.
func (w *world) runnable(name string) []string {
	var out []string
	for k, s := range w.kv {
		if hwid, n, ok := keys.ParseNodeScoped(w.sp.AssignRoot(), k); ok && n == name {
			a, err := keys.DecodeAssignmentHead([]byte(s.val))
			if err == nil && runnable(a) {
				out = append(out, hwid)
			}
		}
	}
	sort.Strings(out)
	return out
}

// problem is a VM's problem record ("" when none): "kind: message".
func (w *world) problem(name string) string {
	if !w.has(w.sp.Problem(name)) {
		return ""
	}
	p := get[keys.Problem](w, w.sp.Problem(name))
	return p.Kind + ": " + p.Message
}

// fence writes a fence record of a node's boot as a fencer's outcome would.
func (w *world) fenceOutcome(hwid, boot, phase string) {
	k := w.sp.Fence(hwid, boot)
	f := get[keys.Fence](w, k)
	f.Phase, f.Updated = phase, w.now
	f.Attempts++
	if phase == keys.FenceFailed {
		f.Error = "bmc unreachable"
	}
	w.put(k, f, 0)
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// has1 checks that a list has an entry starting with prefix.
func hasPrefix(list []string, prefix string) bool {
	for _, x := range list {
		if strings.HasPrefix(x, prefix) {
			return true
		}
	}
	return false
}
