package ctl

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/api/v3/etcdserverpb"
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

// readNodeView is readView for one node: an unknown node (nothing recorded under its HWID) is an
// error, so a typo does not read as an empty node.
func (e *env) readNodeView(cmd *cobra.Command, o *outputFlag, hwid string) (*clusterView, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	id, ctx, cancel, err := e.forNode(cmd, hwid)
	if err != nil {
		return nil, err
	}
	defer cancel()
	v, err := e.readNode(ctx, id)
	if err != nil {
		return nil, err
	}
	if v.nodes[id] == nil && v.hardware[id] == nil && v.states[id] == nil && len(v.vms) == 0 {
		return nil, fmt.Errorf("node %s: %w (herdctl node list shows the nodes)", id, ErrNotFound)
	}
	return v, nil
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

// clusterKeys is what one view is built from, each slice read at rev. The values of the three
// big prefixes may come decoded already (readCluster decodes pages while reading the next);
// buildView decodes what did not.
type clusterKeys struct {
	rev                                                   int64
	vms, nodes, states, hardware, statuses, fences, guard []*mvccpb.KeyValue
	placements, problems, nodeSpecs                       []*mvccpb.KeyValue

	specVals   []*keys.VMSpec
	specErrs   []error
	placeVals  []*keys.Placement
	statusVals []*keys.VMStatus
	statusErrs []error
}

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
	rev := first.Header.Revision
	// Every prefix is read on its own, at rev, and the big ones are decoded a page at a time
	// while the next page is on its way: at 100,000 VMs reading and decoding one after the other
	// was most of `vm list`'s time.
	specs := &pageDecoder[keys.VMSpec]{decode: keys.Decode[keys.VMSpec]}
	statuses := &pageDecoder[keys.VMStatus]{decode: keys.Decode[keys.VMStatus]}
	placements := &pageDecoder[keys.Placement]{decode: keys.Decode[keys.Placement]}
	decoders := map[int]func([]*mvccpb.KeyValue){0: specs.add, 4: statuses.add, 7: placements.add}
	resp := make([][]*mvccpb.KeyValue, len(prefixes))
	errs := make([]error, len(prefixes))
	var wg sync.WaitGroup
	for i, p := range prefixes {
		r := first.Responses[i].GetResponseRange()
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp[i], errs[i] = e.pages(ctx, p, rev, r.Kvs, r.More, decoders[i])
		}()
	}
	wg.Wait()
	k := clusterKeys{rev: rev, vms: resp[0], nodes: resp[1], states: resp[2], hardware: resp[3],
		statuses: resp[4], fences: resp[5], guard: resp[6], placements: resp[7], problems: resp[8], nodeSpecs: resp[9]}
	k.specVals, k.specErrs = specs.result()
	k.statusVals, k.statusErrs = statuses.result()
	k.placeVals, _ = placements.result()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return e.buildView(k), nil
}

// pages reads the pages of prefix after the first one (kvs), at rev, handing each page, the
// first included, to each (when not nil) as it arrives.
func (e *env) pages(ctx context.Context, prefix string, rev int64, kvs []*mvccpb.KeyValue, more bool, each func([]*mvccpb.KeyValue)) ([]*mvccpb.KeyValue, error) {
	if each != nil {
		each(kvs)
	}
	for more && len(kvs) > 0 {
		from := string(kvs[len(kvs)-1].Key) + "\x00"
		page, err := e.client.Get(ctx, from, clientv3.WithRange(clientv3.GetPrefixRangeEnd(prefix)),
			clientv3.WithRev(rev), clientv3.WithLimit(readPage))
		if err != nil {
			return nil, fmt.Errorf("read %s at revision %d: %w", prefix, rev, err)
		}
		if each != nil {
			each(page.Kvs)
		}
		kvs = append(kvs, page.Kvs...)
		more = page.More
	}
	return kvs, nil
}

// pageDecoder decodes pages of values, each page in a goroutine of its own, in the order added.
// A key that is not of the type (a VM's migrate key among its spec keys) only yields an error
// nobody reads.
type pageDecoder[T any] struct {
	decode func([]byte) (*T, error)
	wg     sync.WaitGroup
	parts  []*decodedPage[T]
}

type decodedPage[T any] struct {
	vals []*T
	errs []error
}

