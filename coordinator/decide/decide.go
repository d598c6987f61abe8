package decide

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/herdhq/herd/coordinator/scheduler"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/units"
)

// Decide is one round: it compares every VM's spec with its placement and problem, makes the
// records agree with where VMs run, handles lost nodes, schedules what is unplaced or must move,
// moves migrations and the rollout along, and returns the writes and side work that follow. It
// updates st (the term's memory) as it goes.
func Decide(snap *Snapshot, st *State, cfg Config) Plan {
	if snap.Focus != nil {
		return decideQuick(snap, st, cfg)
	}
	var plan Plan
	s := &view{Snapshot: snap, cfg: &cfg, st: st, plan: &plan}
	s.trust()
	if racts, stop := s.recovery(); stop {
		plan.Actions = racts
		return plan
	}
	acts := s.bookkeeping()
	if snap.Cluster == nil {
		// etcd was replaced by an empty one: this is a new cluster, with a new id, which tells
		// every agent that the keyspace says nothing about the domains it runs.
		acts = append(acts, s.newClusterRecord())
	}

	// Nodes with anything of a VM: its placement, or any assignment (strays and migration targets
	// included). A node that is lost with any of them is fenced before they are given up.
	placedOn := map[string][]string{}
	for name, v := range snap.VMs {
		node := ""
		if v.Placement.OK() {
			node = v.Placement.Value.Node
			placedOn[node] = append(placedOn[node], name)
		}
		for hwid := range snap.Assigns[name] {
			if hwid != node {
				placedOn[hwid] = append(placedOn[hwid], name)
			}
		}
	}
	for name, byNode := range snap.Assigns {
		if _, known := snap.VMs[name]; !known {
			for hwid := range byNode {
				placedOn[hwid] = append(placedOn[hwid], name)
			}
		}
	}
	fo, fates := s.failover(placedOn)
	acts = append(acts, fo...)
	acts = append(acts, s.handleRequests()...)
	t := newTally(fates)

	// Assignments of VMs with neither spec nor placement record (deleted while their placement was
	// gone): nodes remove the domains on the evidence that the spec is gone.
	for name, byNode := range snap.Assigns {
		if _, known := snap.VMs[name]; known {
			continue
		}
		for hwid, r := range byNode {
			acts = append(acts, dropAssignment(name, hwid, r, "the VM was deleted"))
		}
	}
	for _, name := range sortedNames(snap.VMs) {
		s.decideVM(t, name, snap.VMs[name])
	}
	sched := s.schedule(t)
	for _, m := range t.open {
		if a, ok := s.settle(m, fates); ok {
			t.acts = append(t.acts, a)
		}
	}
	t.acts = append(t.acts, s.startMigrations(t.wants, t.placed, t.busy)...)
	t.acts = append(t.acts, s.drainBookkeeping(placedOn, t.busy)...)
	t.acts = append(t.acts, s.rolloutRound(t.placed)...)
	t.acts = append(t.acts, s.addressBookkeeping()...)
	s.purgeVolumes()
	s.adoptVolumes()
	s.images()
	s.problems(t, sched)
	plan.Pending = len(sched.Failures)
	plan.Actions = append(plan.Actions, acts...)
	plan.Actions = append(plan.Actions, t.acts...)
	return plan
}

// tally is what a round gathers VM by VM before it schedules.
type tally struct {
	acts    []Action
	pending []scheduler.VM // to place, or to move off a fenced node
	placed  []scheduler.VM // using capacity
	specs   map[string]*keys.VMSpec
	moving  map[string]*keys.Placement // pending VMs that leave a fenced node
	open    []openMigration
	wants   []wantMove
	busy    map[string]int // open migrations per node
	fates   map[string]nodeFate
	nics    map[string]nicClaims // pending VMs' addresses, claimed with their placement
}

func newTally(fates map[string]nodeFate) *tally {
	return &tally{specs: map[string]*keys.VMSpec{}, moving: map[string]*keys.Placement{}, busy: map[string]int{}, fates: fates,
		nics: map[string]nicClaims{}}
}

