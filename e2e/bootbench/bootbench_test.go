// Package bootbench measures the boot server under a storm of clients, and its TFTP and HTTP
// throughput next to dnsmasq and nginx on the same files, in the same run. It runs inside a network
// namespace that scripts/bench-boot.sh makes (`just bench`).
package bootbench

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/dhcpv4/server4"
	"github.com/pin/tftp/v3"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/herdhq/herd/e2e/rig"
	"github.com/herdhq/herd/lib/images"
	"github.com/herdhq/herd/lib/keys"
)

const (
	clients  = 200
	herdIP   = "10.98.0.1"
	otherIP  = "10.98.0.3" // dnsmasq and nginx
	kernelMB = 14
	initrdMB = 35
)

var space = keys.MustSpace("/herd")

func writeRandom(b *testing.B, path string, mb int) {
	buf := make([]byte, mb<<20)
	_, _ = rand.Read(buf)
	if err := os.WriteFile(path, buf, 0o644); err != nil {
		b.Fatal(err)
	}
}

func BenchmarkBootStorm(b *testing.B) {
	srvIf, cliIf := os.Getenv("HERD_BENCH_SERVER_IF"), os.Getenv("HERD_BENCH_CLIENT_IF")
	if srvIf == "" || cliIf == "" {
		b.Fatal("run through `just bench`: scripts/bench-boot.sh makes the network namespace this needs")
	}
	rig.RequireHost(b, "dnsmasq", "nginx")
	dir := b.TempDir()
	bins, err := rig.Build(dir)
	if err != nil {
		b.Fatal(err)
	}
	ipxeDir, imgDir := filepath.Join(dir, "ipxe"), filepath.Join(dir, "images")
	_ = os.MkdirAll(ipxeDir, 0o755)
	_ = os.MkdirAll(filepath.Join(imgDir, "v1"), 0o755)
	undi, err := os.ReadFile("/usr/lib/ipxe/undionly.kpxe")
	if err != nil {
		b.Fatal(err)
	}
	_ = os.WriteFile(filepath.Join(ipxeDir, "undionly.kpxe"), undi, 0o644)
	writeRandom(b, filepath.Join(imgDir, "v1", "vmlinuz"), kernelMB)
	writeRandom(b, filepath.Join(imgDir, "v1", "initrd.gz"), initrdMB)
	_ = os.Chmod(dir, 0o755)

	etcd := "http://" + herdIP + ":2379"
	rig.Start(b, dir, "etcd", bins.Herd, "etcd", "--data-dir", filepath.Join(dir, "etcd"), "--listen-client", etcd,
		"--listen-peer", "http://127.0.0.1:2380", "--unsafe-no-fsync")
	c, err := clientv3.New(clientv3.Config{Endpoints: []string{etcd}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	rig.Eventually(b, 30*time.Second, "etcd", func() error { _, err := c.Get(ctx, "x"); return err })
	k, _ := images.Describe(filepath.Join(imgDir, "v1", "vmlinuz"))
	i, _ := images.Describe(filepath.Join(imgDir, "v1", "initrd.gz"))
	mustPut(b, c, space.Image("v1"), keys.MustEncode(&keys.Image{Kernel: k, Initrd: i, Created: time.Now()}))
	mustPut(b, c, space.ImageCurrent(), keys.MustEncode(&keys.ImageCurrent{Version: "v1"}))
	macs := make([]net.HardwareAddr, clients)
	for n := range macs {
		macs[n] = net.HardwareAddr{0x52, 0x54, 0x00, 0xbe, byte(n >> 8), byte(n)}
		mustPut(b, c, space.Hardware(macs[n].String()), keys.MustEncode(&keys.Hardware{MAC: macs[n].String()}))
	}

	rig.Start(b, dir, "bootserver", bins.Herd, "bootserver", "--endpoints", etcd, "--interface", srvIf,
		"--dhcp-mode", "full", "--range", "10.98.0.10-10.98.0.250", "--http", herdIP+":8080", "--tftp", herdIP+":69",
		"--tftp-max-per-client", "1000", // every simulated client sends from one address; dnsmasq has no such limit
		"--listen", "127.0.0.1:0", "--ipxe-dir", ipxeDir, "--image-dir", imgDir, "--log-level", "warn")
	rig.Start(b, dir, "dnsmasq", "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
		"--listen-address="+otherIP, "--bind-interfaces", "--enable-tftp", "--tftp-root="+ipxeDir, "--user=root",
		"--pid-file="+filepath.Join(dir, "dnsmasq.pid"), "--log-facility=-")
	conf := filepath.Join(dir, "nginx.conf")
	_ = os.WriteFile(conf, []byte(fmt.Sprintf(`daemon off; worker_processes 2; user root; pid %s/nginx.pid; error_log stderr warn;
events { worker_connections 1024; }
http { access_log off; sendfile on; server { listen %s:8080; root %s; } }
`, dir, otherIP, imgDir)), 0o644)
	rig.Start(b, dir, "nginx", "nginx", "-c", conf, "-p", dir)
	rig.Eventually(b, 30*time.Second, "bootserver serves v1", func() error {
		resp, err := http.Head("http://" + herdIP + ":8080/images/v1/vmlinuz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("%s", resp.Status)
		}
		return nil
	})

	// The storm: every client does DHCP, TFTP of its first stage, then the iPXE script and both
	// image files over HTTP, all at once.
	dc, err := newDHCPClient(cliIf)
	if err != nil {
		b.Fatal(err)
	}
	defer dc.close()
	var ok, failed atomic.Int64
	var firstErr atomic.Value
	start := time.Now()
	var wg sync.WaitGroup
	for _, mac := range macs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := boot(dc, mac); err != nil {
				failed.Add(1)
				firstErr.CompareAndSwap(nil, err)
				return
			}
			ok.Add(1)
		}()
	}
	wg.Wait()
	storm := time.Since(start)
	if e := firstErr.Load(); e != nil {
		b.Logf("first failure: %v", e)
	}
	b.Logf("boot storm: %d clients in %s, %d ok, %d failed", clients, storm.Round(time.Millisecond), ok.Load(), failed.Load())
	b.ReportMetric(storm.Seconds(), "storm-s")
	b.ReportMetric(float64(failed.Load()), "failures")
	if failed.Load() > 0 {
		b.Fatalf("%d of %d clients failed to boot", failed.Load(), clients)
	}

	// Each pair is measured three times, alternating, and each figure is the mean of its three:
	// whoever went first used to pay for the warm-up, and single runs here spread by +/- 20 %.
	var herdTFTP, dnsmasqTFTP, herdHTTP, nginxHTTP float64
	for range rounds {
		herdTFTP += tftpThroughput(b, herdIP, len(undi)) / rounds
		dnsmasqTFTP += tftpThroughput(b, otherIP, len(undi)) / rounds
		herdHTTP += httpThroughput(b, "http://"+herdIP+":8080/images/v1/initrd.gz", initrdMB<<20) / rounds
		nginxHTTP += httpThroughput(b, "http://"+otherIP+":8080/v1/initrd.gz", initrdMB<<20) / rounds
	}
	b.Logf("TFTP %d x undionly.kpxe: herd %.1f MB/s, dnsmasq %.1f MB/s (mean of %d, alternating)", clients, herdTFTP, dnsmasqTFTP, rounds)
	b.Logf("HTTP %d x initrd (%d MiB): herd %.0f MB/s, nginx %.0f MB/s (mean of %d, alternating)", clients, initrdMB, herdHTTP, nginxHTTP, rounds)
	b.ReportMetric(herdTFTP/dnsmasqTFTP, "tftp-ratio")
	b.ReportMetric(herdHTTP/nginxHTTP, "http-ratio")
}

