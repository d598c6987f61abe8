package ctl

import (
	"fmt"
	"sort"
	"strings"

	"github.com/spf13/cobra"

	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/units"
)

// nodeView is one node as herdctl shows it: the enrolment, the live registration (if any), the
// admin state and what is placed on it.
type nodeView struct {
	HWID      string          `json:"hwid"`
	Status    string          `json:"status"`
	Hardware  *keys.Hardware  `json:"hardware,omitempty"`
	Node      *keys.Node      `json:"node,omitempty"`
	NodeError string          `json:"node_error,omitempty"`
	State     *keys.NodeState `json:"state,omitempty"`
	Spec      *keys.NodeSpec  `json:"spec,omitempty"`
	Admin     keys.NodeAdmin  `json:"admin"`
	VMs       []string        `json:"vms"`
	UsedVCPUs int             `json:"used_vcpus"`
	UsedMiB   int64           `json:"used_memory_mib"`
}

// note is what most needs saying about the node: a problem its agent reports, a doubt of the
// leader's about its registration, or why its drain waits.
func (n *nodeView) note() string {
	switch {
	case n.Node != nil && n.Node.Problem != "":
		return n.Node.Problem
	case n.State != nil && n.State.Doubt != "":
		return n.State.Doubt
	case n.State != nil && n.State.Waiting != "":
		return "drain waits: " + n.State.Waiting
	}
	return ""
}

func (v *clusterView) nodeViews() []*nodeView {
	byID := map[string]*nodeView{}
	get := func(id string) *nodeView {
		n := byID[id]
		if n == nil {
			n = &nodeView{HWID: id, VMs: []string{}}
			byID[id] = n
		}
		return n
	}
	for id, hw := range v.hardware {
		get(id).Hardware = hw
	}
	for id, n := range v.nodes {
		nv := get(id)
		nv.Node = n
		if err := v.nodeErrs[id]; err != nil {
			nv.NodeError = err.Error()
		}
	}
	for id, st := range v.states {
		if n := byID[id]; n != nil {
			n.State = st
		}
	}
	for id, sp := range v.specs {
		if n := byID[id]; n != nil {
			n.Spec = sp
		}
	}
	for id, n := range byID {
		n.Admin = v.admin(id)
	}
	for _, vm := range v.vms {
		if p := vm.Placement; p != nil && p.UID == vm.UID {
			n := byID[p.Node]
			if n == nil {
				n = get(p.Node)
			}
			n.VMs = append(n.VMs, vm.Name)
			n.UsedVCPUs += p.VCPUs
			n.UsedMiB += p.MemoryMiB
		}
	}
	out := make([]*nodeView, 0, len(byID))
	for _, n := range byID {
		sort.Strings(n.VMs)
		var st []string
		// The boot that matters: the live one, else the last one the leader recorded.
		boot := ""
		if n.State != nil {
			boot = n.State.BootID
		}
		if n.Node != nil {
			boot = n.Node.BootID
		}
		var fenced *keys.Fence
		for _, f := range v.fences[n.HWID] {
			if f.BootID == boot {
				fenced = f
			}
		}
		switch {
		case n.Node != nil && n.Node.Problem != "":
			st = append(st, "not-ready")
		case n.Node != nil && n.Hardware == nil:
			st = append(st, "ready", "not-enrolled")
		case n.Node != nil:
			st = append(st, "ready")
		case fenced != nil:
			st = append(st, "lost")
		case n.State != nil && n.State.Left:
			st = append(st, "down", "left")
		case n.Hardware != nil && len(n.VMs) > 0 && n.State != nil && n.State.BootID != "":
			st = append(st, "lost")
		case n.Hardware != nil:
			st = append(st, "down")
		default:
			st = append(st, "unknown")
		}
		if fenced != nil {
			switch fenced.Phase {
			case keys.FenceFenced:
				st = append(st, "fenced")
			case keys.FenceFailed:
				st = append(st, "fence-failed")
			default:
				st = append(st, "fencing")
			}
		}
		if n.Admin.Cordoned {
			st = append(st, "cordoned")
		}
		switch {
		case n.Admin.Drained:
			st = append(st, "drained")
		case n.Admin.Draining:
			st = append(st, "draining")
		}
		if n.State != nil && n.State.Doubt != "" {
			st = append(st, "untrusted")
		}
		if n.State != nil && n.State.Capped != "" {
			st = append(st, "capped")
		}
		n.Status = strings.Join(st, ",")
		out = append(out, n)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].HWID < out[j].HWID })
	return out
}

func nodeCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{Use: "node", Short: "Inspect hypervisor nodes"}
	cmd.AddCommand(nodeListCmd(e), nodeGetCmd(e), nodeCordonCmd(e, true), nodeCordonCmd(e, false), nodeDrainCmd(e))
	return cmd
}

