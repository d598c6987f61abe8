package ctl

import (
	"context"
	"fmt"
	"sort"
	"time"

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/keys"
)

// vmView is everything herdctl shows about one VM; it is also the -o json/yaml document.
type vmView struct {
	Name      string          `json:"name"`
	UID       int64           `json:"uid,omitempty"`
	Spec      *keys.VMSpec    `json:"spec,omitempty"`
	SpecError string          `json:"spec_error,omitempty"`
	Placement *keys.Placement `json:"placement,omitempty"`
	Status    *keys.VMStatus  `json:"status,omitempty"`
	Problem   *keys.Problem   `json:"problem,omitempty"`
	// State is herdctl's one-word summary (not stored anywhere).
	State string `json:"state"`
	// NodeAlive says whether the placement's node is registered now.
	NodeAlive bool `json:"node_alive"`
}

// clusterView is one consistent read of what vm and node listings show.
type clusterView struct {
	rev      int64
	vms      map[string]*vmView
	nodes    map[string]*keys.Node
	nodeErrs map[string]error
	states   map[string]*keys.NodeState
	specs    map[string]*keys.NodeSpec
	hardware map[string]*keys.Hardware
	statuses map[string]map[string]*keys.VMStatus // hwid -> vm -> status
	fences   map[string][]*keys.Fence             // hwid -> fence records
	guard    *keys.LossGuard
}

func sortStrings(s []string) { sort.Strings(s) }

// admin is a node's administrative state: the operator's spec and the leader's rollout combined.
func (v *clusterView) admin(hwid string) keys.NodeAdmin {
	return keys.AdminOf(v.specs[hwid], v.states[hwid])
}

// readCluster reads VMs, nodes, node states, hardware and statuses at one revision (a transaction,
// then pages at its revision), so every table herdctl prints is one revision of the cluster.
// readView starts a read-only listing: the -o flag checked, a connection, and the cluster read
// once under --timeout.
func (e *env) readView(cmd *cobra.Command, o *outputFlag) (*clusterView, error) {
	ctx, cancel, err := e.startRead(cmd, o)
	if err != nil {
		return nil, err
	}
	defer cancel()
	return e.readCluster(ctx)
}

// startRead starts a read command: the -o flag checked, a connection, and the command's context.
func (e *env) startRead(cmd *cobra.Command, o *outputFlag) (context.Context, context.CancelFunc, error) {
	if err := o.validate(); err != nil {
		return nil, nil, err
	}
	if err := e.connect(); err != nil {
		return nil, nil, err
	}
	ctx, cancel := e.ctx(cmd.Context())
	return ctx, cancel, nil
}

// readPage is how many keys one range of a cluster read returns; the rest follows in pages at the
// same revision: a read of 100,000 VMs is neither one giant response for etcd to build in memory
// nor a mix of revisions.
var readPage int64 = 5000