// decideVM compares one VM's spec with its placement and problem: it reconciles the records with
// where the VM runs, accounts the capacity it holds, and files it as pending, moving or wanting a
// migration.
func (s *view) decideVM(t *tally, name string, v *VM) {
	if v.Placement.OK() && v.Placement.Value.Orphan {
		// Kept after a restore lost its spec, until an operator forgets it or a spec adopts
		// it; any other spec of the name waits.
		if v.Spec != nil {
			t.acts = append(t.acts, s.adoptOrphan(name, v)...)
		}
		return
	}
	if v.Spec == nil {
		t.acts = append(t.acts, s.unplace(name, v, "the VM was deleted")...)
		return
	}
	uid := keys.SpecUID(v.Spec)
	if v.Spec.OK() && v.Spec.Value.AdoptUID > 0 && (!v.Placement.OK() || v.Placement.Value.UID != uid) {
		// Adoption is of an orphan that runs: a spec claiming a uid no placement of the name
		// carries would take over a deleted VM's disks, or another incarnation's.
		if a, ok := s.setProblem(name, uid, v.Problem, keys.ProblemInvalid,
			fmt.Sprintf("adopt_uid %d: no orphan or adopted VM of this name has that uid (herdctl vm orphans); remove adopt_uid to create a new VM", uid), nil); ok {
			t.acts = append(t.acts, a)
		}
		return
	}
	if p := v.Problem; v.Placement == nil && isProblem(p, keys.ProblemRestoreHold) && p.Value.UID == uid && p.Value.SpecRev == v.Spec.ModRevision {
		return // held after a restore until an operator writes the spec again
	}
	if v.Migrate != nil && v.Placement == nil {
		t.acts = append(t.acts, Action{Object: "vm/" + name, What: "drop migrate request of an unplaced VM",
			Conds: []Cond{ModRev(v.Migrate.Key, v.Migrate.ModRevision)}, Writes: []Write{Del(v.Migrate.Key)}})
	}
	var pl *keys.Placement
	if v.Placement != nil {
		if v.Placement.Err != nil {
			s.log(Error, "unreadable placement; leaving the VM alone", "vm", name, "error", v.Placement.Err)
			return
		}
		pl = v.Placement.Value
		if pl.UID != uid {
			// The placement belongs to an earlier VM of the same name; clear it first.
			t.acts = append(t.acts, s.unplace(name, v, "the VM was re-created")...)
			return
		}
	}
	spec, invalid := checkSpec(name, v.Spec, s.pools())
	if invalid == nil {
		invalid = s.checkShrink(name, uid, spec)
	}
	if invalid != nil {
		spec = nil
	}
	auth, aacts := s.reconcileVM(name, v, uid, spec)
	t.acts = append(t.acts, aacts...)
	if r := auth.restored; r != nil {
		// Accounted where it is kept; everything else waits for the records to agree.
		t.placed = append(t.placed, scheduler.VM{Name: name, UID: uid, VCPUs: r.VCPUs, MemoryMiB: r.MemoryMiB, AntiAffinity: r.AntiAffinity, Node: r.Node})
		return
	}
	if pl == nil && auth.blocked != "" {
		if a, ok := s.setProblem(name, uid, v.Problem, keys.ProblemPending, "not placed anew: "+auth.blocked, nil); ok {
			t.acts = append(t.acts, a)
		}
		return
	}
	var fate nodeFate
	if pl != nil {
		fate = t.fates[pl.Node]
		reserved := scheduler.VM{Name: name, UID: uid, VCPUs: pl.VCPUs, MemoryMiB: pl.MemoryMiB, AntiAffinity: pl.AntiAffinity, Node: pl.Node}
		if !fate.move {
			t.placed = append(t.placed, reserved)
		}
		if mig := pl.Migration; mig != nil {
			// An open migration holds capacity on both nodes until it is settled.
			reserved.Node = mig.To
			t.placed = append(t.placed, reserved)
			t.busy[pl.Node]++
			t.busy[mig.To]++
			if invalid == nil {
				t.open = append(t.open, openMigration{name: name, v: v, spec: spec, pl: pl})
			} else if a, ok := s.setProblem(name, uid, v.Problem, keys.ProblemInvalid, invalid.Error()+"; a migration is open: fix the spec to finish it", nil); ok {
				t.acts = append(t.acts, a)
			}
			return
		}
	}
	switch {
	case invalid != nil:
		// A placed VM keeps running under the last valid spec its node was given.
		msg := invalid.Error()
		if fate.move {
			msg += "; its node is fenced: fix the spec to restart it elsewhere"
		}
		if a, ok := s.setProblem(name, uid, v.Problem, keys.ProblemInvalid, msg, nil); ok {
			t.acts = append(t.acts, a)
		}
	case pl != nil && fate.stranded != "":
		if a, ok := s.setProblem(name, uid, v.Problem, keys.ProblemNodeLost, fate.stranded, nil); ok {
			t.acts = append(t.acts, a)
		}
	case pl != nil && fate.move:
		t.specs[name], t.moving[name] = spec, pl
		t.pending = append(t.pending, onNICs(schedVM(name, uid, spec, ""), pl.NICs))
	case pl != nil && (v.Migrate != nil || s.draining(pl.Node)):
		reason, to := "drain", ""
		if v.Migrate != nil {
			reason = "operator"
			if v.Migrate.OK() {
				to = v.Migrate.Value.To
			}
		}
		t.wants = append(t.wants, wantMove{name: name, v: v, spec: spec, pl: pl, to: to, reason: reason})
	case pl != nil && pl.SpecRev != v.Spec.ModRevision:
		t.acts = append(t.acts, s.updateSpec(name, v, spec, pl)...)
	case pl != nil && s.crashLooping(pl, name) != "":
		if a, ok := s.setProblem(name, uid, v.Problem, keys.ProblemCrashLoop, s.crashLooping(pl, name), nil); ok {
			t.acts = append(t.acts, a)
		}
	case pl != nil && v.Problem != nil && !isProblem(v.Problem, keys.ProblemMigration):
		t.acts = append(t.acts, clearProblem(name, v.Problem))
	case pl == nil:
		// The disk comes first: a VM is placed only once its disk is there.
		if ready, problem := s.volumeReady(name, uid, spec); !ready {
			if problem != "" {
				if a, ok := s.setProblem(name, uid, v.Problem, keys.ProblemPending, problem, nil); ok {
					t.acts = append(t.acts, a)
				}
			}
			return
		}
		// So are its addresses: a VM that cannot have one takes no room.
		nics, problem := s.nicsFor(name, uid, spec, nil)
		if problem != "" {
			if a, ok := s.setProblem(name, uid, v.Problem, keys.ProblemPending, problem, nil); ok {
				t.acts = append(t.acts, a)
			}
			return
		}
		t.nics[name] = nics
		t.specs[name] = spec
		t.pending = append(t.pending, onNICs(schedVM(name, uid, spec, ""), nics.nics))
	}
	if pl != nil && spec != nil {
		s.volumeReady(name, uid, spec) // grows the disks of a placed VM, makes those added
	}
}

