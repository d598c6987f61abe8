package ctl

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/units"
)

func vmCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "vm",
		Short: "Create, change, inspect and delete VMs",
	}
	cmd.AddCommand(vmCreateCmd(e), vmApplyCmd(e), vmGetCmd(e), vmListCmd(e), vmDeleteCmd(e), vmOrphansCmd(e), vmMigrateCmd(e), vmRestartCmd(e), vmReleaseCmd(e), vmForgetCmd(e), vmAdoptCmd(e), vmConsoleCmd(e),
		vmPowerCmd(e, "stop", keys.PowerStopped, "Stop a VM: the guest powers off (ACPI) and stays off, placed where it is"),
		vmPowerCmd(e, "start", keys.PowerRunning, "Start a stopped VM"))
	return cmd
}

// pools reads the cluster's disk pools for validation; nil when no coordinator made the cluster yet
// (the coordinator validates again anyway).
func (e *env) pools(ctx context.Context) ([]string, error) {
	resp, err := e.client.Get(ctx, e.space.Cluster())
	if err != nil {
		return nil, err
	}
	if len(resp.Kvs) == 0 {
		fmt.Fprintln(e.errOut, "warning: no cluster record yet (is a coordinator running?); disk pools not checked")
		return nil, nil
	}
	c, err := keys.Decode[keys.Cluster](resp.Kvs[0].Value)
	if err != nil {
		return nil, fmt.Errorf("cluster record %s: %w", e.space.Cluster(), err)
	}
	return c.Pools, nil
}

// specFlags are the flags that describe a VM, shared by create and adopt.
type specFlags struct {
	vcpus    int
	memory   string
	disks    []string
	pool     string
	from     string
	image    string
	power    string
	labels   []string
	selector []string
	antiAff  string
	kernel   string
	initrd   string
	cmdline  string
	networks []string
	nets     []string
	sshKeys  []string
	userData string
	policy   string
}

func (sf *specFlags) add(f *pflag.FlagSet) {
	f.IntVar(&sf.vcpus, "vcpus", 1, "virtual CPUs")
	f.StringVar(&sf.memory, "memory", "512MiB", "memory, e.g. 512MiB, 2GiB")
	f.StringArrayVar(&sf.disks, "disk", nil, "a disk: SIZE for the first (boot) disk, NAME=SIZE[,pool=POOL] for the others, e.g. 20GiB, data=100GiB (repeatable; no disk if none)")
	f.StringVar(&sf.pool, "pool", "default", "disk pool (of every disk that names none)")
	f.StringVar(&sf.image, "image", "", "the VM image the boot disk clones (herdctl volume import)")
	f.StringVar(&sf.from, "from", "", "a backend-specific source the boot disk clones instead, e.g. pool/image@snap")
	f.StringVar(&sf.power, "power", "", "running (default) or stopped")
	f.StringSliceVar(&sf.labels, "label", nil, "label key=value (repeatable)")
	f.StringSliceVar(&sf.selector, "selector", nil, "only nodes whose hardware has label key=value (repeatable)")
	f.StringVar(&sf.antiAff, "anti-affinity", "", "group name: at most one VM of the group per node")
	f.StringVar(&sf.kernel, "kernel", "", "boot this kernel directly (a path on the hypervisors)")
	f.StringVar(&sf.initrd, "initrd", "", "initrd for --kernel")
	f.StringVar(&sf.cmdline, "cmdline", "", "kernel command line for --kernel")
	f.StringArrayVar(&sf.nets, "net", nil, "a NIC on a herd network, with an address: NAME[,ip=ADDRESS][,model=virtio] (repeatable; before --network's NICs)")
	f.StringArrayVar(&sf.sshKeys, "ssh-key", nil, "a file of SSH public keys (a .pub or authorized_keys file) the guest accepts at first boot (repeatable)")
	f.StringVar(&sf.userData, "user-data", "", "a cloud-init user-data file (#cloud-config, a #! script...) the guest runs at first boot")
	f.StringSliceVar(&sf.networks, "network", nil, "a NIC on a hypervisor bridge as is, no address: BRIDGE[,model=virtio] (repeatable)")
	f.StringVar(&sf.policy, "migration-policy", "", "how the VM leaves a drained node: migrate (default) or restart")
}

