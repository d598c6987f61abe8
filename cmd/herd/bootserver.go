package main

import (
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/herdhq/herd/bootserver"
	"github.com/herdhq/herd/bootserver/dhcp"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/join"
	"github.com/herdhq/herd/lib/logging"
	"github.com/herdhq/herd/lib/pki"
	"github.com/herdhq/herd/lib/statusserver"
)

func bootserverCmd() *cobra.Command {
	var (
		eo                          etcdutil.Options
		lo                          logging.Options
		c                           bootserver.Config
		listen, mode, chainload     string
		serverIP, rng, netmask, rtr string
		dns                         []string
		lease                       time.Duration
		nodeEndpoints               []string
		syslog                      string
		params                      []string
	)
	cmd := &cobra.Command{
		Use:   "bootserver",
		Short: "Run a boot server: DHCP, TFTP and HTTP for PXE-booting enrolled hypervisors",
		Example: `  # next to the network's DHCP server (proxyDHCP), on eth1
  herd bootserver --interface eth1 --image-dir /srv/herd/images --endpoints http://10.0.0.5:2379

  # an isolated provisioning network: hand out addresses too
  herd bootserver --interface br0 --dhcp-mode full --range 10.99.0.100-10.99.0.200 \
    --advertise http://10.99.0.1:8080 --node-syslog udp://10.99.0.1:514

  # with TLS: nodes join with one-time tokens, served over HTTPS (iPXE built to trust the CA)
  herd bootserver --interface eth1 --endpoints https://10.0.0.5:2379 --cacert /etc/herd/pki/ca.crt \
    --cert /etc/herd/pki/bs1.crt --key /etc/herd/pki/bs1.key --node-join https://10.0.0.7:9443 \
    --https :8443 --tls-cert /etc/herd/pki/bs1.crt --tls-key /etc/herd/pki/bs1.key --advertise https://10.0.0.9:8443`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := lo.New("herd-bootserver", nil)
			if err != nil {
				return err
			}
			if c.Space, err = eo.Space(); err != nil {
				return err
			}
			if c.Name == "" {
				c.Name, _ = os.Hostname()
			}
			c.DHCP.Mode, c.DHCP.Chainload, c.DHCP.LeaseTime = mode, chainload, lease
			if c.Interface != "" {
				ip, mask, err := interfaceIPv4(c.Interface)
				if err != nil {
					return err
				}
				if serverIP != "" {
					if ip = net.ParseIP(serverIP).To4(); ip == nil {
						return fmt.Errorf("--server-ip %q is not IPv4", serverIP)
					}
				}
				c.DHCP.ServerIP, c.DHCP.Netmask = ip, mask
				if netmask != "" {
					m := net.ParseIP(netmask).To4()
					if m == nil {
						return fmt.Errorf("--netmask %q is not IPv4", netmask)
					}
					c.DHCP.Netmask = net.IPMask(m)
				}
				if rtr != "" {
					c.DHCP.Router = net.ParseIP(rtr).To4()
				}
				for _, d := range dns {
					c.DHCP.DNS = append(c.DHCP.DNS, net.ParseIP(d).To4())
				}
				if mode == dhcp.Full {
					lo, hi, ok := strings.Cut(rng, "-")
					c.RangeStart, c.RangeEnd = net.ParseIP(lo).To4(), net.ParseIP(hi).To4()
					if !ok || c.RangeStart == nil || c.RangeEnd == nil {
						return fmt.Errorf("--range %q: full mode needs FIRST-LAST, e.g. 10.99.0.100-10.99.0.200", rng)
					}
				}
				if c.Advertise == "" {
					_, port, _ := net.SplitHostPort(c.HTTPListen)
					c.Advertise = "http://" + net.JoinHostPort(ip.String(), port)
				}
			}
			if len(nodeEndpoints) == 0 {
				nodeEndpoints = eo.Endpoints
			}
			c.NodeParams = append([]string{"herd.endpoints=" + strings.Join(nodeEndpoints, ",")}, params...)
			if syslog != "" {
				c.NodeParams = append(c.NodeParams, "herd.syslog="+syslog)
			}
			if len(c.Join) > 0 && c.CAHash == "" && eo.CACert != "" {
				b, err := os.ReadFile(eo.CACert)
				if err != nil {
					return err
				}
				ca, err := pki.ParseCert(b)
				if err != nil {
					return fmt.Errorf("--cacert: %w", err)
				}
				c.CAHash = pki.Fingerprint(ca)
			}
			if c.HTTPSListen != "" && (c.TLSCert == "" || c.TLSKey == "") {
				return fmt.Errorf("--https needs --tls-cert and --tls-key (issue them: herd pki issue --role bootserver NAME --host ADDR)")
			}
			client, err := etcdutil.New(eo)
			if err != nil {
				return err
			}
			defer client.Close()
			c.Client = client
			reg := statusserver.NewRegistry()
			c.Registry, c.Log = reg, log
			srv, err := statusserver.Listen(listen, reg, nil)
			if err != nil {
				return err
			}
			g, gctx := errgroup.WithContext(cmd.Context())
			g.Go(func() error { return srv.Serve(gctx) })
			g.Go(func() error { return bootserver.Run(gctx, c) })
			return g.Wait()
		},
	}
	eo.AddFlags(cmd.Flags())
	lo.AddFlags(cmd.Flags())
	f := cmd.Flags()
	f.StringVar(&c.Name, "name", "", "this replica's name (default: hostname)")
	f.StringVar(&listen, "listen", ":9482", "status endpoint (metrics)")
	f.StringVar(&c.HTTPListen, "http", ":8080", "HTTP listen address for scripts and images")
	f.StringVar(&c.Advertise, "advertise", "", "base URL nodes reach the HTTP server at (default: the interface's address)")
	f.StringVar(&c.TFTPListen, "tftp", ":69", "TFTP listen address (empty disables TFTP)")
	f.IntVar(&c.TFTPLimits.Transfers, "tftp-max", 50, "TFTP transfers at once (more are refused with an error; firmware retries)")
	f.IntVar(&c.TFTPLimits.PerClient, "tftp-max-per-client", 4, "TFTP transfers at once from one address (a relay or NAT in front of many machines needs more)")
	f.StringVar(&c.IPXEDir, "ipxe-dir", "/usr/lib/ipxe", "directory of iPXE binaries (Debian's ipxe package)")
	f.StringVar(&c.ImageDir, "image-dir", "/var/lib/herd/images", "image files, as <dir>/<version>/<file>")
	f.DurationVar(&c.ImageRehash, "image-rehash", time.Hour, "hash every verified image again this often (files are also re-hashed whenever their inode, size or times change)")
	f.IntVar(&c.Discovery.Max, "discovered-max", 1000, "cap on unknown machines recorded in etcd: beyond it the least recently seen is removed")
	f.Float64Var(&c.Discovery.PerSource, "discovered-per-source", 1, "records per second one address on the boot network may cause (burst 5)")
	f.StringVar(&c.Interface, "interface", "", "serve DHCP on this interface (empty: no DHCP)")
	f.StringVar(&mode, "dhcp-mode", dhcp.Proxy, "proxy (beside an existing DHCP server) or full (own address range)")
	f.StringVar(&chainload, "chainload", dhcp.ChainAuto, "auto: iPXE ROMs go straight to HTTP; always: every machine loads our iPXE over TFTP first")
	f.StringVar(&serverIP, "server-ip", "", "address to announce as DHCP and TFTP server (default: the interface's)")
	f.StringVar(&rng, "range", "", "full mode: address pool FIRST-LAST")
	f.StringVar(&netmask, "netmask", "", "full mode: netmask (default: the interface's)")
	f.StringVar(&rtr, "router", "", "full mode: default gateway to hand out")
	f.StringSliceVar(&dns, "dns", nil, "full mode: DNS servers to hand out")
	f.DurationVar(&lease, "lease-time", time.Hour, "full mode: DHCP lease time")
	f.Float64Var(&c.NewClientRate, "dhcp-new-rate", 50, "full mode: new clients per second given an address (the rest retry; bounds what a flood of invented MACs costs etcd)")
	f.StringVar(&c.DHCP.BIOSFile, "ipxe-bios", dhcp.DefaultBIOSFile, "iPXE binary for legacy BIOS PXE, in --ipxe-dir")
	f.StringVar(&c.DHCP.EFIx64File, "ipxe-efi", dhcp.DefaultEFIx64File, "iPXE binary for x86-64 UEFI, in --ipxe-dir")
	f.StringVar(&c.DHCP.EFIArm64File, "ipxe-efi-arm64", dhcp.DefaultEFIArm64File, "iPXE binary for arm64 UEFI, in --ipxe-dir (Debian's ipxe package has none: build snp.efi with make bin-arm64-efi/snp.efi)")
	f.StringSliceVar(&nodeEndpoints, "node-endpoints", nil, "etcd endpoints as nodes reach them (default: --endpoints)")
	f.StringVar(&syslog, "node-syslog", "", "syslog collector for nodes' logs (herd.syslog=), e.g. udp://10.0.0.5:514")
	f.StringSliceVar(&params, "node-param", nil, "extra kernel parameter for every node (repeatable)")
	f.DurationVar(&c.Retry, "retry", 10*time.Second, "how long an unknown machine waits before asking again")
	f.StringSliceVar(&c.Join, "node-join", nil, "coordinators' join endpoints (herd.join=): every boot gets a one-time join token")
	f.StringVar(&c.CAHash, "node-ca-hash", "", "CA fingerprint nodes pin (herd.ca=; default: that of --cacert)")
	f.DurationVar(&c.TokenTTL, "join-token-ttl", join.DefaultTokenTTL, "how long a boot's join token stays valid")
	f.StringVar(&c.HTTPSListen, "https", "", "also serve scripts and images over HTTPS here, e.g. :8443 (use an https --advertise URL)")
	f.StringVar(&c.TLSCert, "tls-cert", "", "HTTPS certificate")
	f.StringVar(&c.TLSKey, "tls-key", "", "HTTPS key")
	return cmd
}

// interfaceIPv4 returns the first IPv4 address and mask of an interface.
func interfaceIPv4(name string) (net.IP, net.IPMask, error) {
	ifc, err := net.InterfaceByName(name)
	if err != nil {
		return nil, nil, fmt.Errorf("interface %s: %w", name, err)
	}
	addrs, err := ifc.Addrs()
	if err != nil {
		return nil, nil, err
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil {
			return n.IP.To4(), n.Mask, nil
		}
	}
	return nil, nil, fmt.Errorf("interface %s has no IPv4 address", name)
}