// schedule places the pending VMs (moves off fenced nodes rate-limited) and accounts them.
func (s *view) schedule(t *tally) scheduler.Plan {
	// First come, first served: the oldest VM is considered first.
	sort.Slice(t.pending, func(i, j int) bool { return t.pending[i].UID < t.pending[j].UID })
	sched := scheduler.Schedule(scheduler.Snapshot{Nodes: s.nodes, Placed: t.placed, Pending: t.pending}, s.cfg.Scheduler)
	budget, deferred := s.MoveBudget, 0
	for _, d := range sched.Placements {
		v := s.VMs[d.VM]
		if pl := t.moving[d.VM]; pl != nil {
			// Moves are rate-limited so that a large node's loss does not start every VM at once.
			if budget <= 0 {
				deferred++
				continue
			}
			budget--
			t.acts = append(t.acts, s.move(d.VM, v, t.specs[d.VM], pl, d.Node, t.fates[pl.Node]))
			continue
		}
		t.acts = append(t.acts, s.place(d.VM, v.Spec, t.specs[d.VM], d.Node, t.nics[d.VM]))
	}
	if deferred > 0 {
		s.after(time.Second)
	}
	for _, d := range sched.Placements {
		t.placed = append(t.placed, schedVM(d.VM, d.UID, t.specs[d.VM], d.Node))
	}
	return sched
}

