package dhcp

import (
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/iana"
)

var (
	serverIP = net.IPv4(10, 99, 0, 1).To4()
	mac      = net.HardwareAddr{0x52, 0x54, 0, 0xaa, 0xbb, 1}
)

// poolOfOne hands out one address per MAC from a map: enough to drive the handler's logic. The
// etcd-backed pool is tested against a real etcd in package bootserver.
type poolOfOne struct {
	mu  sync.Mutex
	ips map[string]net.IP
}

func (p *poolOfOne) Offer(_ context.Context, mac string) (net.IP, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ip, ok := p.ips[mac]; ok {
		return ip, nil
	}
	ip := net.IPv4(10, 99, 0, byte(100+len(p.ips))).To4()
	p.ips[mac] = ip
	return ip, nil
}
func (p *poolOfOne) Confirm(_ context.Context, mac string, ip net.IP) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.ips[mac].Equal(ip) {
		return ErrNotOurs
	}
	return nil
}
func (p *poolOfOne) Release(context.Context, string) error         { return nil }
func (p *poolOfOne) Decline(context.Context, string, net.IP) error { return nil }

type fetchSet map[string]bool

func (f fetchSet) Recent(mac string) bool { return f[mac] }

func request(t *testing.T, mt dhcpv4.MessageType, mods ...dhcpv4.Modifier) *dhcpv4.DHCPv4 {
	t.Helper()
	m, err := dhcpv4.New(append([]dhcpv4.Modifier{dhcpv4.WithHwAddr(mac), dhcpv4.WithMessageType(mt)}, mods...)...)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

var (
	pxe      = dhcpv4.WithOption(dhcpv4.OptClassIdentifier("PXEClient:Arch:00000:UNDI:002001"))
	ipxeUC   = dhcpv4.WithUserClass("iPXE", false)
	efiX64   = dhcpv4.WithOption(dhcpv4.OptClientArch(iana.EFI_X86_64))
	arm64    = dhcpv4.WithOption(dhcpv4.OptClientArch(iana.EFI_ARM64))
	riscv    = dhcpv4.WithOption(dhcpv4.OptClientArch(iana.EFI_RISCV64))
	scriptTo = "http://10.99.0.1:8080/boot.ipxe"
)

func handler(t *testing.T, mode, chain string, fetched fetchSet) *Handler {
	t.Helper()
	h, err := NewHandler(Config{Mode: mode, ServerIP: serverIP, ScriptURL: scriptTo, Chainload: chain, Netmask: net.CIDRMask(24, 32)},
		&poolOfOne{ips: map[string]net.IP{}}, fetched)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func TestProxyMode(t *testing.T) {
	h := handler(t, Proxy, ChainAuto, nil)
	ctx := context.Background()
	cases := []struct {
		name  string
		mt    dhcpv4.MessageType
		port  int
		mods  []dhcpv4.Modifier
		reply dhcpv4.MessageType
		file  string
	}{
		{"bios pxe gets undionly", dhcpv4.MessageTypeDiscover, 67, []dhcpv4.Modifier{pxe}, dhcpv4.MessageTypeOffer, "undionly.kpxe"},
		{"uefi x64 gets ipxe.efi", dhcpv4.MessageTypeDiscover, 67, []dhcpv4.Modifier{pxe, efiX64}, dhcpv4.MessageTypeOffer, "ipxe.efi"},
		{"arm64 gets snp.efi", dhcpv4.MessageTypeDiscover, 67, []dhcpv4.Modifier{pxe, arm64}, dhcpv4.MessageTypeOffer, "snp.efi"},
		{"ipxe gets the script", dhcpv4.MessageTypeDiscover, 67, []dhcpv4.Modifier{pxe, ipxeUC}, dhcpv4.MessageTypeOffer, scriptTo},
		{"proxy request on 4011", dhcpv4.MessageTypeRequest, 4011, []dhcpv4.Modifier{pxe}, dhcpv4.MessageTypeAck, "undionly.kpxe"},
		{"not pxe: ignored", dhcpv4.MessageTypeDiscover, 67, nil, dhcpv4.MessageTypeNone, ""},
		{"request on 67 is the real server's", dhcpv4.MessageTypeRequest, 67, []dhcpv4.Modifier{pxe}, dhcpv4.MessageTypeNone, ""},
		{"unknown arch: ignored", dhcpv4.MessageTypeDiscover, 67, []dhcpv4.Modifier{pxe, riscv}, dhcpv4.MessageTypeNone, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			reply, cl, err := h.Reply(ctx, request(t, c.mt, c.mods...), c.port)
			if err != nil {
				t.Fatal(err)
			}
			if c.reply == dhcpv4.MessageTypeNone {
				if reply != nil {
					t.Fatalf("answered %s", reply.Summary())
				}
				if cl.Reason == "" {
					t.Fatal("ignored without a reason")
				}
				return
			}
			if reply == nil {
				t.Fatalf("no reply: %s", cl.Reason)
			}
			if reply.MessageType() != c.reply || reply.BootFileName != c.file || reply.BootFileNameOption() != c.file {
				t.Fatalf("reply %s file %q opt67 %q", reply.MessageType(), reply.BootFileName, reply.BootFileNameOption())
			}
			if !reply.YourIPAddr.IsUnspecified() {
				t.Fatalf("proxyDHCP must not hand out an address: %v", reply.YourIPAddr)
			}
			if reply.ClassIdentifier() != "PXEClient" || !reply.ServerIPAddr.Equal(serverIP) || reply.TFTPServerName() != "10.99.0.1" {
				t.Fatalf("option 60 %q siaddr %v option 66 %q", reply.ClassIdentifier(), reply.ServerIPAddr, reply.TFTPServerName())
			}
			vendor := reply.GetOneOption(dhcpv4.OptionVendorSpecificInformation)
			if cl.IPXE != (len(vendor) == 0) {
				t.Fatalf("PXE vendor options %v for ipxe=%v", vendor, cl.IPXE)
			}
		})
	}
}

func TestFullModeLeasesAndNak(t *testing.T) {
	h := handler(t, Full, ChainAuto, nil)
	ctx := context.Background()
	offer, _, err := h.Reply(ctx, request(t, dhcpv4.MessageTypeDiscover), 67)
	if err != nil || offer == nil {
		t.Fatalf("offer %v %v", offer, err)
	}
	if offer.YourIPAddr.String() != "10.99.0.100" || offer.SubnetMask().String() != "ffffff00" || offer.BootFileName != "" {
		t.Fatalf("offer to a non-PXE client: %s", offer.Summary())
	}
	ack, _, err := h.Reply(ctx, request(t, dhcpv4.MessageTypeRequest,
		dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(offer.YourIPAddr)),
		dhcpv4.WithOption(dhcpv4.OptServerIdentifier(serverIP))), 67)
	if err != nil || ack == nil || ack.MessageType() != dhcpv4.MessageTypeAck || !ack.YourIPAddr.Equal(offer.YourIPAddr) {
		t.Fatalf("ack %v %v", ack, err)
	}
	nak, _, err := h.Reply(ctx, request(t, dhcpv4.MessageTypeRequest,
		dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.IPv4(10, 99, 0, 7)))), 67)
	if err != nil || nak == nil || nak.MessageType() != dhcpv4.MessageTypeNak {
		t.Fatalf("a request for someone else's address must be NAKed: %v %v", nak, err)
	}
	other, _, _ := h.Reply(ctx, request(t, dhcpv4.MessageTypeRequest,
		dhcpv4.WithOption(dhcpv4.OptServerIdentifier(net.IPv4(10, 99, 0, 2)))), 67)
	if other != nil {
		t.Fatal("answered a request meant for another server")
	}
	pxeOffer, _, _ := h.Reply(ctx, request(t, dhcpv4.MessageTypeDiscover, pxe), 67)
	if pxeOffer.BootFileName != "undionly.kpxe" || !pxeOffer.YourIPAddr.Equal(offer.YourIPAddr) {
		t.Fatalf("full-mode PXE offer: %s", pxeOffer.Summary())
	}
}