// add starts decoding a page; it is called by one goroutine, the page's reader.
func (d *pageDecoder[T]) add(page []*mvccpb.KeyValue) {
	p := &decodedPage[T]{vals: make([]*T, len(page)), errs: make([]error, len(page))}
	d.parts = append(d.parts, p)
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		for i, kv := range page {
			p.vals[i], p.errs[i] = d.decode(kv.Value)
		}
	}()
}

// result waits for every page and returns the values in the order of the keys.
func (d *pageDecoder[T]) result() ([]*T, []error) {
	d.wg.Wait()
	var vals []*T
	var errs []error
	for _, p := range d.parts {
		vals, errs = append(vals, p.vals...), append(errs, p.errs...)
	}
	return vals, errs
}

// nodeReadChunk is how many VMs one transaction of a node-scoped read asks about (three gets
// each, under etcd's default limit of 128 operations per transaction).
const nodeReadChunk = 40

// readNode reads what concerns one node at one revision, by key prefix rather than the whole
// cluster: the node's keys, the VMs it is assigned or reports, and those VMs' spec, placement and
// problem. Its cost grows with the node's VMs, not the cluster's.
func (e *env) readNode(ctx context.Context, hwid string) (*clusterView, error) {
	s := e.space
	first, err := e.client.Txn(ctx).Then(
		clientv3.OpGet(s.AssignPrefix(hwid), clientv3.WithPrefix(), clientv3.WithKeysOnly(), clientv3.WithLimit(readPage)),
		clientv3.OpGet(s.StatusPrefix(hwid), clientv3.WithPrefix(), clientv3.WithLimit(readPage)),
		clientv3.OpGet(s.Node(hwid)), clientv3.OpGet(s.NodeState(hwid)), clientv3.OpGet(s.Hardware(hwid)),
		clientv3.OpGet(s.FencePrefix(hwid), clientv3.WithPrefix()), clientv3.OpGet(s.LossGuard()), clientv3.OpGet(s.NodeSpec(hwid)),
	).Commit()
	if err != nil {
		return nil, err
	}
	rev := first.Header.Revision
	rng := func(i int) *etcdserverpb.RangeResponse { return first.Responses[i].GetResponseRange() }
	assigned, err := e.pages(ctx, s.AssignPrefix(hwid), rev, rng(0).Kvs, rng(0).More, nil)
	if err != nil {
		return nil, err
	}
	statuses, err := e.pages(ctx, s.StatusPrefix(hwid), rev, rng(1).Kvs, rng(1).More, nil)
	if err != nil {
		return nil, err
	}
	k := clusterKeys{rev: rev, statuses: statuses, nodes: rng(2).Kvs, states: rng(3).Kvs, hardware: rng(4).Kvs,
		fences: rng(5).Kvs, guard: rng(6).Kvs, nodeSpecs: rng(7).Kvs}
	names := map[string]bool{}
	for _, kv := range assigned {
		if _, name, ok := keys.ParseNodeScoped(s.AssignRoot(), string(kv.Key)); ok {
			names[name] = true
		}
	}
	for _, kv := range statuses {
		if _, name, ok := keys.ParseNodeScoped(s.StatusRoot(), string(kv.Key)); ok {
			names[name] = true
		}
	}
	sorted := make([]string, 0, len(names))
	for n := range names {
		sorted = append(sorted, n)
	}
	sort.Strings(sorted)
	for len(sorted) > 0 {
		chunk := sorted[:min(nodeReadChunk, len(sorted))]
		sorted = sorted[len(chunk):]
		ops := make([]clientv3.Op, 0, 3*len(chunk))
		for _, n := range chunk {
			ops = append(ops, clientv3.OpGet(s.VMSpec(n), clientv3.WithRev(rev)), clientv3.OpGet(s.Placement(n), clientv3.WithRev(rev)),
				clientv3.OpGet(s.Problem(n), clientv3.WithRev(rev)))
		}
		r, err := e.client.Txn(ctx).Then(ops...).Commit()
		if err != nil {
			return nil, fmt.Errorf("read the VMs of node %s at revision %d: %w", hwid, rev, err)
		}
		for i := range chunk {
			k.vms = append(k.vms, r.Responses[3*i].GetResponseRange().Kvs...)
			k.placements = append(k.placements, r.Responses[3*i+1].GetResponseRange().Kvs...)
			k.problems = append(k.problems, r.Responses[3*i+2].GetResponseRange().Kvs...)
		}
	}
	// A VM placed elsewhere (a stray the node still reports, a migration's source) is shown as the
	// whole read shows it: with its placement node's liveness and report.
	var ops []clientv3.Op
	elsewhere := map[string]bool{}
	for _, kv := range k.placements {
		pl, err := keys.Decode[keys.Placement](kv.Value)
		name, ok := keys.ParseVMName(s.PlacementPrefix(), string(kv.Key))
		if err != nil || !ok || pl.Node == hwid {
			continue
		}
		ops = append(ops, clientv3.OpGet(s.Status(pl.Node, name), clientv3.WithRev(rev)))
		if !elsewhere[pl.Node] {
			elsewhere[pl.Node] = true
			ops = append(ops, clientv3.OpGet(s.Node(pl.Node), clientv3.WithRev(rev)))
		}
	}
	for len(ops) > 0 {
		chunk := ops[:min(3*nodeReadChunk, len(ops))]
		ops = ops[len(chunk):]
		r, err := e.client.Txn(ctx).Then(chunk...).Commit()
		if err != nil {
			return nil, fmt.Errorf("read the nodes of node %s's VMs placed elsewhere at revision %d: %w", hwid, rev, err)
		}
		for _, rr := range r.Responses {
			for _, kv := range rr.GetResponseRange().Kvs {
				if strings.HasPrefix(string(kv.Key), s.StatusRoot()) {
					k.statuses = append(k.statuses, kv)
				} else {
					k.nodes = append(k.nodes, kv)
				}
			}
		}
	}
	return e.buildView(k), nil
}