// spec builds the spec the flags describe (not yet validated).
func (sf *specFlags) spec() (keys.VMSpec, error) {
	spec := keys.VMSpec{VCPUs: sf.vcpus, Power: sf.power, AntiAffinity: sf.antiAff, MigrationPolicy: sf.policy}
	if sf.kernel != "" {
		spec.Boot = &keys.KernelBoot{Kernel: sf.kernel, Initrd: sf.initrd, Cmdline: sf.cmdline}
	}
	for _, n := range sf.nets {
		fields := strings.Split(n, ",")
		nic := keys.Network{Network: fields[0]}
		for _, f := range fields[1:] {
			k, v, _ := strings.Cut(f, "=")
			switch k {
			case "ip":
				nic.Address = v
			case "model":
				nic.Model = v
			default:
				return spec, usagef("--net %q: unknown option %q (want NAME[,ip=ADDRESS][,model=MODEL])", n, f)
			}
		}
		spec.Networks = append(spec.Networks, nic)
	}
	for _, f := range sf.sshKeys {
		b, err := os.ReadFile(f)
		if err != nil {
			return spec, usagef("--ssh-key: %v", err)
		}
		n := len(spec.SSHKeys)
		for _, line := range strings.Split(string(b), "\n") {
			if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
				spec.SSHKeys = append(spec.SSHKeys, line)
			}
		}
		if len(spec.SSHKeys) == n {
			return spec, usagef("--ssh-key %s: no public key in it", f)
		}
	}
	if sf.userData != "" {
		b, err := os.ReadFile(sf.userData)
		if err != nil {
			return spec, usagef("--user-data: %v", err)
		}
		spec.UserData = string(b)
	}
	for _, n := range sf.networks {
		bridge, model, _ := strings.Cut(n, ",")
		spec.Networks = append(spec.Networks, keys.Network{Bridge: bridge, Model: strings.TrimPrefix(model, "model=")})
	}
	var err error
	if spec.MemoryMiB, err = units.ParseIn(sf.memory, units.MiB); err != nil {
		return spec, usagef("--memory: %v", err)
	}
	if spec.Disks, err = sf.diskList(); err != nil {
		return spec, err
	}
	if len(spec.Disks) == 1 && spec.Disks[0].Name == keys.RootDisk && spec.Disks[0].Image == "" {
		// One plain disk in the form every agent reads: a node not yet upgraded can run it.
		d := spec.Disks[0]
		d.Name, spec.Disk, spec.Disks = "", &d, nil
	}
	if spec.Labels, err = parseLabels("label", sf.labels); err != nil {
		return spec, err
	}
	if spec.NodeSelector, err = parseLabels("selector", sf.selector); err != nil {
		return spec, err
	}
	return spec, nil
}

// diskList reads the --disk flags: the first disk is the boot disk (named root unless NAME= says
// otherwise), and takes --image or --from.
func (sf *specFlags) diskList() ([]keys.Disk, error) {
	if len(sf.disks) == 0 {
		if sf.image != "" || sf.from != "" {
			return nil, usagef("--image and --from need a --disk to clone into, e.g. --disk 20GiB")
		}
		return nil, nil
	}
	var out []keys.Disk
	for i, arg := range sf.disks {
		fields := strings.Split(arg, ",")
		d := keys.Disk{Pool: sf.pool}
		size := fields[0]
		if name, sz, ok := strings.Cut(size, "="); ok {
			d.Name, size = name, sz
		} else if i > 0 {
			return nil, usagef("--disk %q: every disk but the first needs a name: NAME=SIZE, e.g. data=%s", arg, size)
		}
		n, err := units.ParseIn(size, units.GiB)
		if err != nil {
			return nil, usagef("--disk %q: %v", arg, err)
		}
		d.SizeGiB = n
		for _, f := range fields[1:] {
			switch k, v, _ := strings.Cut(f, "="); k {
			case "pool":
				d.Pool = v
			default:
				return nil, usagef("--disk %q: unknown option %q (want [NAME=]SIZE[,pool=POOL])", arg, f)
			}
		}
		if i == 0 {
			if d.Name == "" {
				d.Name = keys.RootDisk
			}
			d.Image, d.From = sf.image, sf.from
		}
		out = append(out, d)
	}
	return out, nil
}