// problems records why each VM the scheduler could not place fits nowhere.
func (s *view) problems(t *tally, sched scheduler.Plan) {
	for _, f := range sched.Failures {
		msg, kind := f.Message, keys.ProblemPending
		if pl := t.moving[f.VM]; pl != nil {
			msg, kind = fmt.Sprintf("node %s is fenced; no other node can take the VM: %s", pl.Node, f.Message), keys.ProblemNodeLost
		}
		if a, ok := s.setProblem(f.VM, f.UID, s.VMs[f.VM].Problem, kind, msg, f.Reasons); ok {
			t.acts = append(t.acts, a)
		}
	}
}

func sortedNames[T any](m map[string]T) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func (s *view) pools() []string {
	if s.Cluster.OK() {
		return s.Cluster.Value.Pools
	}
	return nil
}

// newClusterRecord creates /herd/cluster when it is missing.
func (s *view) newClusterRecord() Action {
	cl := keys.Cluster{ID: s.cfg.id(), Created: s.Now.UTC(), Pools: s.cfg.Pools, Schema: keys.SchemaVersion}
	return Action{Object: "cluster", What: "create cluster record",
		Conds:  []Cond{CreateRev(s.cfg.Space.Cluster(), 0)},
		Writes: []Write{Put(s.cfg.Space.Cluster(), keys.MustEncode(&cl))},
		Notes: []Note{{Level: Warn, Log: "the cluster record was missing (etcd replaced?): created a new cluster", Args: []any{"cluster", cl.ID},
			Object: "cluster/" + cl.ID, Event: "created", Message: fmt.Sprintf("the cluster record was missing; pools %v", cl.Pools)}}}
}

// Trusted is a round's judgement of the node keys (trust): the live registrations, the doubted
// ones and why, the capped ones, and the scheduler's view of the live. It depends on the nodes'
// records alone, so a full round hands it on (Plan.Trusted) to the quick rounds that decide from
// the same view of the nodes (Snapshot.Trusted): at 10,000 nodes, judging them again was most of a
// quick round. Never modified once made.
type Trusted struct {
	live   map[string]*rec[keys.Node]
	doubt  map[string]string
	capped map[string]string
	nodes  []scheduler.Node
	// draining is a node being drained that is not drained yet ("": none).
	draining string
}

// drainingNode is a node being drained that is not drained yet ("": none): whether it is drained
// follows its VMs, which only a full round counts.
func (s *view) drainingNode() string {
	for _, hwid := range sortedNames(s.States) {
		if r := s.States[hwid]; r.OK() && !r.Value.Drained && s.admin(hwid).Draining {
			return hwid
		}
	}
	return ""
}