func nodeListCmd(e *env) *cobra.Command {
	var o outputFlag
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List enrolled and live nodes with their capacity and use",
		Example: `  herdctl node list
  herdctl node list -o wide`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			v, err := e.readView(cmd, &o)
			if err != nil {
				return err
			}
			nodes := v.nodeViews()
			t := &table{}
			for _, c := range []struct {
				n string
				w bool
			}{{"NODE", false}, {"STATUS", false}, {"VMS", false}, {"VCPUS", false}, {"MEMORY", false}, {"IMAGE", false}, {"AGE", false}, {"LABELS", true}, {"BOOT-ID", true}, {"LIBVIRT", true}, {"NOTE", false}} {
				t.col(c.n, c.w)
			}
			for _, n := range nodes {
				cpus, mem, image, ageS, boot, uri := "-", "-", "-", "-", "-", "-"
				if nd := n.Node; nd != nil {
					cpus = fmt.Sprintf("%d/%d", n.UsedVCPUs, nd.CPUs)
					mem = fmt.Sprintf("%s/%s", units.FormatMiB(n.UsedMiB), units.FormatMiB(nd.MemoryMiB-nd.ReservedMemoryMiB))
					image, ageS, boot, uri = orDash(nd.Image), age(nd.Started), nd.BootID, nd.LibvirtURI
				}
				var labels map[string]string
				if n.Hardware != nil {
					labels = n.Hardware.Labels
				}
				t.row(n.HWID, n.Status, fmt.Sprint(len(n.VMs)), cpus, mem, image, ageS, labelsString(labels), boot, uri, orDash(n.note()))
			}
			if len(nodes) == 0 && o.format == "table" {
				fmt.Fprintln(e.errOut, "no nodes: enrol hardware with 'herdctl hw add'")
				return nil
			}
			return o.print(e.out, nodes, t)
		},
	}
	o.add(cmd)
	return cmd
}

func nodeGetCmd(e *env) *cobra.Command {
	var o outputFlag
	cmd := &cobra.Command{
		Use:     "get HWID",
		Short:   "Show one node: facts, state and VMs",
		Example: `  herdctl node get 52:54:00:00:00:01`,
		Args:    exactArgs("HWID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := o.validate(); err != nil {
				return err
			}
			id, ctx, cancel, err := e.forNode(cmd, args[0])
			if err != nil {
				return err
			}
			defer cancel()
			v, err := e.readNode(ctx, id)
			if err != nil {
				return err
			}
			var n *nodeView
			for _, nv := range v.nodeViews() {
				if nv.HWID == id {
					n = nv
				}
			}
			if n == nil {
				return fmt.Errorf("node %s: %w", id, ErrNotFound)
			}
			if o.format == "json" || o.format == "yaml" {
				return o.print(e.out, n, nil)
			}
			w := e.out
			fmt.Fprintf(w, "Node:       %s\n", n.HWID)
			fmt.Fprintf(w, "Status:     %s\n", n.Status)
			if hw := n.Hardware; hw != nil {
				fmt.Fprintf(w, "MAC:        %s\nSerial:     %s\nStorage IP: %s\nLabels:     %s\n", orDash(hw.MAC), orDash(hw.Serial), orDash(hw.StorageIP), labelsString(hw.Labels))
			}
			if nd := n.Node; nd != nil {
				fmt.Fprintf(w, "Boot ID:    %s\nLibvirt:    %s\nImage:      %s\nAgent:      %s\nUp:         %s\n", nd.BootID, nd.LibvirtURI, orDash(nd.Image), orDash(nd.AgentVersion), age(nd.Started))
				fmt.Fprintf(w, "CPUs:       %d used of %d\n", n.UsedVCPUs, nd.CPUs)
				fmt.Fprintf(w, "Memory:     %s used of %s (%s reserved for the host)\n", units.FormatMiB(n.UsedMiB), units.FormatMiB(nd.MemoryMiB-nd.ReservedMemoryMiB), units.FormatMiB(nd.ReservedMemoryMiB))
				if nd.Problem != "" {
					fmt.Fprintf(w, "Problem:    %s (no VM is placed here until it is fixed)\n", nd.Problem)
				}
				if nd.StatusURL != "" {
					fmt.Fprintf(w, "Status URL: %s\n", nd.StatusURL)
				}
			}
			if n.NodeError != "" {
				fmt.Fprintf(w, "Error:      %s\n", n.NodeError)
			}
			if a := n.Admin; a.Cordoned {
				since := "-"
				if n.Spec != nil && (n.Spec.Cordoned || n.Spec.Drain) {
					since = age(n.Spec.Since)
				}
				fmt.Fprintf(w, "Cordoned:   since %s ago: %s\n", since, orDash(a.Reason))
			}
			if st := n.State; st != nil {
				if st.Doubt != "" {
					fmt.Fprintf(w, "Untrusted:  %s (the node counts as absent)\n", st.Doubt)
				}
				if st.Capped != "" {
					fmt.Fprintf(w, "Capped:     %s\n", st.Capped)
				}
				if st.Image != "" {
					fmt.Fprintf(w, "Pinned:     %s (boots it next)\n", st.Image)
				}
			}
			fmt.Fprintf(w, "VMs:        %s\n", orDash(strings.Join(n.VMs, ", ")))
			return nil
		},
	}
	o.add(cmd)
	return cmd
}