// buildView decodes the keys read into the view herdctl prints.
func (e *env) buildView(k clusterKeys) *clusterView {
	s := e.space
	resp := [][]*mvccpb.KeyValue{k.vms, k.nodes, k.states, k.hardware, k.statuses, k.fences, k.guard, k.placements, k.problems, k.nodeSpecs}
	v := &clusterView{
		rev:      k.rev,
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
	specs, specErrs := k.specVals, k.specErrs
	if len(specs) != len(resp[0]) {
		specs, specErrs = decodeAll(resp[0], keys.Decode[keys.VMSpec])
	}
	for i, kv := range resp[0] {
		name, part, ok := s.ParseVM(string(kv.Key))
		if !ok || part != keys.VMPartSpec {
			continue
		}
		vm := vmOf(name)
		vm.UID = kv.CreateRevision
		if err := specErrs[i]; err != nil {
			vm.SpecError = err.Error()
		} else {
			vm.Spec = specs[i]
			if specs[i].AdoptUID > 0 {
				vm.UID = specs[i].AdoptUID // keys.SpecUID
			}
		}
	}
	placements := k.placeVals
	if len(placements) != len(resp[7]) {
		placements, _ = decodeAll(resp[7], keys.Decode[keys.Placement])
	}
	for i, kv := range resp[7] {
		if name, ok := keys.ParseVMName(s.PlacementPrefix(), string(kv.Key)); ok {
			vmOf(name).Placement = placements[i]
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
	statuses, statusErrs := k.statusVals, k.statusErrs
	if len(statuses) != len(resp[4]) {
		statuses, statusErrs = decodeAll(resp[4], keys.Decode[keys.VMStatus])
	}
	for i, kv := range resp[4] {
		hwid, name, ok := keys.ParseNodeScoped(s.StatusRoot(), string(kv.Key))
		if !ok || statusErrs[i] != nil {
			continue
		}
		st := statuses[i]
		if v.statuses[hwid] == nil {
			v.statuses[hwid] = map[string]*keys.VMStatus{}
		}
		v.statuses[hwid][name] = st
	}
	for _, vm := range v.vms {
		v.summarize(vm)
	}
	return v
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

// decodeAll decodes every value with decode: what buildView decodes itself, for reads that did
// not decode as they read (a node's keys: few).
func decodeAll[T any](kvs []*mvccpb.KeyValue, decode func([]byte) (*T, error)) ([]*T, []error) {
	d := &pageDecoder[T]{decode: decode}
	d.add(kvs)
	return d.result()
}