// trust splits the node keys present into trusted registrations and doubted ones, and builds the
// scheduler's view of the live nodes: at most the capacity each may offer.
func (s *view) trust() {
	if t := s.Trusted; t != nil {
		s.live, s.doubt, s.capped, s.nodes = t.live, t.doubt, t.capped, t.nodes
		return
	}
	defer func() {
		s.plan.Trusted = &Trusted{live: s.live, doubt: s.doubt, capped: s.capped, nodes: s.nodes, draining: s.drainingNode()}
	}()
	s.live, s.doubt, s.capped = map[string]*rec[keys.Node]{}, map[string]string{}, map[string]string{}
	for _, hwid := range sortedNames(s.Nodes) {
		r := s.Nodes[hwid]
		if why := s.leaseDoubt(r); why != "" {
			s.doubt[hwid] = why
			continue
		}
		s.live[hwid] = r
		n := r.Value
		sn := scheduler.Node{HWID: hwid, CPUs: n.CPUs, MemoryMiB: n.MemoryMiB, ReservedMemoryMiB: n.ReservedMemoryMiB, BootDir: n.BootDir, Uplink: n.Uplink != "", Features: n.Features}
		if allowed := s.allowedCapacity(hwid); allowed != nil {
			var over []string
			if n.CPUs > allowed.CPUs {
				over = append(over, fmt.Sprintf("%d CPUs (allowed %d)", n.CPUs, allowed.CPUs))
				sn.CPUs = allowed.CPUs
			}
			if n.MemoryMiB > allowed.MemoryMiB {
				over = append(over, fmt.Sprintf("%s memory (allowed %s)", units.FormatMiB(n.MemoryMiB), units.FormatMiB(allowed.MemoryMiB)))
				sn.MemoryMiB = allowed.MemoryMiB
			}
			if len(over) > 0 {
				s.capped[hwid] = fmt.Sprintf("reports %s: capped; if the hardware really grew, approve it with 'herdctl hw set-capacity %s --from-node'", strings.Join(over, " and "), hwid)
			}
		}
		if hw := s.Hardware[hwid]; hw == nil {
			sn.Unschedulable = "not enrolled (no readable hardware record)"
		} else {
			sn.Labels = hw.Labels
		}
		if st := s.States[hwid]; st != nil && st.Err != nil {
			sn.Unschedulable = "unreadable node state: " + st.Err.Error()
		} else if sp := s.Specs[hwid]; sp != nil && sp.Err != nil {
			sn.Unschedulable = "unreadable node spec: " + sp.Err.Error()
		} else if a := s.admin(hwid); a.Cordoned {
			sn.Unschedulable = "cordoned"
		}
		if n.Problem != "" {
			sn.Unschedulable = "node problem: " + n.Problem
		}
		if s.fenceFor(hwid, n.BootID) != nil {
			sn.Unschedulable = "fenced: reboot it or run 'herdctl fence clear " + hwid + "'"
		} else if len(s.Fences[hwid]) > 0 {
			// The agent starts nothing while an earlier boot's record stands (a move made on it
			// would not fence this boot); placing here would only wait.
			sn.Unschedulable = "an earlier boot's fence is being undone"
		}
		s.nodes = append(s.nodes, sn)
	}
}

// leaseDoubt says why a node key is not trusted as a live registration ("" when it is): it must
// decode, hang on a lease, and that lease must have been granted for at most MaxNodeLeaseTTL. A
// lease etcd could not tell about counts as sane: not knowing is no reason to call a node dead.
func (s *view) leaseDoubt(r *rec[keys.Node]) string {
	switch {
	case r.Err != nil:
		return "its key is unreadable: " + r.Err.Error()
	case r.Lease == 0:
		return "its key was written without a lease"
	}
	if ttl, known := s.LeaseTTL[r.Lease]; known && ttl > MaxNodeLeaseTTL {
		return fmt.Sprintf("its lease was granted for %s, more than the %s a node may take", ttl, MaxNodeLeaseTTL)
	}
	return ""
}

// allowedCapacity is what a node may offer: the operator's expected capacity from the hardware
// record, else what the leader recorded at its first registration; nil before either exists.
func (s *view) allowedCapacity(hwid string) *keys.Capacity {
	if hw := s.Hardware[hwid]; hw != nil && (hw.CPUs > 0 || hw.MemoryMiB > 0) {
		c := keys.Capacity{CPUs: hw.CPUs, MemoryMiB: hw.MemoryMiB}
		if ns := s.lastSeen(hwid); ns != nil && ns.Capacity != nil {
			// Half an expectation leaves the other half to the first registration.
			if c.CPUs == 0 {
				c.CPUs = ns.Capacity.CPUs
			}
			if c.MemoryMiB == 0 {
				c.MemoryMiB = ns.Capacity.MemoryMiB
			}
		}
		if c.CPUs == 0 || c.MemoryMiB == 0 {
			return nil
		}
		return &c
	}
	if ns := s.lastSeen(hwid); ns != nil && ns.Capacity != nil {
		return ns.Capacity
	}
	return nil
}

// checkSpec decodes and validates a spec; a nil spec with an error means it cannot be used.
func checkSpec(name string, r *rec[keys.VMSpec], pools []string) (*keys.VMSpec, error) {
	if err := keys.ValidateName(name); err != nil {
		return nil, fmt.Errorf("vm name: %w", err)
	}
	if r.Err != nil {
		return nil, r.Err
	}
	if pools == nil {
		pools = []string{}
	}
	if err := r.Value.Validate(pools); err != nil {
		return nil, err
	}
	return r.Value, nil
}

