package ctl

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/units"
)

func hwCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "hw",
		Short: "Enrol hardware: only listed machines boot and join",
	}
	cmd.AddCommand(hwAddCmd(e), hwListCmd(e), hwRmCmd(e), hwDiscoveredCmd(e), hwApproveCmd(e), hwPinCmd(e, true), hwPinCmd(e, false), hwTokenCmd(e), hwSetCapacityCmd(e))
	return cmd
}

func hwAddCmd(e *env) *cobra.Command {
	var (
		mac, serial, storageIP, migrationIP, memory string
		cpus                                        int
		labels                                      []string
	)
	cmd := &cobra.Command{
		Use:   "add HWID",
		Short: "Enrol a machine by MAC address or serial number (Dell service tag); updates it if enrolled",
		Long: `add writes /herd/hardware/HWID. HWID is the machine's boot NIC MAC (any common spelling) or its
serial number. Running it again updates the record: flags given replace those fields, --label
replaces all labels; fields this herdctl does not know are kept.`,
		Example: `  herdctl hw add 52:54:00:12:34:56 --label rack=r1 --storage-ip 10.1.0.21
  herdctl hw add 7XK2QF2 --mac 52:54:00:12:34:57
  herdctl hw add 52:54:00:12:34:56 --cpus 64 --memory 512GiB --migration-ip 10.2.0.21`,
		Args: exactArgs("HWID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := keys.NormalizeHWID(args[0])
			if err != nil {
				return usagef("%v", err)
			}
			lbl, err := parseLabels("label", labels)
			if err != nil {
				return err
			}
			if mac != "" {
				if mac, err = keys.NormalizeMAC(mac); err != nil {
					return usagef("--mac: %v", err)
				}
			}
			var memMiB int64
			if memory != "" {
				if memMiB, err = units.ParseIn(memory, units.MiB); err != nil {
					return usagef("--memory: %v", err)
				}
			}
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			for _, s := range []string{serial, serialID(id)} {
				if err := e.serialFree(ctx, s, id); err != nil {
					return err
				}
			}
			result, err := e.updateHardware(ctx, id, true, func(hw *keys.Hardware) {
				if _, err := keys.NormalizeMAC(id); err == nil && hw.MAC == "" {
					hw.MAC = id
				} else if err != nil && hw.Serial == "" {
					hw.Serial = id
				}
				if mac != "" {
					hw.MAC = mac
				}
				if serial != "" {
					hw.Serial = serial
				}
				if storageIP != "" {
					hw.StorageIP = storageIP
				}
				if migrationIP != "" {
					hw.MigrationIP = migrationIP
				}
				if cpus > 0 {
					hw.CPUs = cpus
				}
				if memMiB > 0 {
					hw.MemoryMiB = memMiB
				}
				if cmd.Flags().Changed("label") {
					hw.Labels = lbl
				}
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(e.out, "hardware/%s %s\n", id, result)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&mac, "mac", "", "boot NIC MAC (when HWID is a serial)")
	f.StringVar(&serial, "serial", "", "serial number / service tag (when HWID is a MAC)")
	f.IntVar(&cpus, "cpus", 0, "CPUs the machine is expected to have: a node reporting more is capped (default: what it reports at its first join)")
	f.StringVar(&memory, "memory", "", "memory the machine is expected to have, e.g. 512GiB (as --cpus)")
	f.StringVar(&migrationIP, "migration-ip", "", "the only live-migration address this node's migration certificate may name")
	f.StringVar(&storageIP, "storage-ip", "", "static storage-network IP (needed for Ceph fencing)")
	f.StringSliceVar(&labels, "label", nil, "label key=value for node selectors (repeatable; replaces all labels)")
	return cmd
}

func hwListCmd(e *env) *cobra.Command {
	var o outputFlag
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List enrolled hardware",
		Example: `  herdctl hw list
  herdctl hw list -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			v, err := e.readView(cmd, &o)
			if err != nil {
				return err
			}
			type hwView struct {
				HWID     string         `json:"hwid"`
				Hardware *keys.Hardware `json:"hardware"`
				Live     bool           `json:"live"`
			}
			var rows []hwView
			t := newTable("HWID", "MAC", "SERIAL", "STORAGE-IP", "LABELS", "NODE")
			for _, n := range v.nodeViews() {
				if n.Hardware == nil {
					continue
				}
				rows = append(rows, hwView{HWID: n.HWID, Hardware: n.Hardware, Live: n.Node != nil})
				live := "down"
				if n.Node != nil {
					live = "ready"
				}
				t.row(n.HWID, orDash(n.Hardware.MAC), orDash(n.Hardware.Serial), orDash(n.Hardware.StorageIP), labelsString(n.Hardware.Labels), live)
			}
			if len(rows) == 0 && o.format == "table" {
				fmt.Fprintln(e.errOut, "no hardware enrolled")
				return nil
			}
			return o.print(e.out, rows, t)
		},
	}
	o.add(cmd)
	return cmd
}

func hwRmCmd(e *env) *cobra.Command {
	var ignoreMissing bool
	cmd := &cobra.Command{
		Use:     "rm HWID",
		Short:   "Remove a machine from the allow-list (it will not boot or join again; running VMs stay)",
		Example: `  herdctl hw rm 52:54:00:12:34:56`,
		Args:    exactArgs("HWID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, ctx, cancel, err := e.forNode(cmd, args[0])
			if err != nil {
				return err
			}
			defer cancel()
			resp, err := e.client.Delete(ctx, e.space.Hardware(id))
			if err != nil {
				return err
			}
			if resp.Deleted == 0 {
				if ignoreMissing {
					return nil
				}
				return fmt.Errorf("hardware %s: %w", id, ErrNotFound)
			}
			fmt.Fprintf(e.out, "hardware/%s removed\n", id)
			if n, err := e.client.Get(ctx, e.space.Node(id)); err == nil && len(n.Kvs) > 0 {
				fmt.Fprintf(e.errOut, "note: node %s is still registered; it takes no new VMs, and its VMs keep running\n", id)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&ignoreMissing, "ignore-not-found", false, "succeed when the record does not exist")
	return cmd
}

func hwDiscoveredCmd(e *env) *cobra.Command {
	var o outputFlag
	cmd := &cobra.Command{
		Use:     "discovered",
		Short:   "List machines that tried to boot but are not enrolled",
		Example: `  herdctl hw discovered`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel, err := e.startRead(cmd, &o)
			if err != nil {
				return err
			}
			defer cancel()
			resp, err := e.client.Get(ctx, e.space.DiscoveredPrefix(), clientv3.WithPrefix())
			if err != nil {
				return err
			}
			var list []*keys.Discovered
			t := newTable("MAC", "SERIAL", "UUID", "ARCH", "ATTEMPTS", "FIRST-SEEN", "LAST-SEEN", "BOOTSERVER", "NOTE")
			for _, kv := range resp.Kvs {
				d, err := keys.Decode[keys.Discovered](kv.Value)
				if err != nil {
					continue
				}
				list = append(list, d)
				t.row(d.MAC, orDash(d.Serial), orDash(d.UUID), orDash(d.Arch), fmt.Sprint(d.Attempts), age(d.FirstSeen), age(d.LastSeen), orDash(d.Bootserver), orDash(d.Reason))
			}
			if len(list) == 0 && o.format == "table" {
				fmt.Fprintln(e.errOut, "no unknown machines have tried to boot")
				return nil
			}
			return o.print(e.out, list, t)
		},
	}
	o.add(cmd)
	return cmd
}

func hwApproveCmd(e *env) *cobra.Command {
	var (
		labels    []string
		bySerial  bool
		storageIP string
	)
	cmd := &cobra.Command{
		Use:   "approve MAC",
		Short: "Enrol a discovered machine: it boots at its next retry, no power cycle needed",
		Example: `  herdctl hw discovered
  herdctl hw approve 52:54:00:aa:bb:01 --label rack=r3
  herdctl hw approve 52:54:00:aa:bb:02 --by-serial     # enrol under its serial number (service tag)`,
		Args: exactArgs("MAC"),
		RunE: func(cmd *cobra.Command, args []string) error {
			mac, err := keys.NormalizeMAC(args[0])
			if err != nil {
				return usagef("%v", err)
			}
			lbl, err := parseLabels("label", labels)
			if err != nil {
				return err
			}
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			dkey := e.space.Discovered(mac)
			resp, err := e.client.Get(ctx, dkey)
			if err != nil {
				return err
			}
			if len(resp.Kvs) == 0 {
				return fmt.Errorf("no discovered machine %s (see 'herdctl hw discovered', or enrol it with 'herdctl hw add'): %w", mac, ErrNotFound)
			}
			d, err := keys.Decode[keys.Discovered](resp.Kvs[0].Value)
			if err != nil {
				return err
			}
			hwid, serial := mac, d.Serial
			if why := serialProblem(ctx, e, serial, ""); why != "" {
				if bySerial {
					return usagef("machine %s cannot be enrolled by its serial number: %s; approve it by MAC", mac, why)
				}
				// The MAC identifies it; a serial that cannot is left out of the record.
				fmt.Fprintf(e.errOut, "note: serial number not recorded: %s\n", why)
				serial = ""
			}
			if bySerial {
				if hwid, err = keys.NormalizeHWID(serial); err != nil {
					return err
				}
			}
			hw := keys.Hardware{MAC: mac, Serial: serial, Labels: lbl, StorageIP: storageIP}
			if err := hw.Validate(hwid); err != nil {
				return usagef("%v", err)
			}
			tx, err := e.client.Txn(ctx).If(etcdutil.CreateRev(e.space.Hardware(hwid), 0)).Then(
				clientv3.OpPut(e.space.Hardware(hwid), keys.MustEncode(&hw)),
				clientv3.OpDelete(dkey),
			).Commit()
			if err != nil {
				return err
			}
			if !tx.Succeeded {
				return fmt.Errorf("hardware %s is already enrolled", hwid)
			}
			_ = e.record(ctx, "node/"+hwid, "approved", "mac "+mac)
			fmt.Fprintf(e.out, "hardware/%s enrolled; it boots at its next retry\n", hwid)
			return nil
		},
	}
	cmd.Flags().StringSliceVar(&labels, "label", nil, "label key=value (repeatable)")
	cmd.Flags().BoolVar(&bySerial, "by-serial", false, "enrol under the serial number the machine reported")
	cmd.Flags().StringVar(&storageIP, "storage-ip", "", "static storage-network IP")
	return cmd
}

// updateHardware applies mutate to a hardware record by compare-and-swap (creating it when create
// is set) and says what happened: enrolled, updated or unchanged. Members this herdctl does not
// know are kept.
func (e *env) updateHardware(ctx context.Context, id string, create bool, mutate func(*keys.Hardware)) (string, error) {
	key := e.space.Hardware(id)
	res, err := e.casPut(ctx, key, func(old []byte) (string, bool, error) {
		hw := &keys.Hardware{}
		if old != nil {
			var err error
			if hw, err = keys.Decode[keys.Hardware](old); err != nil {
				return "", false, fmt.Errorf("existing record %s is unreadable (%v); remove it with 'herdctl hw rm %s' first", key, err, id)
			}
		} else if !create {
			return "", false, fmt.Errorf("hardware %s is not enrolled: %w (herdctl hw add %s)", id, ErrNotFound, id)
		}
		mutate(hw)
		if err := hw.Validate(id); err != nil {
			return "", false, usagef("hardware %s: %v", id, err)
		}
		return keys.MustEncode(hw), true, nil
	})
	if res == casCreated {
		res = "enrolled"
	}
	return res, err
}

func hwSetCapacityCmd(e *env) *cobra.Command {
	var (
		cpus     int
		memory   string
		fromNode bool
	)
	cmd := &cobra.Command{
		Use:   "set-capacity HWID (--cpus N --memory SIZE | --from-node)",
		Short: "Approve the capacity a node may offer (a node reporting more than approved is capped)",
		Long: `The leader offers the scheduler at most what a node was approved for: the CPUs and memory in its
hardware record, or else what the node reported at its first join. A node that later reports more
(new DIMMs, or a node lying to draw VMs) is capped and shows "capped" in 'herdctl node list'.
set-capacity writes the expected capacity into the hardware record; --from-node takes what the node
reports now.`,
		Example: `  herdctl hw set-capacity 52:54:00:12:34:56 --from-node
  herdctl hw set-capacity 52:54:00:12:34:56 --cpus 64 --memory 512GiB`,
		Args: exactArgs("HWID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if fromNode == (cpus > 0 || memory != "") {
				return usagef("give --cpus and --memory, or --from-node")
			}
			var memMiB int64
			if memory != "" {
				var err error
				if memMiB, err = units.ParseIn(memory, units.MiB); err != nil {
					return usagef("--memory: %v", err)
				}
			}
			id, ctx, cancel, err := e.forNode(cmd, args[0])
			if err != nil {
				return err
			}
			defer cancel()
			if fromNode {
				resp, err := e.client.Get(ctx, e.space.Node(id))
				if err != nil {
					return err
				}
				if len(resp.Kvs) == 0 {
					return fmt.Errorf("node %s is not registered now: %w", id, ErrNotFound)
				}
				n, err := keys.Decode[keys.Node](resp.Kvs[0].Value)
				if err != nil {
					return fmt.Errorf("node record %s is unreadable: %v", id, err)
				}
				cpus, memMiB = n.CPUs, n.MemoryMiB
			}
			result, err := e.updateHardware(ctx, id, false, func(hw *keys.Hardware) {
				if cpus > 0 {
					hw.CPUs = cpus
				}
				if memMiB > 0 {
					hw.MemoryMiB = memMiB
				}
			})
			if err != nil {
				return err
			}
			if result != "unchanged" {
				_ = e.record(ctx, "node/"+id, "capacity-approved", fmt.Sprintf("%d CPUs, %s", cpus, units.FormatMiB(memMiB)))
			}
			fmt.Fprintf(e.out, "hardware/%s %s: %d CPUs, %s\n", id, result, cpus, units.FormatMiB(memMiB))
			return nil
		},
	}
	cmd.Flags().IntVar(&cpus, "cpus", 0, "CPUs the node may offer")
	cmd.Flags().StringVar(&memory, "memory", "", "memory the node may offer, e.g. 512GiB")
	cmd.Flags().BoolVar(&fromNode, "from-node", false, "approve what the node reports now")
	return cmd
}

func hwPinCmd(e *env, pin bool) *cobra.Command {
	use, short, example := "pin HWID VERSION", "Make a node boot VERSION instead of the current image", `  herdctl hw pin 52:54:00:aa:bb:01 2026.11.2`
	args := []string{"HWID", "VERSION"}
	if !pin {
		use, short, example = "unpin HWID", "Let a node boot the current image again", `  herdctl hw unpin 52:54:00:aa:bb:01`
		args = []string{"HWID"}
	}
	return &cobra.Command{
		Use:     use,
		Short:   short,
		Example: example,
		Args:    exactArgs(args...),
		RunE: func(cmd *cobra.Command, a []string) error {
			id, err := keys.NormalizeHWID(a[0])
			if err != nil {
				return usagef("%v", err)
			}
			version := ""
			if pin {
				version = a[1]
				if err := keys.ValidateImageVersion(version); err != nil {
					return usagef("%v", err)
				}
			}
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			if pin {
				resp, err := e.client.Get(ctx, e.space.Image(version), clientv3.WithCountOnly())
				if err != nil {
					return err
				}
				if resp.Count == 0 {
					return fmt.Errorf("image %s: %w (see 'herdctl image list')", version, ErrNotFound)
				}
			}
			changed, err := e.updateNodeSpec(ctx, id, func(ns *keys.NodeSpec) bool {
				if ns.Image == version {
					return false
				}
				ns.Image = version
				return true
			})
			if err != nil {
				return err
			}
			switch {
			case !changed && pin:
				fmt.Fprintf(e.out, "node/%s already pinned to %s\n", id, version)
			case !changed:
				fmt.Fprintf(e.out, "node/%s not pinned\n", id)
			case pin:
				_ = e.record(ctx, "node/"+id, "pinned", version)
				fmt.Fprintf(e.out, "node/%s pinned to %s (the leader applies it; takes effect at the node's next boot)\n", id, version)
			default:
				_ = e.record(ctx, "node/"+id, "unpinned", "")
				fmt.Fprintf(e.out, "node/%s unpinned\n", id)
			}
			return nil
		},
	}
}

// serialID is id when it is a serial number (not a MAC), else "".
func serialID(id string) string {
	if _, err := keys.NormalizeMAC(id); err == nil {
		return ""
	}
	return id
}

// serialProblem says why serial cannot identify a machine ("" when it can, or is empty): a firmware
// placeholder, or a serial another hardware record than except already names. White-box machines
// share placeholder serials; the boot server would refuse to identify any of them by it.
func serialProblem(ctx context.Context, e *env, serial, except string) string {
	if serial == "" {
		return ""
	}
	if why := keys.PlaceholderSerial(serial); why != "" {
		return why
	}
	resp, err := e.client.Get(ctx, e.space.HardwarePrefix(), clientv3.WithPrefix())
	if err != nil {
		return "" // the write's own checks still apply; not knowing is no reason to refuse
	}
	for _, kv := range resp.Kvs {
		id, ok := keys.ParseLeaf(e.space.HardwarePrefix(), string(kv.Key))
		if !ok || id == except {
			continue
		}
		hw, err := keys.Decode[keys.Hardware](kv.Value)
		if id == serial || (err == nil && hw.Serial == serial) {
			return fmt.Sprintf("serial number %q is already enrolled as %s", serial, id)
		}
	}
	return ""
}

// serialFree refuses a serial number that cannot identify the machine being enrolled as id.
func (e *env) serialFree(ctx context.Context, serial, id string) error {
	if why := serialProblem(ctx, e, serial, id); why != "" {
		return usagef("hardware %s: %s: enrol it by its boot NIC's MAC", id, why)
	}
	return nil
}