// diskLines describe a spec's disks, one each: "root 20GiB in pool rbd from image debian-12".
func diskLines(s *keys.VMSpec) []string {
	var out []string
	for _, d := range s.DiskList() {
		l := fmt.Sprintf("%s %dGiB in pool %s", d.Name, d.SizeGiB, d.Pool)
		if d.Image != "" {
			l += " from image " + d.Image
		} else if d.From != "" {
			l += " from " + d.From
		}
		out = append(out, l)
	}
	return out
}

func vmCreateCmd(e *env) *cobra.Command {
	var (
		sf      specFlags
		wait    bool
		waitFor time.Duration
		dryRun  bool
	)
	cmd := &cobra.Command{
		Use:   "create NAME",
		Short: "Create a VM; the leader places it on a node and the node's agent starts it",
		Example: `  herdctl vm create web1 --vcpus 2 --memory 1GiB --disk 10GiB
  herdctl vm create web2 --image debian-12 --disk 20GiB --disk data=100GiB --net prod --ssh-key ~/.ssh/id_ed25519.pub --wait
  herdctl vm create db1 --memory 8GiB --disk 100GiB --anti-affinity db --selector zone=z1 --wait
  herdctl vm create app1 --net prod --net back,ip=10.21.0.40 --ssh-key ~/.ssh/id_ed25519.pub --user-data init.yaml
  herdctl vm create web2 --disk 10GiB --dry-run     # print the JSON etcdctl would write`,
		Args: exactArgs("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if err := keys.ValidateName(name); err != nil {
				return usagef("vm name: %v", err)
			}
			spec, err := sf.spec()
			if err != nil {
				return err
			}
			if dryRun {
				if err := spec.Validate(nil); err != nil {
					return usagef("invalid VM: %v", err)
				}
				fmt.Fprintln(e.out, keys.MustEncode(&spec))
				return nil
			}
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			pools, err := e.pools(ctx)
			if err != nil {
				return err
			}
			if err := spec.Validate(pools); err != nil {
				return usagef("invalid VM: %v", err)
			}
			key := e.space.VMSpec(name)
			resp, err := e.client.Txn(ctx).If(etcdutil.CreateRev(key, 0)).Then(clientv3.OpPut(key, keys.MustEncode(&spec))).Commit()
			if err != nil {
				return fmt.Errorf("create vm %s: %w", name, err)
			}
			if !resp.Succeeded {
				return fmt.Errorf("vm %s already exists; change it with 'herdctl vm apply' or delete it first", name)
			}
			fmt.Fprintf(e.out, "vm/%s created\n", name)
			if wait {
				return e.waitVM(cmd.Context(), name, resp.Header.Revision, waitFor, spec.WantsRunning())
			}
			return nil
		},
	}
	f := cmd.Flags()
	sf.add(f)
	f.BoolVar(&wait, "wait", false, "wait until the VM runs (or reports a problem)")
	f.DurationVar(&waitFor, "wait-timeout", 2*time.Minute, "how long --wait waits")
	f.BoolVar(&dryRun, "dry-run", false, "validate and print the spec JSON without writing it")
	return cmd
}