// checkShrink refuses a spec whose disk is smaller than the disk that exists: shrinking would cut
// the guest's filesystem. The VM keeps running under its last valid spec.
func (s *view) checkShrink(name string, uid int64, spec *keys.VMSpec) error {
	if !s.cfg.ManagedDisks {
		return nil
	}
	var fe keys.FieldErrors
	for i, d := range spec.DiskList() {
		r := s.Volumes[d.Pool+"/"+keys.DiskImage(name, uid, d.Name)]
		if r.OK() && r.Value.SizeGiB > d.SizeGiB {
			fe = append(fe, keys.FieldError{Field: fmt.Sprintf("disks[%d].size_gib", i),
				Message: fmt.Sprintf("refusing to shrink disk %s from %d to %d GiB: the guest's filesystem would be cut", d.Name, r.Value.SizeGiB, d.SizeGiB)})
		}
	}
	if len(fe) > 0 {
		return fe
	}
	return nil
}

// onNICs notes what a VM's NICs need of a node.
func onNICs(vm scheduler.VM, nics []*keys.NIC) scheduler.VM {
	for _, n := range nics {
		vm.VLANs = vm.VLANs || (n != nil && n.VLAN > 0)
	}
	return vm
}

func schedVM(name string, uid int64, s *keys.VMSpec, node string) scheduler.VM {
	vm := scheduler.VM{Name: name, UID: uid, VCPUs: s.VCPUs, MemoryMiB: s.MemoryMiB, Selector: s.NodeSelector, AntiAffinity: s.AntiAffinity, Needs: s.Needs(), Node: node}
	if b := s.Boot; b != nil {
		vm.BootPaths = append(vm.BootPaths, b.Kernel)
		if b.Initrd != "" {
			vm.BootPaths = append(vm.BootPaths, b.Initrd)
		}
	}
	return vm
}

// adoptOrphan takes over an orphan kept after a restore (its placement is v's) when v's spec adopts
// its uid: placement and assignment on the orphan's node at a higher epoch, so that its node
// keeps the domain, now assigned, and applies the spec. Any other spec of the name gets a problem.
func (s *view) adoptOrphan(name string, v *VM) []Action {
	sp, pl := s.cfg.Space, v.Placement.Value
	specRec := v.Spec
	if !specRec.OK() || specRec.Value.AdoptUID != pl.UID {
		msg := fmt.Sprintf("an orphan of this name (uid %d) runs on %s since an etcd restore: take it over with 'herdctl vm adopt %s', or remove it with 'herdctl vm forget %s' first",
			pl.UID, pl.Node, name, name)
		if specRec.OK() && specRec.Value.AdoptUID > 0 {
			msg = fmt.Sprintf("adopt_uid %d is not the uid of the orphan of this name (%d on %s)", specRec.Value.AdoptUID, pl.UID, pl.Node)
		}
		if a, ok := s.setProblem(name, keys.SpecUID(specRec), v.Problem, keys.ProblemPending, msg, nil); ok {
			return []Action{a}
		}
		return nil
	}
	spec, invalid := checkSpec(name, specRec, s.pools())
	if invalid == nil && pl.UID >= specRec.CreateRevision {
		invalid = fmt.Errorf("adopt_uid %d is not older than the spec (uid %d): only an orphan's uid can be adopted", pl.UID, specRec.CreateRevision)
	}
	if invalid != nil {
		if a, ok := s.setProblem(name, pl.UID, v.Problem, keys.ProblemInvalid, invalid.Error(), nil); ok {
			return []Action{a}
		}
		return nil
	}
	np := keys.Placement{UID: pl.UID, Node: pl.Node, Epoch: pl.Epoch + 1, UUID: pl.UUID, Since: s.Now.UTC(), By: s.cfg.Name, Term: s.cfg.Term}
	s.setSpec(&np, specRec.ModRevision, spec)
	asg := assignmentFor(&np, spec)
	conds := []Cond{ModRev(sp.Placement(name), v.Placement.ModRevision), ModRev(sp.VMSpec(name), specRec.ModRevision), CreateRev(sp.Assign(pl.Node, name), 0)}
	writes := []Write{Put(sp.Placement(name), keys.MustEncode(&np)), Put(sp.Assign(pl.Node, name), keys.MustEncode(&asg))}
	if v.Problem != nil {
		conds = append(conds, ModRev(v.Problem.Key, v.Problem.ModRevision))
		writes = append(writes, Del(v.Problem.Key))
	}
	return []Action{{Object: "vm/" + name, What: "adopt orphan", Conds: conds, Writes: writes,
		Notes: []Note{{Level: Warn, Log: "orphan adopted: managed again where it runs", Args: []any{"vm", name, "node", pl.Node, "uid", pl.UID, "epoch", np.Epoch},
			Object: "vm/" + name, Event: "adopted", Message: fmt.Sprintf("orphan uid %d on %s adopted by its new spec: placed there at epoch %d", pl.UID, pl.Node, np.Epoch)}}}}
}