func TestChainloadAlways(t *testing.T) {
	fetched := fetchSet{}
	h := handler(t, Full, ChainAlways, fetched)
	ctx := context.Background()
	r, _, _ := h.Reply(ctx, request(t, dhcpv4.MessageTypeDiscover, pxe, ipxeUC), 67)
	if r.BootFileName != "525400aabb01/undionly.kpxe" {
		t.Fatalf("an iPXE ROM must first load our binary: %q", r.BootFileName)
	}
	fetched[mac.String()] = true
	r, _, _ = h.Reply(ctx, request(t, dhcpv4.MessageTypeDiscover, pxe, ipxeUC), 67)
	if r.BootFileName != scriptTo {
		t.Fatalf("after loading our binary, iPXE gets the script: %q", r.BootFileName)
	}
}

// TestServerSurvivesGarbage drives the real socket loop on loopback: garbage is counted and
// dropped, a valid request is answered.
func TestServerSurvivesGarbage(t *testing.T) {
	h := handler(t, Proxy, ChainAuto, nil)
	conn, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	s := &Server{Handler: h, Log: hclog.NewNullLogger()}
	go func() { done <- s.Serve(ctx, conn, 67) }()
	client, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	for _, junk := range [][]byte{{}, {1}, []byte(strings.Repeat("\xff", 600)), make([]byte, 300)} {
		_, _ = client.WriteTo(junk, conn.LocalAddr())
	}
	_, _ = client.WriteTo(request(t, dhcpv4.MessageTypeDiscover, pxe).ToBytes(), conn.LocalAddr())
	buf := make([]byte, 1500)
	_ = client.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, _, err := client.ReadFrom(buf)
	if err != nil {
		t.Fatal(err)
	}
	reply, err := dhcpv4.FromBytes(buf[:n])
	if err != nil || reply.MessageType() != dhcpv4.MessageTypeOffer {
		t.Fatalf("reply %v %v", reply, err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestFirmwareNeeds: what PXE firmware needs in either mode. EDK2's PXE (UEFI) boots the file of an
// offer only with the PXE vendor options (43: discovery control 8), else asks port 4011, which both
// modes answer, keeping the client's address; iPXE gets no vendor options.
func TestFirmwareNeeds(t *testing.T) {
	ctx := context.Background()
	for _, mode := range []string{Proxy, Full} {
		h := handler(t, mode, ChainAuto, nil)
		offer, _, err := h.Reply(ctx, request(t, dhcpv4.MessageTypeDiscover, pxe, efiX64), 67)
		if err != nil || offer == nil {
			t.Fatalf("%s: %v %v", mode, offer, err)
		}
		if v := offer.GetOneOption(dhcpv4.OptionVendorSpecificInformation); string(v) != "\x06\x01\x08\xff" {
			t.Fatalf("%s: option 43 %x", mode, v)
		}
		ipxeOffer, _, _ := h.Reply(ctx, request(t, dhcpv4.MessageTypeDiscover, pxe, efiX64, ipxeUC), 67)
		if v := ipxeOffer.GetOneOption(dhcpv4.OptionVendorSpecificInformation); len(v) != 0 {
			t.Fatalf("%s: option 43 for iPXE: %x", mode, v)
		}
		ciaddr := net.IPv4(10, 99, 0, 150).To4()
		ack, cl, err := h.Reply(ctx, request(t, dhcpv4.MessageTypeRequest, pxe, efiX64, dhcpv4.WithClientIP(ciaddr)), 4011)
		if err != nil || ack == nil {
			t.Fatalf("%s: port 4011: %v %v (%s)", mode, ack, err, cl.Reason)
		}
		if ack.MessageType() != dhcpv4.MessageTypeAck || ack.BootFileName != "ipxe.efi" || !ack.ClientIPAddr.Equal(ciaddr) || !ack.YourIPAddr.IsUnspecified() {
			t.Fatalf("%s: port 4011 ack %s", mode, ack.Summary())
		}
		if r, _, _ := h.Reply(ctx, request(t, dhcpv4.MessageTypeDiscover, efiX64), 4011); r != nil {
			t.Fatalf("%s: port 4011 answered a non-PXE discover", mode)
		}
	}
}

// TestRelayAddressMustBeUnicast: a reply goes to giaddr, so a request naming a broadcast,
// multicast or loopback relay is ignored rather than answered there.
func TestRelayAddressMustBeUnicast(t *testing.T) {
	h := handler(t, Full, ChainAuto, nil)
	for _, gi := range []net.IP{net.IPv4bcast, net.IPv4(224, 0, 0, 1), net.IPv4(127, 0, 0, 1), net.IPv4(0, 0, 0, 0)} {
		r, c, err := h.Reply(context.Background(), request(t, dhcpv4.MessageTypeDiscover, pxe, dhcpv4.WithGatewayIP(gi)), 67)
		if err != nil {
			t.Fatal(err)
		}
		if gi.IsUnspecified() {
			if r == nil {
				t.Fatalf("no relay: not answered (%s)", c.Reason)
			}
			continue
		}
		if r != nil || !strings.Contains(c.Reason, "not a unicast") {
			t.Fatalf("giaddr %v: answered (%v)", gi, c.Reason)
		}
	}
	r, _, _ := h.Reply(context.Background(), request(t, dhcpv4.MessageTypeDiscover, pxe, dhcpv4.WithGatewayIP(net.IPv4(10, 1, 2, 3))), 67)
	if r == nil || replyAddr(r, &net.UDPAddr{IP: net.IPv4(10, 1, 2, 3), Port: 67}).String() != "10.1.2.3:67" {
		t.Fatal("a unicast relay is answered at the relay")
	}
}

// declines records what the handler declined.
type declines struct {
	poolOfOne
	got []string
}

func (d *declines) Decline(_ context.Context, mac string, ip net.IP) error {
	d.got = append(d.got, mac+" "+ip.String())
	return nil
}

func TestDeclineReachesThePool(t *testing.T) {
	pool := &declines{poolOfOne: poolOfOne{ips: map[string]net.IP{}}}
	h, err := NewHandler(Config{Mode: Full, ServerIP: serverIP, ScriptURL: scriptTo, Netmask: net.CIDRMask(24, 32)}, pool, nil)
	if err != nil {
		t.Fatal(err)
	}
	ip := net.IPv4(10, 99, 0, 100).To4()
	r, c, err := h.Reply(context.Background(), request(t, dhcpv4.MessageTypeDecline, dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(ip))), 67)
	if err != nil || r != nil || len(pool.got) != 1 || pool.got[0] != mac.String()+" 10.99.0.100" {
		t.Fatalf("reply %v err %v declines %v (%s)", r, err, pool.got, c.Reason)
	}
}