// waitVM polls until the VM created at uid runs (or is stopped, as asked), or a problem is recorded.
func (e *env) waitVM(parent context.Context, name string, uid int64, timeout time.Duration, running bool) error {
	ctx, cancel := context.WithTimeout(parent, timeout)
	defer cancel()
	want := keys.StateRunning
	if !running {
		want = keys.StateStopped
	}
	last := ""
	for {
		v, err := e.readCluster(ctx)
		if err == nil {
			vm := v.vms[name]
			switch {
			case vm == nil || vm.UID != uid:
				return fmt.Errorf("vm %s was deleted or replaced while waiting", name)
			case vm.State == want:
				fmt.Fprintf(e.out, "vm/%s %s on %s\n", name, want, vm.Placement.Node)
				return nil
			case vm.Problem != nil && vm.Problem.UID == uid:
				if vm.Problem.Message != last {
					fmt.Fprintf(e.errOut, "vm/%s %s: %s\n", name, vm.Problem.Kind, vm.Problem.Message)
					last = vm.Problem.Message
				}
				if vm.Problem.Kind == keys.ProblemInvalid {
					return fmt.Errorf("vm %s is invalid: %s", name, vm.Problem.Message)
				}
			case vm.State == keys.StateError && vm.Status != nil:
				return fmt.Errorf("vm %s failed on %s: %s", name, vm.Placement.Node, vm.Status.Message)
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("vm %s not %s after %s (see 'herdctl vm get %s')", name, want, timeout, name)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func vmApplyCmd(e *env) *cobra.Command {
	var (
		file       string
		maxPending int
	)
	cmd := &cobra.Command{
		Use:   "apply -f FILE",
		Short: "Create or update VMs from a YAML or JSON file (- for stdin)",
		Long: `apply makes each VM in FILE look like the file says. A document is the spec's JSON (see
docs/keyspace.md) plus "name"; several YAML documents are separated by '---'. Members that this
herdctl does not know and the file does not mention are kept from the stored spec.

Specs are written in batches, several at once; --timeout bounds each request, not the whole file.
A failure stops the apply: what was written is printed, and running it again finishes the rest.

--max-pending N is admission control for big files: at most N of the VMs this apply creates wait
for the leader's decision (a placement, or a problem saying why none) at any time, so that the
file queues here, behind a progress bar, rather than in etcd and the leader's backlog (where every
VM waits behind all the others). If the leader decides none of them for 15 s, apply says so and
writes the rest without waiting.`,
		Example: `  cat > web.yaml <<EOF
  name: web1
  vcpus: 2
  memory_mib: 2048
  disk: {pool: default, size_gib: 20}
  EOF
  herdctl vm apply -f web.yaml
  herdctl vm apply -f fleet.yaml --max-pending 1000   # 100,000 VMs, paced to the leader`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if file == "" {
				return usagef("apply needs -f FILE (or -f - for stdin)")
			}
			var data []byte
			var err error
			if file == "-" {
				data, err = readAll(os.Stdin)
			} else {
				data, err = os.ReadFile(file)
			}
			if err != nil {
				return err
			}
			docs, err := parseSpecDocs(data)
			if err != nil {
				return usagef("%s: %v", file, err)
			}
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			pools, err := e.pools(ctx)
			if err != nil {
				return err
			}
			// Validate everything before writing anything.
			for _, d := range docs {
				if err := d.spec.Validate(pools); err != nil {
					return usagef("vm %s: %v", d.name, err)
				}
			}
			var pace *pacer
			if maxPending > 0 {
				if pace, err = e.startPacer(cmd.Context(), maxPending, func(msg string) {
					e.clearLine()
					fmt.Fprintln(e.errOut, "note:", msg)
				}); err != nil {
					return err
				}
			}
			cancel()
			bar := e.newBar(len(docs), "applying")
			counts := map[string]int{}
			err = e.applyAll(cmd.Context(), docs, pace, func(res []applyResult) {
				e.clearLine()
				for _, r := range res {
					fmt.Fprintf(e.out, "vm/%s %s\n", r.name, r.res)
					counts[r.res]++
				}
				_ = bar.Add(len(res))
			})
			e.endBar()
			if len(docs) > 1 {
				fmt.Fprintf(e.errOut, "%d created, %d configured, %d unchanged of %d\n", counts[casCreated], counts["configured"], counts[casUnchanged], len(docs))
			}
			return err
		},
	}
	cmd.Flags().StringVarP(&file, "filename", "f", "", "file with VM specs (YAML or JSON), - for stdin")
	cmd.Flags().IntVar(&maxPending, "max-pending", 0, "admission control: at most this many of the VMs the apply creates wait for the leader at once; 0: no limit")
	return cmd
}

// applySpec writes spec as name's spec by compare-and-swap, keeping unknown members of the stored
// value that spec does not set.
func (e *env) applySpec(ctx context.Context, name string, spec *keys.VMSpec) (string, error) {
	res, err := e.casPut(ctx, e.space.VMSpec(name), func(old []byte) (string, bool, error) {
		return mergeSpec(old, spec), true, nil
	})
	if res == casUpdated {
		res = "configured"
	}
	return res, err
}

func vmGetCmd(e *env) *cobra.Command {
	var o outputFlag
	cmd := &cobra.Command{
		Use:   "get NAME",
		Short: "Show one VM: spec, placement, status and why it is not running if it is not",
		Example: `  herdctl vm get web1
  herdctl vm get web1 -o json`,
		Args: exactArgs("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			v, err := e.readView(cmd, &o)
			if err != nil {
				return err
			}
			vm := v.vms[args[0]]
			if vm == nil {
				return fmt.Errorf("vm %s: %w", args[0], ErrNotFound)
			}
			if o.format == "json" || o.format == "yaml" {
				return o.print(e.out, vm, nil)
			}
			return describeVM(e, vm)
		},
	}
	o.add(cmd)
	return cmd
}

func describeVM(e *env, vm *vmView) error {
	w := e.out
	fmt.Fprintf(w, "Name:       %s\n", vm.Name)
	fmt.Fprintf(w, "UID:        %d\n", vm.UID)
	fmt.Fprintf(w, "State:      %s\n", vm.State)
	if vm.SpecError != "" {
		fmt.Fprintf(w, "Spec:       unreadable: %s\n", vm.SpecError)
	}
	if s := vm.Spec; s != nil {
		power := s.Power
		if power == "" {
			power = keys.PowerRunning
		}
		fmt.Fprintf(w, "Resources:  %d vCPUs, %s\n", s.VCPUs, units.FormatMiB(s.MemoryMiB))
		for i, d := range diskLines(s) {
			label := "Disks:"
			if i > 0 {
				label = ""
			}
			fmt.Fprintf(w, "%-12s%s\n", label, d)
		}
		fmt.Fprintf(w, "Power:      %s\n", power)
		if len(s.NodeSelector) > 0 {
			fmt.Fprintf(w, "Selector:   %s\n", labelsString(s.NodeSelector))
		}
		if s.AntiAffinity != "" {
			fmt.Fprintf(w, "Anti-aff.:  %s\n", s.AntiAffinity)
		}
		if len(s.Labels) > 0 {
			fmt.Fprintf(w, "Labels:     %s\n", labelsString(s.Labels))
		}
	}
	if p := vm.Placement; p != nil {
		alive := ""
		if !vm.NodeAlive {
			alive = " (node not registered)"
		}
		fmt.Fprintf(w, "Node:       %s%s\n", p.Node, alive)
		fmt.Fprintf(w, "Epoch:      %d\n", p.Epoch)
		fmt.Fprintf(w, "Domain:     %s\n", p.UUID)
		fmt.Fprintf(w, "Placed:     %s ago\n", age(p.Since))
		label := "Addresses:"
		for _, a := range nicAddresses(p) {
			fmt.Fprintf(w, "%-11s %s\n", label, a)
			label = ""
		}
	}
	if st := vm.Status; st != nil {
		fmt.Fprintf(w, "Status:     %s since %s ago", st.State, age(st.Since))
		if st.Message != "" {
			fmt.Fprintf(w, ": %s", st.Message)
		}
		fmt.Fprintln(w)
	}
	if p := vm.Problem; p != nil && p.UID == vm.UID {
		fmt.Fprintf(w, "Problem:    %s: %s\n", p.Kind, p.Message)
	}
	return nil
}

// nicAddresses are a placement's NICs on networks as people read them: "prod 10.20.0.17 (MAC)".
func nicAddresses(p *keys.Placement) []string {
	var out []string
	for i, nic := range p.NICs {
		if nic == nil {
			continue
		}
		a := nic.Network + " " + nic.IP()
		if i < len(p.MACs) {
			a += " (" + p.MACs[i] + ")"
		}
		out = append(out, a)
	}
	return out
}

func vmListCmd(e *env) *cobra.Command {
	var (
		o    outputFlag
		node string
	)
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List VMs with their node and state",
		Long: `List VMs with their node and state, all read at one etcd revision.

--node lists the VMs a node is assigned or reports (a migration's incoming VM, a stray being
withdrawn) and reads only that node's keys: its cost does not grow with the cluster.`,
		Example: `  herdctl vm list
  herdctl vm list -o wide
  herdctl vm list --node 52:54:00:00:00:01
  herdctl vm list -o json | jq '.[] | select(.state != "running") | .name'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var v *clusterView
			var err error
			if node != "" {
				v, err = e.readNodeView(cmd, &o, node)
			} else {
				v, err = e.readView(cmd, &o)
			}
			if err != nil {
				return err
			}
			vms := v.sortedVMs()
			t := &table{}
			for _, c := range []struct {
				name string
				wide bool
			}{{"NAME", false}, {"NODE", false}, {"STATE", false}, {"VCPUS", false}, {"MEMORY", false}, {"AGE", false}, {"EPOCH", true}, {"UID", true}, {"ADDRESSES", true}, {"PROBLEM", false}} {
				t.col(c.name, c.wide)
			}
			for _, vm := range vms {
				node, vcpus, mem, epoch, addrs := "-", "-", "-", "-", "-"
				if vm.Placement != nil && vm.Placement.UID == vm.UID {
					node, epoch = vm.Placement.Node, fmt.Sprint(vm.Placement.Epoch)
					var held []string
					for _, nic := range vm.Placement.NICs {
						if nic != nil {
							held = append(held, nic.Network+"="+nic.IP())
						}
					}
					if len(held) > 0 {
						addrs = strings.Join(held, ",")
					}
				}
				if vm.Spec != nil {
					vcpus, mem = specSizes(vm.Spec.VCPUs, vm.Spec.MemoryMiB)
				}
				t.row(vm.Name, node, vm.State, vcpus, mem, age(vmAge(vm)), epoch, fmt.Sprint(vm.UID), addrs, truncate(orDash(vmProblem(vm)), 100))
			}
			if len(vms) == 0 && o.format == "table" {
				if node != "" {
					fmt.Fprintf(e.errOut, "no VMs on node %s\n", node)
				} else {
					fmt.Fprintln(e.errOut, "no VMs")
				}
				return nil
			}
			return o.print(e.out, vms, t)
		},
	}
	cmd.Flags().StringVar(&node, "node", "", "only the VMs of this node (HWID), read by its key prefix")
	o.add(cmd)
	return cmd
}

// specSizes formats a spec's vCPUs and memory; an invalid spec may hold any number, and only what
// a VM can have is printed ("-" otherwise).
func specSizes(vcpus int, memMiB int64) (string, string) {
	c, m := "-", "-"
	if vcpus >= 1 && vcpus <= keys.MaxVCPUs {
		c = fmt.Sprint(vcpus)
	}
	if memMiB >= 1 && memMiB <= keys.MaxMemoryMiB {
		m = units.FormatMiB(memMiB)
	}
	return c, m
}

// vmProblem is what is wrong with the VM, in the words of whoever said it: its spec's validation,
// the leader's problem record, or its node's status message ("" when nothing is).
func vmProblem(vm *vmView) string {
	switch {
	case vm.SpecError != "":
		return vm.SpecError
	case vm.Problem != nil && vm.Problem.UID == vm.UID:
		return vm.Problem.Message
	case vm.Status != nil:
		return vm.Status.Message
	}
	return ""
}

func truncate(s string, n int) string {
	s = strings.ReplaceAll(s, "\n", " ")
	if len(s) <= n {
		return s
	}
	return s[:n-3] + "..."
}

func vmDeleteCmd(e *env) *cobra.Command {
	var (
		ignoreMissing bool
		purge         bool
		wait          bool
		waitFor       time.Duration
	)
	cmd := &cobra.Command{
		Use:   "delete NAME...",
		Short: "Delete VMs: their nodes destroy the domains",
		Example: `  herdctl vm delete web1
  herdctl vm delete web1 web2 --wait
  herdctl vm delete web1 --purge        # and its disk`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			var missing []string
			for _, name := range args {
				if purge {
					if err := e.purgeDisksOf(ctx, name); err != nil {
						return err
					}
				}
				resp, err := e.client.Delete(ctx, e.space.VMSpec(name))
				if err != nil {
					return fmt.Errorf("delete vm %s: %w", name, err)
				}
				if resp.Deleted == 0 {
					missing = append(missing, name)
					continue
				}
				fmt.Fprintf(e.out, "vm/%s deleted\n", name)
			}
			if wait {
				if err := e.waitGone(cmd.Context(), args, waitFor); err != nil {
					return err
				}
			}
			if len(missing) > 0 && !ignoreMissing {
				return fmt.Errorf("vm %s: %w", strings.Join(missing, ", "), ErrNotFound)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&ignoreMissing, "ignore-not-found", false, "succeed when a VM does not exist")
	cmd.Flags().BoolVar(&purge, "purge", false, "also delete the VM's disk (disks outlive their VM otherwise)")
	cmd.Flags().BoolVar(&wait, "wait", false, "wait until the VMs' domains are gone")
	cmd.Flags().DurationVar(&waitFor, "wait-timeout", 2*time.Minute, "how long --wait waits")
	return cmd
}

// waitGone waits until no placement or status of the named VMs remains.
func (e *env) waitGone(parent context.Context, names []string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(parent, timeout)
	defer cancel()
	for {
		v, err := e.readCluster(ctx)
		if err == nil {
			left := 0
			for _, n := range names {
				if v.vms[n] != nil {
					left++
					continue
				}
				for _, sts := range v.statuses {
					if sts[n] != nil {
						left++
						break
					}
				}
			}
			if left == 0 {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("VMs still present after %s", timeout)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// purgeDisksOf marks the disk records of the VM's current incarnation for deletion; the leader
// deletes them once the VM is gone.
func (e *env) purgeDisksOf(ctx context.Context, name string) error {
	resp, err := e.client.Get(ctx, e.space.VMSpec(name))
	if err != nil || len(resp.Kvs) == 0 {
		return err
	}
	spec := &keys.Record[keys.VMSpec]{CreateRevision: resp.Kvs[0].CreateRevision}
	spec.Value, spec.Err = keys.Decode[keys.VMSpec](resp.Kvs[0].Value)
	uid := keys.SpecUID(spec)
	vols, err := e.readVolumes(ctx)
	if err != nil {
		return err
	}
	for _, v := range vols {
		if v.Record.VM == name && v.Record.UID == uid {
			if err := e.markPurge(ctx, v); err != nil {
				return err
			}
		}
	}
	return nil
}