// place commits a first placement: placement and the node's assignment in one transaction, which
// holds only if the VM is still unplaced and its spec is the one scheduled.
func (s *view) place(name string, specRec *rec[keys.VMSpec], spec *keys.VMSpec, node string, nics nicClaims) Action {
	sp := s.cfg.Space
	pl := keys.Placement{UID: keys.SpecUID(specRec), Node: node, Epoch: 1, UUID: s.cfg.id(), Since: s.Now.UTC(), By: s.cfg.Name, Term: s.cfg.Term,
		NICs: nics.nics}
	s.setSpec(&pl, specRec.ModRevision, spec)
	asg := assignmentFor(&pl, spec)
	return Action{Object: "vm/" + name, What: "place",
		Conds: append([]Cond{ModRev(sp.Placement(name), 0), ModRev(sp.VMSpec(name), specRec.ModRevision), CreateRev(sp.Assign(node, name), 0)}, nics.conds...),
		Writes: append([]Write{Put(sp.Placement(name), keys.MustEncode(&pl)), Put(sp.Assign(node, name), keys.MustEncode(&asg)),
			Del(sp.Problem(name))}, nics.writes...),
		Notes:   []Note{event("vm/"+name, "placed", fmt.Sprintf("on %s (uid %d)", node, pl.UID))},
		Metrics: []Metric{MetricPlacement}, Since: s.FirstSeen[name]}
}

// setSpec records in a placement which spec its node is given and what that reserves.
func (s *view) setSpec(pl *keys.Placement, rev int64, spec *keys.VMSpec) {
	pl.SpecRev, pl.VCPUs, pl.MemoryMiB, pl.AntiAffinity = rev, spec.VCPUs, spec.MemoryMiB, spec.AntiAffinity
	// A VM's NICs keep their MACs for its life, like its UUID.
	for len(pl.MACs) < len(spec.Networks) {
		b, err := uuid.Parse(s.cfg.id())
		if err != nil {
			b = uuid.New()
		}
		// 52:54:00 is the prefix QEMU/KVM guests conventionally use.
		pl.MACs = append(pl.MACs, fmt.Sprintf("52:54:00:%02x:%02x:%02x", b[0], b[1], b[2]))
	}
}

func assignmentFor(pl *keys.Placement, spec *keys.VMSpec) keys.Assignment {
	return keys.Assignment{UID: pl.UID, Epoch: pl.Epoch, UUID: pl.UUID, SpecRev: pl.SpecRev, Spec: spec, MACs: pl.MACs, NICs: pl.NICs}
}

// updateSpec hands a changed spec to the node running the VM.
// A NIC added on a herd network gets its address here; one that left its network keeps its old
// claim until the next full round releases it.
func (s *view) updateSpec(name string, v *VM, spec *keys.VMSpec, pl *keys.Placement) []Action {
	sp := s.cfg.Space
	nics, problem := s.nicsFor(name, pl.UID, spec, pl.NICs)
	if problem != "" {
		if a, ok := s.setProblem(name, pl.UID, v.Problem, keys.ProblemInvalid, problem+"; the VM runs on under its last spec", nil); ok {
			return []Action{a}
		}
		return nil
	}
	npl := *pl
	s.setSpec(&npl, v.Spec.ModRevision, spec)
	npl.By, npl.Term, npl.NICs = s.cfg.Name, s.cfg.Term, nics.nics
	asg := assignmentFor(&npl, spec)
	return []Action{{Object: "vm/" + name, What: "update spec",
		Conds: append([]Cond{ModRev(sp.Placement(name), v.Placement.ModRevision), ModRev(sp.VMSpec(name), v.Spec.ModRevision)}, nics.conds...),
		Writes: append([]Write{Put(sp.Placement(name), keys.MustEncode(&npl)), Put(sp.Assign(pl.Node, name), keys.MustEncode(&asg)),
			Del(sp.Problem(name))}, nics.writes...)}}
}

