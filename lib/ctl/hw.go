package ctl

import (
	"fmt"

	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

func hwCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "hw",
		Short: "Enrol hardware: only listed machines boot and join",
	}
	cmd.AddCommand(hwAddCmd(e), hwListCmd(e), hwRmCmd(e))
	return cmd
}

func hwAddCmd(e *env) *cobra.Command {
	var (
		mac, serial, storageIP string
		labels                 []string
	)
	cmd := &cobra.Command{
		Use:   "add HWID",
		Short: "Enrol a machine by MAC address or serial number (Dell service tag); updates it if enrolled",
		Long: `add writes /herd/hardware/HWID. HWID is the machine's boot NIC MAC (any common spelling) or its
serial number. Running it again updates the record: flags given replace those fields, --label
replaces all labels; fields this herdctl does not know are kept.`,
		Example: `  herdctl hw add 52:54:00:12:34:56 --label rack=r1 --storage-ip 10.1.0.21
  herdctl hw add 7XK2QF2 --mac 52:54:00:12:34:57`,
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
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			key := e.space.Hardware(id)
			for attempt := 0; attempt < 5; attempt++ {
				resp, err := e.client.Get(ctx, key)
				if err != nil {
					return err
				}
				hw := &keys.Hardware{}
				var modRev int64
				result := "enrolled"
				if len(resp.Kvs) > 0 {
					modRev, result = resp.Kvs[0].ModRevision, "updated"
					if hw, err = keys.Decode[keys.Hardware](resp.Kvs[0].Value); err != nil {
						return fmt.Errorf("existing record %s is unreadable (%v); remove it with 'herdctl hw rm %s' first", key, err, id)
					}
				}
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
				if cmd.Flags().Changed("label") {
					hw.Labels = lbl
				}
				if err := hw.Validate(id); err != nil {
					return usagef("hardware %s: %v", id, err)
				}
				val := keys.MustEncode(hw)
				if len(resp.Kvs) > 0 && string(resp.Kvs[0].Value) == val {
					fmt.Fprintf(e.out, "hardware/%s unchanged\n", id)
					return nil
				}
				tx, err := e.client.Txn(ctx).If(etcdutil.ModRev(key, modRev)).Then(clientv3.OpPut(key, val)).Commit()
				if err != nil {
					return err
				}
				if tx.Succeeded {
					fmt.Fprintf(e.out, "hardware/%s %s\n", id, result)
					return nil
				}
			}
			return fmt.Errorf("hardware %s kept changing under us; try again", id)
		},
	}
	f := cmd.Flags()
	f.StringVar(&mac, "mac", "", "boot NIC MAC (when HWID is a serial)")
	f.StringVar(&serial, "serial", "", "serial number / service tag (when HWID is a MAC)")
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
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := o.validate(); err != nil {
				return err
			}
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			v, err := e.readCluster(ctx)
			if err != nil {
				return err
			}
			type hwView struct {
				HWID     string         `json:"hwid"`
				Hardware *keys.Hardware `json:"hardware"`
				Live     bool           `json:"live"`
			}
			var rows []hwView
			t := &table{}
			for _, c := range []string{"HWID", "MAC", "SERIAL", "STORAGE-IP", "LABELS", "NODE"} {
				t.col(c, false)
			}
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
		Use:   "rm HWID",
		Short: "Remove a machine from the allow-list (it will not boot or join again; running VMs stay)",
		Args:  exactArgs("HWID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := keys.NormalizeHWID(args[0])
			if err != nil {
				return usagef("%v", err)
			}
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
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