func mustPut(b *testing.B, c *clientv3.Client, k, v string) {
	if _, err := c.Put(context.Background(), k, v); err != nil {
		b.Fatal(err)
	}
}

// dhcpClient multiplexes many simulated clients over one broadcast socket, matching replies by
// transaction id.
type dhcpClient struct {
	conn    *net.UDPConn
	mu      sync.Mutex
	waiting map[dhcpv4.TransactionID]chan *dhcpv4.DHCPv4
}

func newDHCPClient(ifname string) (*dhcpClient, error) {
	conn, err := server4.NewIPv4UDPConn(ifname, &net.UDPAddr{IP: net.IPv4zero, Port: 68})
	if err != nil {
		return nil, err
	}
	d := &dhcpClient{conn: conn, waiting: map[dhcpv4.TransactionID]chan *dhcpv4.DHCPv4{}}
	go func() {
		buf := make([]byte, 1500)
		for {
			n, _, err := conn.ReadFrom(buf)
			if err != nil {
				return
			}
			m, err := dhcpv4.FromBytes(append([]byte(nil), buf[:n]...))
			if err != nil || m.OpCode != dhcpv4.OpcodeBootReply {
				continue
			}
			d.mu.Lock()
			ch := d.waiting[m.TransactionID]
			d.mu.Unlock()
			if ch != nil {
				select {
				case ch <- m:
				default:
				}
			}
		}
	}()
	return d, nil
}

func (d *dhcpClient) close() { d.conn.Close() }