// unplace removes what the leader recorded for a VM that is gone (or gone as this uid): its
// placement, every assignment of the name, its problem record. The nodes remove the domains on the
// evidence that the spec is gone or belongs to a newer uid.
func (s *view) unplace(name string, v *VM, why string) []Action {
	sp := s.cfg.Space
	var acts []Action
	switch {
	case v.Placement != nil && v.Placement.Err != nil:
		s.log(Error, "unreadable placement of a deleted VM; remove it by hand", "vm", name, "key", v.Placement.Key, "error", v.Placement.Err)
		return nil
	case v.Placement != nil:
		pl := v.Placement.Value
		conds, writes := s.releaseAddresses(name, pl)
		acts = append(acts, Action{Object: "vm/" + name, What: "unplace",
			Conds:  append([]Cond{ModRev(sp.Placement(name), v.Placement.ModRevision)}, conds...),
			Writes: append([]Write{Del(sp.Placement(name)), Del(sp.Problem(name))}, writes...),
			Notes:  []Note{event("vm/"+name, "unplaced", fmt.Sprintf("uid %d removed from %s: %s", pl.UID, pl.Node, why))}})
	case v.Problem != nil:
		acts = append(acts, clearProblem(name, v.Problem))
	}
	for _, hwid := range sortedNames(s.Assigns[name]) {
		r := s.Assigns[name][hwid]
		if v.Spec != nil && r.OK() && r.Value.UID == keys.SpecUID(v.Spec) {
			continue // the new incarnation's
		}
		acts = append(acts, dropAssignment(name, hwid, r, why))
	}
	return acts
}

// setProblem records why a VM is not where it should be, unless the same problem is recorded.
func (s *view) setProblem(name string, uid int64, cur *rec[keys.Problem], kind, msg string, reasons map[string]int) (Action, bool) {
	if cur.OK() {
		if p := cur.Value; p.UID == uid && p.Kind == kind && p.Message == msg {
			return Action{}, false
		}
	}
	p := keys.Problem{UID: uid, Kind: kind, Message: msg, Reasons: reasons, Since: s.Now.UTC()}
	// Recorded only while the spec is the incarnation judged (an adopting spec's uid is not its
	// CreateRevision).
	created := uid
	if v := s.VMs[name]; v != nil && v.Spec != nil {
		created = v.Spec.CreateRevision
	}
	return Action{Object: "vm/" + name, What: "record problem",
		Conds:  []Cond{CreateRev(s.cfg.Space.VMSpec(name), created)},
		Writes: []Write{Put(s.cfg.Space.Problem(name), keys.MustEncode(&p))},
		Notes: []Note{{Level: Info, Log: "vm problem", Args: []any{"vm", name, "kind", kind, "message", msg},
			Object: "vm/" + name, Event: "problem", Message: kind + ": " + msg}}}, true
}

// isProblem says whether a cached problem record is of kind.
func isProblem(r *rec[keys.Problem], kind string) bool { return r.OK() && r.Value.Kind == kind }

func clearProblem(name string, cur *rec[keys.Problem]) Action {
	return Action{Object: "vm/" + name, What: "clear problem",
		Conds: []Cond{ModRev(cur.Key, cur.ModRevision)}, Writes: []Write{Del(cur.Key)}}
}

// crashLooping returns what the placement's node reports of a guest that keeps crashing there ("":
// it does not).
func (s *view) crashLooping(pl *keys.Placement, name string) string {
	if st := s.status(pl.Node, name); st != nil && st.UID == pl.UID && st.State == keys.StateCrashLoop {
		return "on " + pl.Node + ": " + st.Message
	}
	return ""
}
