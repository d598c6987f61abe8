package dhcp

import (
	"context"
	"net"
	"testing"

	"github.com/insomniacslk/dhcp/dhcpv4"
)

// FuzzReply: whatever arrives on port 67 or 4011, the handler answers with a well-formed packet or
// not at all, in every mode; it never panics (the server also recovers, but a panic is a bug).
func FuzzReply(f *testing.F) {
	seed := func(mods ...dhcpv4.Modifier) {
		m, err := dhcpv4.New(append([]dhcpv4.Modifier{dhcpv4.WithHwAddr(mac)}, mods...)...)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(m.ToBytes())
	}
	seed(dhcpv4.WithMessageType(dhcpv4.MessageTypeDiscover), pxe)
	seed(dhcpv4.WithMessageType(dhcpv4.MessageTypeDiscover), pxe, efiX64)
	seed(dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest), pxe, ipxeUC)
	seed(dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest), pxe, arm64, dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.IPv4(10, 99, 0, 100))))
	seed(dhcpv4.WithMessageType(dhcpv4.MessageTypeRelease))
	seed(dhcpv4.WithMessageType(dhcpv4.MessageTypeInform), riscv)
	f.Add([]byte{})
	f.Add(make([]byte, 240))

	var handlers []*Handler
	for _, mode := range []string{Proxy, Full} {
		for _, chain := range []string{ChainAuto, ChainAlways} {
			h, err := NewHandler(Config{Mode: mode, ServerIP: serverIP, ScriptURL: scriptTo, Chainload: chain, Netmask: net.CIDRMask(24, 32)},
				&poolOfOne{ips: map[string]net.IP{}}, fetchSet{"52:54:00:aa:bb:01": true})
			if err != nil {
				f.Fatal(err)
			}
			handlers = append(handlers, h)
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		req, err := dhcpv4.FromBytes(data)
		if err != nil {
			return
		}
		for _, h := range handlers {
			for _, port := range []int{67, 4011} {
				reply, _, err := h.Reply(context.Background(), req, port)
				if err != nil || reply == nil {
					continue
				}
				if _, err := dhcpv4.FromBytes(reply.ToBytes()); err != nil {
					t.Fatalf("reply does not parse: %v\n%s", err, reply.Summary())
				}
			}
		}
	})
}