// exchange sends req (retrying) until a reply of type want comes.
func (d *dhcpClient) exchange(req *dhcpv4.DHCPv4, want dhcpv4.MessageType) (*dhcpv4.DHCPv4, error) {
	ch := make(chan *dhcpv4.DHCPv4, 4)
	d.mu.Lock()
	d.waiting[req.TransactionID] = ch
	d.mu.Unlock()
	defer func() { d.mu.Lock(); delete(d.waiting, req.TransactionID); d.mu.Unlock() }()
	for attempt := 0; attempt < 5; attempt++ {
		if _, err := d.conn.WriteTo(req.ToBytes(), &net.UDPAddr{IP: net.IPv4bcast, Port: 67}); err != nil {
			return nil, err
		}
		timeout := time.After(2 * time.Second)
		for {
			select {
			case m := <-ch:
				if m.MessageType() == want {
					return m, nil
				}
				continue
			case <-timeout:
			}
			break
		}
	}
	return nil, fmt.Errorf("no %s for %s", want, req.ClientHWAddr)
}

var kernelRE = regexp.MustCompile(`(?m)^kernel (\S+)`)
var initrdRE = regexp.MustCompile(`(?m)^initrd (\S+)`)

func boot(d *dhcpClient, mac net.HardwareAddr) error {
	pxe := dhcpv4.WithOption(dhcpv4.OptClassIdentifier("PXEClient:Arch:00000:UNDI:002001"))
	disc, err := dhcpv4.NewDiscovery(mac, pxe)
	if err != nil {
		return err
	}
	offer, err := d.exchange(disc, dhcpv4.MessageTypeOffer)
	if err != nil {
		return err
	}
	req, err := dhcpv4.NewRequestFromOffer(offer, pxe)
	if err != nil {
		return err
	}
	ack, err := d.exchange(req, dhcpv4.MessageTypeAck)
	if err != nil {
		return err
	}
	tc, err := tftp.NewClient(ack.ServerIPAddr.String() + ":69")
	if err != nil {
		return err
	}
	tc.SetTimeout(2 * time.Second)
	tc.SetRetries(10)
	tc.SetBlockSize(1428)
	wt, err := tc.Receive(ack.BootFileName, "octet")
	if err != nil {
		return fmt.Errorf("tftp %s: %w", ack.BootFileName, err)
	}
	if _, err := wt.WriteTo(io.Discard); err != nil {
		return fmt.Errorf("tftp %s: %w", ack.BootFileName, err)
	}
	base := "http://" + herdIP + ":8080"
	script, err := get(base + "/ipxe?mac=" + strings.ReplaceAll(mac.String(), ":", "-"))
	if err != nil {
		return err
	}
	k, i := kernelRE.FindStringSubmatch(script), initrdRE.FindStringSubmatch(script)
	if k == nil || i == nil {
		return fmt.Errorf("no boot script for %s: %s", mac, script)
	}
	for _, u := range []string{k[1], i[1]} {
		if _, err := get(u); err != nil {
			return err
		}
	}
	return nil
}

func get(url string) (string, error) {
	resp, err := http.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return "", fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	if strings.Contains(url, "/ipxe?") {
		b, err := io.ReadAll(resp.Body)
		return string(b), err
	}
	_, err = io.Copy(io.Discard, resp.Body)
	return "", err
}

// rounds is how many times each throughput is measured.
const rounds = 3

// tftpThroughput fetches undionly.kpxe clients times in parallel from server:69; MB/s.
func tftpThroughput(b *testing.B, server string, size int) float64 {
	start := time.Now()
	var wg sync.WaitGroup
	var failed atomic.Int64
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tc, err := tftp.NewClient(server + ":69")
			if err != nil {
				failed.Add(1)
				return
			}
			tc.SetBlockSize(1428)
			tc.SetTimeout(2 * time.Second)
			tc.SetRetries(10)
			wt, err := tc.Receive("undionly.kpxe", "octet")
			if err == nil {
				_, err = wt.WriteTo(io.Discard)
			}
			if err != nil {
				failed.Add(1)
			}
		}()
	}
	wg.Wait()
	if failed.Load() > 0 {
		b.Logf("tftp from %s: %d failures", server, failed.Load())
	}
	return float64(size) * float64(clients-int(failed.Load())) / time.Since(start).Seconds() / 1e6
}

// httpThroughput fetches url clients times in parallel; MB/s.
func httpThroughput(b *testing.B, url string, size int) float64 {
	start := time.Now()
	var wg sync.WaitGroup
	var failed atomic.Int64
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := get(url); err != nil {
				failed.Add(1)
			}
		}()
	}
	wg.Wait()
	if failed.Load() > 0 {
		b.Logf("http %s: %d failures", url, failed.Load())
	}
	return float64(size) * float64(clients-int(failed.Load())) / time.Since(start).Seconds() / 1e6
}
