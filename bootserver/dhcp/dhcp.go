// Package dhcp is the DHCP side of herd's boot server. The Handler decides (pure logic, no sockets);
// the Server reads packets from a socket bound to one interface and sends the Handler's replies.
//
// Two modes:
//   - proxy (default): next to the network's own DHCP server, answer only PXE and iPXE clients, with
//     boot information and no address (proxyDHCP, as Pixiecore and smee do);
//   - full: on an isolated provisioning network, also hand out addresses from a range, with the
//     leases kept in etcd so several bootserver replicas agree.
package dhcp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/iana"
)

// Modes.
const (
	Proxy = "proxy"
	Full  = "full"
)

// Chainload policies for clients that already run iPXE.
const (
	// ChainAuto sends iPXE clients straight to the HTTP script; only plain PXE ROMs load the
	// bootserver's iPXE binary over TFTP first.
	ChainAuto = "auto"
	// ChainAlways makes every machine load the bootserver's own iPXE binary over TFTP first, even
	// when its ROM is iPXE (for a known iPXE build everywhere).
	ChainAlways = "always"
)

// Leases allocates addresses in full mode.
type Leases interface {
	// Offer returns the address mac holds, or reserves a free one.
	Offer(ctx context.Context, mac string) (net.IP, error)
	// Confirm makes mac's hold on ip a lease of the configured time; ErrNotOurs if ip is not mac's.
	Confirm(ctx context.Context, mac string, ip net.IP) error
	// Release ends mac's lease.
	Release(ctx context.Context, mac string) error
	// Decline ends mac's hold on ip and keeps ip from being offered for a while: the client found it
	// in use (DHCPDECLINE).
	Decline(ctx context.Context, mac string, ip net.IP) error
}

// ErrNotOurs refuses a request for an address this pool did not give the client.
var ErrNotOurs = errors.New("dhcp: address not leased to this client")

// ErrBusy: the pool declines to answer now (too many new clients at once); the client retries.
var ErrBusy = errors.New("dhcp: busy")

// Debian ipxe's file names: the first-stage binary per firmware family.
const (
	DefaultBIOSFile     = "undionly.kpxe"
	DefaultEFIx64File   = "ipxe.efi"
	DefaultEFIArm64File = "snp.efi"
)

// Fetches says whether a machine recently loaded the bootserver's iPXE over TFTP.
type Fetches interface {
	Recent(mac string) bool
}

// Config of the handler.
type Config struct {
	Mode     string
	ServerIP net.IP
	// ScriptURL is the HTTP URL iPXE clients chain to, e.g. http://10.99.0.1:8080/boot.ipxe.
	ScriptURL string
	Chainload string
	// Binaries by client architecture family; defaults are Debian ipxe's file names.
	BIOSFile, EFIx64File, EFIArm64File string

	// Full mode only.
	Netmask   net.IPMask
	Router    net.IP
	DNS       []net.IP
	LeaseTime time.Duration
}

// Handler answers DHCP requests.
type Handler struct {
	cfg     Config
	leases  Leases
	fetches Fetches
}

// NewHandler checks cfg and builds a handler; leases may be nil in proxy mode.
func NewHandler(cfg Config, leases Leases, fetches Fetches) (*Handler, error) {
	switch cfg.Mode {
	case Proxy:
	case Full:
		if leases == nil || cfg.Netmask == nil {
			return nil, errors.New("dhcp: full mode needs an address range and netmask")
		}
	default:
		return nil, fmt.Errorf("dhcp: mode %q: want proxy or full", cfg.Mode)
	}
	if cfg.ServerIP.To4() == nil {
		return nil, fmt.Errorf("dhcp: server IP %v is not IPv4", cfg.ServerIP)
	}
	switch cfg.Chainload {
	case "":
		cfg.Chainload = ChainAuto
	case ChainAuto, ChainAlways:
	default:
		return nil, fmt.Errorf("dhcp: chainload %q: want auto or always", cfg.Chainload)
	}
	if cfg.BIOSFile == "" {
		cfg.BIOSFile = DefaultBIOSFile
	}
	if cfg.EFIx64File == "" {
		cfg.EFIx64File = DefaultEFIx64File
	}
	if cfg.EFIArm64File == "" {
		cfg.EFIArm64File = DefaultEFIArm64File
	}
	if cfg.LeaseTime == 0 {
		cfg.LeaseTime = time.Hour
	}
	return &Handler{cfg: cfg, leases: leases, fetches: fetches}, nil
}

