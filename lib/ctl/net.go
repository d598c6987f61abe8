package ctl

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/keys"
)

func netCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{
		Use:     "net",
		Aliases: []string{"network"},
		Short:   "Networks VMs attach to, and the addresses the leader hands out on them",
		Long: `A network is /herd/networks/NAME (JSON, docs/keyspace.md): a VLAN on the hypervisors' uplink (or
untagged on a bridge), a CIDR, a gateway, DNS servers and the range the leader allocates from. A
VM's NIC on a network (herdctl vm create --net NAME) holds one address for the VM's life, claimed
under /herd/addresses/NAME/IP in the transaction that places the VM.`,
	}
	cmd.AddCommand(netCreateCmd(e), netListCmd(e), netGetCmd(e), netDeleteCmd(e))
	return cmd
}

func netCreateCmd(e *env) *cobra.Command {
	var (
		n        keys.NetworkSpec
		rangeArg string
	)
	cmd := &cobra.Command{
		Use:   "create NAME --cidr CIDR",
		Short: "Create a network (idempotent: the same settings again change nothing)",
		Example: `  herdctl net create prod --vlan 120 --cidr 10.20.0.0/22 --gateway 10.20.0.1 --dns 10.20.0.2
  herdctl net create lab --cidr 192.168.50.0/24 --bridge br0 --range 192.168.50.100-192.168.50.199`,
		Args: exactArgs("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if err := keys.ValidateName(name); err != nil {
				return usagef("network name: %v", err)
			}
			if rangeArg != "" {
				first, last, ok := strings.Cut(rangeArg, "-")
				if !ok {
					return usagef("--range %q: want FIRST-LAST, e.g. 10.20.0.10-10.20.3.250", rangeArg)
				}
				n.RangeFirst, n.RangeLast = strings.TrimSpace(first), strings.TrimSpace(last)
			}
			if err := n.Validate(); err != nil {
				return usagef("network %s: %v", name, err)
			}
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			want := keys.MustEncode(&n)
			result, err := e.casPut(ctx, e.space.Network(name), func(old []byte) (string, bool, error) {
				if old == nil {
					return want, true, nil
				}
				cur, err := keys.Decode[keys.NetworkSpec](old)
				if err != nil {
					return "", false, fmt.Errorf("network %s exists but is unreadable (%v): fix or delete /herd/networks/%s with etcdctl", name, err, name)
				}
				if keys.MustEncode(cur) != want {
					return "", false, fmt.Errorf("network %s exists with other settings (%s): delete it first (herdctl net delete %s) once no VM uses it", name, describeNet(cur), name)
				}
				return "", false, nil
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(e.out, "network/%s %s\n", name, result)
			return nil
		},
	}
	f := cmd.Flags()
	f.IntVar(&n.VLAN, "vlan", 0, "802.1Q tag on the hypervisors' uplink (0: untagged, on --bridge)")
	f.StringVar(&n.Bridge, "bridge", "", "hypervisor bridge of an untagged network (default "+keys.DefaultBridge+")")
	f.StringVar(&n.CIDR, "cidr", "", "the network's IPv4 CIDR, e.g. 10.20.0.0/22 (required)")
	f.StringVar(&n.Gateway, "gateway", "", "default gateway the guests are given")
	f.StringSliceVar(&n.DNS, "dns", nil, "DNS server the guests are given (repeatable, at most 3)")
	f.StringVar(&rangeArg, "range", "", "addresses the leader allocates, FIRST-LAST (default: every host address but the gateway)")
	f.IntVar(&n.MTU, "mtu", 0, "MTU the guests are given (default: the bridge's)")
	return cmd
}

func describeNet(n *keys.NetworkSpec) string {
	first, last := n.Range()
	vlan := "untagged on " + n.HostBridge()
	if n.VLAN > 0 {
		vlan = "vlan " + strconv.Itoa(n.VLAN)
	}
	return fmt.Sprintf("%s, %s, range %s-%s", n.CIDR, vlan, first, last)
}

// netView is a network as herdctl shows it: its record and the addresses held on it.
type netView struct {
	Name    string            `json:"name"`
	Network *keys.NetworkSpec `json:"network,omitempty"`
	Error   string            `json:"error,omitempty"`
	Held    map[string]string `json:"held"` // ip -> vm
}

// readNets reads the networks and their claims (one read per prefix, at one revision).
func (e *env) readNets(ctx context.Context, only string) ([]*netView, error) {
	netKey, addrKey := e.space.NetworkPrefix(), e.space.AddressRoot()
	opts := []clientv3.OpOption{clientv3.WithPrefix()}
	if only != "" {
		netKey, addrKey, opts = e.space.Network(only), e.space.AddressPrefix(only), nil
	}
	nets, err := e.client.Get(ctx, netKey, opts...)
	if err != nil {
		return nil, fmt.Errorf("read networks: %w", err)
	}
	claims, err := e.client.Get(ctx, addrKey, clientv3.WithPrefix(), clientv3.WithRev(nets.Header.Revision))
	if err != nil {
		return nil, fmt.Errorf("read address claims: %w", err)
	}
	byName := map[string]*netView{}
	var out []*netView
	for _, kv := range nets.Kvs {
		name, ok := keys.ParseLeaf(e.space.NetworkPrefix(), string(kv.Key))
		if !ok {
			continue
		}
		v := &netView{Name: name, Held: map[string]string{}}
		if n, err := keys.Decode[keys.NetworkSpec](kv.Value); err != nil {
			v.Error = err.Error()
		} else {
			v.Network = n
		}
		byName[name] = v
		out = append(out, v)
	}
	for _, kv := range claims.Kvs {
		net, ip, ok := keys.ParseNodeScoped(e.space.AddressRoot(), string(kv.Key))
		if !ok {
			continue
		}
		v := byName[net]
		if v == nil {
			// Claims on a network deleted by hand: shown, so they can be found.
			v = &netView{Name: net, Error: "no network record", Held: map[string]string{}}
			byName[net] = v
			out = append(out, v)
		}
		if cl, err := keys.Decode[keys.AddressClaim](kv.Value); err != nil {
			v.Held[ip] = "(unreadable claim)"
		} else {
			v.Held[ip] = cl.VM
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// netsFor is what net list and net get read: the output flag checked, then the networks (only one,
// if named) with their claims.
func (e *env) netsFor(cmd *cobra.Command, o *outputFlag, only string) ([]*netView, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	if err := e.connect(); err != nil {
		return nil, err
	}
	ctx, cancel := e.ctx(cmd.Context())
	defer cancel()
	return e.readNets(ctx, only)
}

func netListCmd(e *env) *cobra.Command {
	var o outputFlag
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List networks and how many of their addresses are held",
		Example: `  herdctl net list
  herdctl net list -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			nets, err := e.netsFor(cmd, &o, "")
			if err != nil {
				return err
			}
			if len(nets) == 0 && o.format == "table" {
				fmt.Fprintln(e.errOut, "no networks (herdctl net create NAME --cidr ...)")
				return nil
			}
			t := newTable("NAME", "VLAN", "CIDR", "GATEWAY", "RANGE", "HELD")
			for _, v := range nets {
				if v.Network == nil {
					t.row(v.Name, "-", "unreadable: "+v.Error, "-", "-", strconv.Itoa(len(v.Held)))
					continue
				}
				n := v.Network
				vlan := "untagged (" + n.HostBridge() + ")"
				if n.VLAN > 0 {
					vlan = strconv.Itoa(n.VLAN)
				}
				first, last := n.Range()
				t.row(v.Name, vlan, n.CIDR, orDash(n.Gateway), first.String()+"-"+last.String(), strconv.Itoa(len(v.Held)))
			}
			return o.print(e.out, nets, t)
		},
	}
	o.add(cmd)
	return cmd
}

func netGetCmd(e *env) *cobra.Command {
	var o outputFlag
	cmd := &cobra.Command{
		Use:   "get NAME",
		Short: "Show a network and which VM holds each of its addresses",
		Example: `  herdctl net get prod
  herdctl net get prod -o json`,
		Args: exactArgs("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			nets, err := e.netsFor(cmd, &o, args[0])
			if err != nil {
				return err
			}
			if len(nets) == 0 {
				return fmt.Errorf("network %s: %w", args[0], ErrNotFound)
			}
			v := nets[0]
			if o.format == "json" || o.format == "yaml" {
				return o.print(e.out, v, nil)
			}
			w := e.out
			fmt.Fprintf(w, "Name:     %s\n", v.Name)
			if n := v.Network; n != nil {
				fmt.Fprintf(w, "Network:  %s\n", describeNet(n))
				fmt.Fprintf(w, "Gateway:  %s\n", orDash(n.Gateway))
				fmt.Fprintf(w, "DNS:      %s\n", orDash(strings.Join(n.DNS, ", ")))
				if n.MTU > 0 {
					fmt.Fprintf(w, "MTU:      %d\n", n.MTU)
				}
			} else {
				fmt.Fprintf(w, "Network:  unreadable: %s\n", v.Error)
			}
			fmt.Fprintf(w, "Held:     %d addresses\n", len(v.Held))
			ips := make([]string, 0, len(v.Held))
			for ip := range v.Held {
				ips = append(ips, ip)
			}
			sortAddrs(ips)
			for _, ip := range ips {
				fmt.Fprintf(w, "  %-16s %s\n", ip, v.Held[ip])
			}
			return nil
		},
	}
	o.add(cmd)
	return cmd
}

// sortAddrs sorts dotted IPv4 addresses numerically (unparsable ones last, as text).
func sortAddrs(ips []string) {
	slices.SortFunc(ips, func(x, y string) int {
		a, aerr := netip.ParseAddr(x)
		b, berr := netip.ParseAddr(y)
		switch {
		case aerr != nil && berr != nil:
			return strings.Compare(x, y)
		case aerr != nil:
			return 1 // what is not an address last
		case berr != nil:
			return -1
		}
		return a.Compare(b)
	})
}

func netDeleteCmd(e *env) *cobra.Command {
	var ignoreMissing bool
	cmd := &cobra.Command{
		Use:     "delete NAME",
		Aliases: []string{"rm"},
		Short:   "Delete a network no VM holds an address on",
		Example: `  herdctl net delete lab`,
		Args:    exactArgs("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			// Deleted only while no claim is under the network's prefix, in one transaction: a
			// VM placed meanwhile makes it fail and be told.
			prefix := e.space.AddressPrefix(name)
			tx, err := e.client.Txn(ctx).
				If(clientv3.Compare(clientv3.CreateRevision(prefix), "=", 0).WithPrefix()).
				Then(clientv3.OpDelete(e.space.Network(name))).
				Else(clientv3.OpGet(prefix, clientv3.WithPrefix(), clientv3.WithLimit(6))).Commit()
			if err != nil {
				return fmt.Errorf("delete network %s: %w", name, err)
			}
			if !tx.Succeeded {
				var users []string
				for _, kv := range tx.Responses[0].GetResponseRange().Kvs {
					if cl, err := keys.Decode[keys.AddressClaim](kv.Value); err == nil {
						users = append(users, "vm "+cl.VM)
					}
				}
				return fmt.Errorf("network %s is in use: addresses are held by %s: delete those VMs or move their NICs to another network first",
					name, strings.Join(firstN(users, 5), ", "))
			}
			if tx.Responses[0].GetResponseDeleteRange().Deleted == 0 {
				if ignoreMissing {
					return nil
				}
				return fmt.Errorf("network %s: %w", name, ErrNotFound)
			}
			fmt.Fprintf(e.out, "network/%s deleted\n", name)
			return nil
		},
	}
	cmd.Flags().BoolVar(&ignoreMissing, "ignore-not-found", false, "succeed when the network does not exist")
	return cmd
}