func (e *env) readCluster(ctx context.Context) (*clusterView, error) {
	s := e.space
	prefixes := []string{s.VMPrefix(), s.NodePrefix(), s.NodeStatePrefix(), s.HardwarePrefix(), s.StatusRoot(),
		s.FenceRoot(), s.LossGuard(), s.PlacementPrefix(), s.ProblemPrefix(), s.NodeSpecPrefix()}
	ops := make([]clientv3.Op, len(prefixes))
	for i, p := range prefixes {
		if p == s.LossGuard() {
			ops[i] = clientv3.OpGet(p)
		} else {
			ops[i] = clientv3.OpGet(p, clientv3.WithPrefix(), clientv3.WithLimit(readPage))
		}
	}
	first, err := e.client.Txn(ctx).Then(ops...).Commit()
	if err != nil {
		return nil, err
	}
	resp := make([][]*mvccpb.KeyValue, len(prefixes))
	for i, p := range prefixes {
		r := first.Responses[i].GetResponseRange()
		resp[i] = r.Kvs
		for more := r.More; more && len(resp[i]) > 0; {
			from := string(resp[i][len(resp[i])-1].Key) + "\x00"
			page, err := e.client.Get(ctx, from, clientv3.WithRange(clientv3.GetPrefixRangeEnd(p)),
				clientv3.WithRev(first.Header.Revision), clientv3.WithLimit(readPage))
			if err != nil {
				return nil, fmt.Errorf("read %s at revision %d: %w", p, first.Header.Revision, err)
			}
			resp[i] = append(resp[i], page.Kvs...)
			more = page.More
		}
	}
	v := &clusterView{
		rev:      first.Header.Revision,
		vms:      map[string]*vmView{},
		nodes:    map[string]*keys.Node{},
		nodeErrs: map[string]error{},
		states:   map[string]*keys.NodeState{},
		specs:    map[string]*keys.NodeSpec{},
		hardware: map[string]*keys.Hardware{},
		statuses: map[string]map[string]*keys.VMStatus{},
		fences:   map[string][]*keys.Fence{},
	}
	for _, kv := range resp[5] {
		if f, err := keys.Decode[keys.Fence](kv.Value); err == nil {
			v.fences[f.HWID] = append(v.fences[f.HWID], f)
		}
	}
	if kvs := resp[6]; len(kvs) > 0 {
		v.guard, _ = keys.Decode[keys.LossGuard](kvs[0].Value)
	}
	vmOf := func(name string) *vmView {
		vm := v.vms[name]
		if vm == nil {
			vm = &vmView{Name: name}
			v.vms[name] = vm
		}
		return vm
	}
	for _, kv := range resp[0] {
		name, part, ok := s.ParseVM(string(kv.Key))
		if !ok || part != keys.VMPartSpec {
			continue
		}
		vm := vmOf(name)
		vm.UID = kv.CreateRevision
		spec, err := keys.Decode[keys.VMSpec](kv.Value)
		if err != nil {
			vm.SpecError = err.Error()
		} else {
			vm.Spec = spec
		}
	}
	for _, kv := range resp[7] {
		if name, ok := keys.ParseVMName(s.PlacementPrefix(), string(kv.Key)); ok {
			vmOf(name).Placement, _ = keys.Decode[keys.Placement](kv.Value)
		}
	}
	for _, kv := range resp[8] {
		if name, ok := keys.ParseVMName(s.ProblemPrefix(), string(kv.Key)); ok {
			vmOf(name).Problem, _ = keys.Decode[keys.Problem](kv.Value)
		}
	}
	for _, kv := range resp[9] {
		if hwid, ok := keys.ParseLeaf(s.NodeSpecPrefix(), string(kv.Key)); ok {
			if ns, err := keys.Decode[keys.NodeSpec](kv.Value); err == nil {
				v.specs[hwid] = ns
			}
		}
	}
	for _, kv := range resp[1] {
		if hwid, ok := keys.ParseLeaf(s.NodePrefix(), string(kv.Key)); ok {
			n, err := keys.Decode[keys.Node](kv.Value)
			if err != nil {
				v.nodeErrs[hwid] = err
				n = &keys.Node{HWID: hwid}
			}
			v.nodes[hwid] = n
		}
	}
	for _, kv := range resp[2] {
		if hwid, ok := keys.ParseLeaf(s.NodeStatePrefix(), string(kv.Key)); ok {
			if ns, err := keys.Decode[keys.NodeState](kv.Value); err == nil {
				v.states[hwid] = ns
			}
		}
	}
	for _, kv := range resp[3] {
		if hwid, ok := keys.ParseLeaf(s.HardwarePrefix(), string(kv.Key)); ok {
			if hw, err := keys.Decode[keys.Hardware](kv.Value); err == nil {
				v.hardware[hwid] = hw
			}
		}
	}
	for _, kv := range resp[4] {
		hwid, name, ok := keys.ParseNodeScoped(s.StatusRoot(), string(kv.Key))
		if !ok {
			continue
		}
		st, err := keys.Decode[keys.VMStatus](kv.Value)
		if err != nil {
			continue
		}
		if v.statuses[hwid] == nil {
			v.statuses[hwid] = map[string]*keys.VMStatus{}
		}
		v.statuses[hwid][name] = st
	}
	for _, vm := range v.vms {
		v.summarize(vm)
	}
	return v, nil
}

// summarize fills State, Status and NodeAlive from the raw keys.
func (v *clusterView) summarize(vm *vmView) {
	switch {
	case vm.UID == 0:
		vm.State = "deleting"
	case vm.SpecError != "":
		vm.State = "invalid"
	case vm.Problem != nil && vm.Problem.UID == vm.UID && vm.Problem.Kind == keys.ProblemInvalid:
		vm.State = "invalid"
	case vm.Placement == nil || vm.Placement.UID != vm.UID:
		vm.State = "pending"
	default:
		pl := vm.Placement
		_, vm.NodeAlive = v.nodes[pl.Node]
		if st := v.statuses[pl.Node][vm.Name]; st != nil && st.UID == pl.UID && st.Epoch == pl.Epoch {
			vm.Status = st
			vm.State = st.State
		} else {
			vm.State = "scheduled"
		}
		if !vm.NodeAlive {
			vm.State = "unknown"
		}
	}
	if vm.Spec != nil && vm.State == keys.StateRunning && !vm.Spec.WantsRunning() {
		vm.State = keys.StateStopping
	}
	if vm.Placement != nil && vm.Placement.Migration != nil && vm.Placement.UID == vm.UID {
		vm.State = keys.StateMigrating
	}
}

// sortedVMs returns the VMs by name.
func (v *clusterView) sortedVMs() []*vmView {
	out := make([]*vmView, 0, len(v.vms))
	for _, vm := range v.vms {
		out = append(out, vm)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// vmAge is how long the VM has been placed.
func vmAge(vm *vmView) time.Time {
	if vm.Placement != nil {
		return vm.Placement.Since
	}
	if vm.Problem != nil {
		return vm.Problem.Since
	}
	return time.Time{}
}