// Client is what the handler learned about a request, for logs and metrics.
type Client struct {
	MAC    string
	PXE    bool
	IPXE   bool
	Arch   string
	File   string
	IP     net.IP
	Reason string // why the request was ignored, if it was
}

// isIPXE: iPXE sends user class "iPXE" (option 77) and its feature option 175.
func isIPXE(req *dhcpv4.DHCPv4) bool {
	for _, uc := range req.UserClass() {
		if uc == "iPXE" {
			return true
		}
	}
	return len(req.GetOneOption(dhcpv4.GenericOptionCode(175))) > 0
}

// firstStage picks the iPXE binary for the client's firmware (option 93).
func (h *Handler) firstStage(req *dhcpv4.DHCPv4) (file, arch string, ok bool) {
	archs := req.ClientArch()
	a := iana.INTEL_X86PC
	if len(archs) > 0 {
		a = archs[0]
	}
	switch a {
	case iana.INTEL_X86PC:
		return h.cfg.BIOSFile, "bios", true
	case iana.EFI_X86_64, iana.EFI_BC:
		return h.cfg.EFIx64File, "efi-x86_64", true
	case iana.EFI_ARM64:
		return h.cfg.EFIArm64File, "efi-arm64", true
	}
	return "", a.String(), false
}

// Reply answers req received on port (67 or 4011). A nil reply with a Client.Reason means the
// request is not for us.
func (h *Handler) Reply(ctx context.Context, req *dhcpv4.DHCPv4, port int) (*dhcpv4.DHCPv4, Client, error) {
	c := Client{MAC: req.ClientHWAddr.String()}
	if req.OpCode != dhcpv4.OpcodeBootRequest || len(req.ClientHWAddr) != 6 {
		c.Reason = "not an Ethernet boot request"
		return nil, c, nil
	}
	c.PXE = strings.HasPrefix(req.ClassIdentifier(), "PXEClient")
	c.IPXE = isIPXE(req)
	mt := req.MessageType()
	if gi := req.GatewayIPAddr; gi != nil && !gi.IsUnspecified() && !gi.IsGlobalUnicast() {
		// A reply goes to the relay: only a unicast relay address may be one (never a broadcast,
		// multicast or loopback address a forged request names).
		c.Reason = fmt.Sprintf("relay address %v is not a unicast address", gi)
		return nil, c, nil
	}
	if port == 4011 {
		// PXE boot server discovery (both modes): the client has its address and asks, unicast,
		// for the boot file. The answer carries no address and keeps the client's own.
		if !c.PXE || mt != dhcpv4.MessageTypeRequest {
			c.Reason = fmt.Sprintf("%s on port 4011 from a client that is not PXE", mt)
			return nil, c, nil
		}
		return h.bootReply(req, dhcpv4.MessageTypeAck, nil, &c)
	}

	if h.cfg.Mode == Proxy {
		if !c.PXE {
			c.Reason = "not a PXE client (proxy mode answers PXE clients only)"
			return nil, c, nil
		}
		if mt == dhcpv4.MessageTypeDiscover {
			return h.bootReply(req, dhcpv4.MessageTypeOffer, nil, &c)
		}
		c.Reason = fmt.Sprintf("%s on port %d is for the network's DHCP server", mt, port)
		return nil, c, nil
	}

	// Full mode.
	mac := c.MAC
	switch mt {
	case dhcpv4.MessageTypeDiscover:
		ip, err := h.leases.Offer(ctx, mac)
		if err != nil {
			return nil, c, fmt.Errorf("offer for %s: %w", mac, err)
		}
		c.IP = ip
		return h.bootReply(req, dhcpv4.MessageTypeOffer, ip, &c)
	case dhcpv4.MessageTypeRequest:
		if sid := req.ServerIdentifier(); sid != nil && !sid.Equal(h.cfg.ServerIP) {
			c.Reason = "client chose another server"
			return nil, c, nil
		}
		ip := req.RequestedIPAddress()
		if ip == nil || ip.IsUnspecified() {
			ip = req.ClientIPAddr // renewing
		}
		err := h.leases.Confirm(ctx, mac, ip)
		if errors.Is(err, ErrNotOurs) {
			nak, nerr := dhcpv4.NewReplyFromRequest(req,
				dhcpv4.WithMessageType(dhcpv4.MessageTypeNak),
				dhcpv4.WithOption(dhcpv4.OptServerIdentifier(h.cfg.ServerIP)))
			c.Reason = fmt.Sprintf("NAK: %v not leased to %s", ip, mac)
			return nak, c, nerr
		}
		if err != nil {
			return nil, c, fmt.Errorf("confirm %v for %s: %w", ip, mac, err)
		}
		c.IP = ip
		return h.bootReply(req, dhcpv4.MessageTypeAck, ip, &c)
	case dhcpv4.MessageTypeRelease:
		c.Reason = "released"
		return nil, c, h.leases.Release(ctx, mac)
	case dhcpv4.MessageTypeDecline:
		ip := req.RequestedIPAddress()
		if ip == nil || ip.IsUnspecified() {
			c.Reason = "decline without an address"
			return nil, c, nil
		}
		c.IP, c.Reason = ip, "declined: the address is in use on the network"
		return nil, c, h.leases.Decline(ctx, mac, ip)
	case dhcpv4.MessageTypeInform:
		return h.bootReply(req, dhcpv4.MessageTypeAck, nil, &c)
	}
	c.Reason = fmt.Sprintf("%s not handled", mt)
	return nil, c, nil
}

// bootReply builds an OFFER or ACK, with an address when ip is set and with boot information for
// PXE clients.
func (h *Handler) bootReply(req *dhcpv4.DHCPv4, mt dhcpv4.MessageType, ip net.IP, c *Client) (*dhcpv4.DHCPv4, Client, error) {
	mods := []dhcpv4.Modifier{
		dhcpv4.WithMessageType(mt),
		dhcpv4.WithOption(dhcpv4.OptServerIdentifier(h.cfg.ServerIP)),
	}
	if ip != nil {
		mods = append(mods,
			dhcpv4.WithYourIP(ip),
			dhcpv4.WithNetmask(h.cfg.Netmask),
			dhcpv4.WithLeaseTime(uint32(h.cfg.LeaseTime/time.Second)),
		)
		if h.cfg.Router != nil {
			mods = append(mods, dhcpv4.WithOption(dhcpv4.OptRouter(h.cfg.Router)))
		}
		if len(h.cfg.DNS) > 0 {
			mods = append(mods, dhcpv4.WithOption(dhcpv4.OptDNS(h.cfg.DNS...)))
		}
	}
	if c.PXE {
		file, arch, ok := h.firstStage(req)
		c.Arch = arch
		switch {
		case !ok:
			c.Reason = "unsupported client architecture " + arch
			if ip == nil {
				return nil, *c, nil
			}
		case c.IPXE && (h.cfg.Chainload == ChainAuto || (h.fetches != nil && h.fetches.Recent(c.MAC))):
			c.File = h.cfg.ScriptURL
		case h.cfg.Chainload == ChainAlways:
			c.File = strings.ReplaceAll(c.MAC, ":", "") + "/" + file
		default:
			c.File = file
		}
		if c.File != "" {
			mods = append(mods,
				dhcpv4.WithServerIP(h.cfg.ServerIP),
				dhcpv4.WithOption(dhcpv4.OptClassIdentifier("PXEClient")),
				dhcpv4.WithOption(dhcpv4.OptTFTPServerName(h.cfg.ServerIP.String())),
				dhcpv4.WithOption(dhcpv4.OptBootFileName(c.File)),
			)
			if !c.IPXE {
				// PXE vendor options (option 43), in both modes: discovery control 8 = boot from
				// the file name given here, skip boot server discovery. Without them an offer
				// with option 60 "PXEClient" sends EDK2's PXE (most UEFI firmware) to port 4011
				// instead of booting the file.
				mods = append(mods, dhcpv4.WithGeneric(dhcpv4.OptionVendorSpecificInformation, []byte{6, 1, 8, 255}))
			}
		}
	}
	if ip == nil && req.ClientIPAddr != nil && !req.ClientIPAddr.IsUnspecified() {
		// An answer without an address (port 4011, INFORM) keeps the client's own (RFC 2131:
		// ciaddr as the client sent it).
		mods = append(mods, dhcpv4.WithClientIP(req.ClientIPAddr))
	}
	reply, err := dhcpv4.NewReplyFromRequest(req, mods...)
	if err != nil {
		return nil, *c, err
	}
	if c.File != "" {
		reply.BootFileName = c.File
	}
	return reply, *c, nil
}
