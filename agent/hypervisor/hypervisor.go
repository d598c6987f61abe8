// Package hypervisor drives libvirt for the agent: it turns a VM's assignment into a domain, starts
// and stops it, and lists what runs. Every call has a timeout, because a wedged libvirtd must not
// hang the reconcile loop.
//
// herd marks the domains it owns with a metadata element in its own XML namespace carrying the VM's
// uid and epoch; domains without it are never touched.
package hypervisor

import (
	"context"
	"encoding/base64"
	"encoding/xml"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"net"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"libvirt.org/go/libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/herdhq/herd/lib/volume"
)

// MetadataNS is herd's namespace in domain metadata.
const MetadataNS = "https://herd.dev/xmlns/vm/1"

// DefaultTimeout bounds one libvirt call.
const DefaultTimeout = 30 * time.Second

// ErrTimeout marks a libvirt call that did not return in time.
var ErrTimeout = errors.New("hypervisor: libvirt call timed out")

// State of a domain, in herd's words.
type State string

const (
	Running State = "running"
	Stopped State = "stopped"
	Paused  State = "paused"
	Crashed State = "crashed"
	Other   State = "other"
)

// Domain is what the agent knows of one libvirt domain.
type Domain struct {
	Name  string `json:"name"`
	UUID  string `json:"uuid"`
	State State  `json:"state"`
	// Managed is true when the domain carries herd's metadata; UID and Epoch are then set.
	Managed bool  `json:"managed"`
	UID     int64 `json:"uid,omitempty"`
	Epoch   int64 `json:"epoch,omitempty"`
	// Cluster is the id of the herd cluster that made the domain.
	Cluster string `json:"cluster,omitempty"`
	// Restarts is the spec's restart generation the domain was last started for.
	Restarts int `json:"restarts,omitempty"`
}

// Spec is everything needed to define a domain.
type Spec struct {
	Cluster   string
	Name      string
	UUID      string
	UID       int64
	Epoch     int64
	Restarts  int
	VCPUs     int
	MemoryMiB int64
	// Disks are the VM's disks, the first one booted from: vda, vdb, ...
	Disks []volume.Attachment
	NICs  []NIC
	// Seed is the VM's cloud-init seed image, attached read-only as a CD-ROM ("": none).
	Seed string
	// Kernel, Initrd and Cmdline boot a kernel directly (paths on this host).
	Kernel, Initrd, Cmdline string
	// Console is the file the serial console appends to; it survives migrations when the path is
	// the same on every node.
	Console string
}

// NIC is one network interface on a bridge.
type NIC struct {
	Bridge string
	MAC    string
	Model  string
	// Target names the tap ("": libvirt's vnetN), for rules that must exist before it does.
	Target string
}

// Info is the host's capacity as libvirt sees it.
type Info struct {
	CPUs      int
	MemoryMiB int64
	Model     string
}

// Libvirt is one connection to one hypervisor. It is safe for concurrent use.
type Libvirt struct {
	uri     string
	timeout time.Duration
	log     hclog.Logger
	domType string

	mu      sync.Mutex
	conn    *libvirt.Connect
	closed  bool
	secrets map[string]string // cephx user -> libvirt secret UUID
	// redial serialises reconnecting after libvirtd went away.
	redial sync.Mutex

	// MigrateTLS encrypts live migration streams with QEMU's native TLS (VIR_MIGRATE_TLS); both
	// ends' qemu.conf must name a migrate_tls_x509_cert_dir. Set before use.
	MigrateTLS bool
}

// Open connects to uri. A test:/// URI is libvirt's test driver: real libvirt code keeping domains in
// memory, private to this connection, which `herd dev` and the tests use as a hypervisor.
// domType is "kvm", "qemu" (TCG) or "" for kvm when /dev/kvm opens, else qemu.
func Open(ctx context.Context, uri, domType string, log hclog.Logger) (*Libvirt, error) {
	h := &Libvirt{uri: uri, timeout: DefaultTimeout, log: log.Named("libvirt")}
	switch {
	case strings.HasPrefix(uri, "test:"):
		h.domType = "test"
	case domType == "kvm" || domType == "qemu":
		h.domType = domType
	case domType != "" && domType != "auto":
		return nil, fmt.Errorf("domain type %q: want auto, kvm or qemu", domType)
	case kvmAvailable():
		h.domType = "kvm"
	default:
		h.domType = "qemu"
	}
	var conn *libvirt.Connect
	err := h.call(ctx, "connect", func() error {
		var err error
		conn, err = libvirt.NewConnect(uri)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("connect to libvirt at %s: %w", uri, err)
	}
	h.conn = conn
	return h, nil
}

func kvmAvailable() bool {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

// URI is the connection's URI.
func (h *Libvirt) URI() string { return h.uri }

// DomainType is the domain type herd defines: test, kvm or qemu (TCG).
func (h *Libvirt) DomainType() string { return h.domType }

// Close ends the connection. For the test driver this loses every domain, like a power cut.
func (h *Libvirt) Close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	if h.conn != nil {
		_, _ = h.conn.Close()
		h.conn = nil
	}
}

// call runs fn with the timeout. libvirt's C calls cannot be cancelled, so a call that times out
// keeps its goroutine until libvirt returns; the caller gets ErrTimeout at once and retries later.
func (h *Libvirt) call(ctx context.Context, op string, fn func() error) error {
	ctx, cancel := context.WithTimeout(ctx, h.timeout)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- fn() }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("%s: %w after %s (%v)", op, ErrTimeout, h.timeout, ctx.Err())
	}
}

// connection returns the connection, connecting again when libvirtd went away (restarted,
// crashed, upgraded): a libvirt connection whose daemon closed it stays dead, and guests outlive
// libvirtd, so the new connection finds them running and the agent adopts them as they are. The
// test driver's state lives in its connection: it is never replaced.
func (h *Libvirt) connection() (*libvirt.Connect, error) {
	h.mu.Lock()
	c, closed := h.conn, h.closed
	h.mu.Unlock()
	if closed {
		return nil, errors.New("hypervisor: connection closed")
	}
	if c != nil && h.domType == "test" {
		return c, nil
	}
	if c != nil {
		if alive, err := c.IsAlive(); err == nil && alive {
			return c, nil
		}
	}
	h.redial.Lock()
	defer h.redial.Unlock()
	h.mu.Lock()
	if h.conn != c || h.closed { // someone else reconnected (or closed) meanwhile
		c, closed = h.conn, h.closed
		h.mu.Unlock()
		if closed || c == nil {
			return nil, errors.New("hypervisor: connection closed")
		}
		return c, nil
	}
	h.mu.Unlock()
	var nc *libvirt.Connect
	if err := h.call(context.Background(), "reconnect", func() error {
		var err error
		nc, err = libvirt.NewConnect(h.uri)
		return err
	}); err != nil {
		return nil, fmt.Errorf("%w: libvirtd at %s: %v", ErrUnreachable, h.uri, err)
	}
	h.mu.Lock()
	old := h.conn
	h.conn = nc
	h.mu.Unlock()
	if old != nil {
		_, _ = old.Close()
	}
	h.log.Warn("libvirtd connection was lost: connected again", "uri", h.uri)
	return nc, nil
}

// ErrUnreachable means libvirtd does not accept connections (it is down or restarting).
var ErrUnreachable = errors.New("hypervisor: libvirtd unreachable")

// Info reads the host's CPUs and memory.
func (h *Libvirt) Info(ctx context.Context) (Info, error) {
	c, err := h.connection()
	if err != nil {
		return Info{}, err
	}
	var ni *libvirt.NodeInfo
	if err := h.call(ctx, "node info", func() error {
		var err error
		ni, err = c.GetNodeInfo()
		return err
	}); err != nil {
		return Info{}, err
	}
	return Info{CPUs: int(ni.Cpus), MemoryMiB: int64(ni.Memory / 1024), Model: ni.Model}, nil
}

// List returns every domain, managed or not.
func (h *Libvirt) List(ctx context.Context) ([]Domain, error) {
	c, err := h.connection()
	if err != nil {
		return nil, err
	}
	var out []Domain
	err = h.call(ctx, "list domains", func() error {
		doms, err := c.ListAllDomains(0)
		if err != nil {
			return err
		}
		defer func() {
			for i := range doms {
				_ = doms[i].Free()
			}
		}()
		out = make([]Domain, 0, len(doms))
		for i := range doms {
			d, err := describe(&doms[i])
			if err != nil {
				if isNoDomain(err) {
					continue // vanished while listing
				}
				return err
			}
			out = append(out, d)
		}
		return nil
	})
	return out, err
}

// Lookup returns the named domain, or nil if there is none.
func (h *Libvirt) Lookup(ctx context.Context, name string) (*Domain, error) {
	c, err := h.connection()
	if err != nil {
		return nil, err
	}
	var out *Domain
	err = h.call(ctx, "lookup "+name, func() error {
		dom, err := c.LookupDomainByName(name)
		if isNoDomain(err) {
			return nil
		}
		if err != nil {
			return err
		}
		defer dom.Free()
		d, err := describe(dom)
		if isNoDomain(err) {
			return nil
		}
		if err != nil {
			return err
		}
		out = &d
		return nil
	})
	return out, err
}

func describe(dom *libvirt.Domain) (Domain, error) {
	var d Domain
	var err error
	if d.Name, err = dom.GetName(); err != nil {
		return d, err
	}
	if d.UUID, err = dom.GetUUIDString(); err != nil {
		return d, err
	}
	st, _, err := dom.GetState()
	if err != nil {
		return d, err
	}
	d.State = stateOf(st)
	meta, err := dom.GetMetadata(libvirt.DOMAIN_METADATA_ELEMENT, MetadataNS, libvirt.DOMAIN_AFFECT_CURRENT)
	if err == nil {
		d.Managed, d.UID, d.Epoch, d.Cluster, d.Restarts = parseMetadata(meta)
	} else if lerr, ok := err.(libvirt.Error); !ok || lerr.Code != libvirt.ERR_NO_DOMAIN_METADATA {
		return d, err
	}
	return d, nil
}

func stateOf(s libvirt.DomainState) State {
	switch s {
	case libvirt.DOMAIN_RUNNING, libvirt.DOMAIN_BLOCKED:
		return Running
	case libvirt.DOMAIN_SHUTOFF, libvirt.DOMAIN_NOSTATE:
		return Stopped
	case libvirt.DOMAIN_PAUSED, libvirt.DOMAIN_PMSUSPENDED:
		return Paused
	case libvirt.DOMAIN_CRASHED:
		return Crashed
	case libvirt.DOMAIN_SHUTDOWN:
		return Running // shutting down: still running until it is off
	}
	return Other
}

func isNoDomain(err error) bool {
	var lerr libvirt.Error
	return errors.As(err, &lerr) && lerr.Code == libvirt.ERR_NO_DOMAIN
}

// metadataXML is herd's element, without namespace prefix (SetMetadata adds it).
func metadataXML(s Spec) string {
	var b strings.Builder
	_ = xml.EscapeText(&b, []byte(s.Cluster))
	return fmt.Sprintf(`<vm uid="%d" epoch="%d" cluster="%s" restarts="%d"/>`, s.UID, s.Epoch, b.String(), s.Restarts)
}

func parseMetadata(s string) (ok bool, uid, epoch int64, cluster string, restarts int) {
	var m struct {
		UID      string `xml:"uid,attr"`
		Epoch    string `xml:"epoch,attr"`
		Cluster  string `xml:"cluster,attr"`
		Restarts int    `xml:"restarts,attr"`
	}
	if err := xml.Unmarshal([]byte(s), &m); err != nil {
		return false, 0, 0, "", 0
	}
	u, err1 := strconv.ParseInt(m.UID, 10, 64)
	e, err2 := strconv.ParseInt(m.Epoch, 10, 64)
	if err1 != nil || err2 != nil {
		return false, 0, 0, "", 0
	}
	return true, u, e, m.Cluster, m.Restarts
}

// DefinedXML is the definition libvirt holds for the domain (as libvirt completed it).
func (h *Libvirt) DefinedXML(ctx context.Context, name string) (string, error) {
	c, err := h.connection()
	if err != nil {
		return "", err
	}
	var out string
	err = h.call(ctx, "xml of "+name, func() error {
		dom, err := c.LookupDomainByName(name)
		if err != nil {
			return err
		}
		defer dom.Free()
		out, err = dom.GetXMLDesc(libvirt.DOMAIN_XML_INACTIVE)
		return err
	})
	return out, err
}

// DomainXML renders the domain definition for spec: virtio disk and NICs, ACPI (so a shutdown is the
// guest's own), the serial console on a pty logged to a file, direct kernel boot if asked.
func (h *Libvirt) DomainXML(s Spec) (string, error) {
	d := &libvirtxml.Domain{
		Type:     h.domType,
		Name:     s.Name,
		UUID:     s.UUID,
		Metadata: &libvirtxml.DomainMetadata{XML: strings.Replace(metadataXML(s), "<vm ", fmt.Sprintf("<herd:vm xmlns:herd=%q ", MetadataNS), 1)},
		Memory:   &libvirtxml.DomainMemory{Value: uint(s.MemoryMiB), Unit: "MiB"},
		VCPU:     &libvirtxml.DomainVCPU{Value: uint(s.VCPUs)},
		OS: &libvirtxml.DomainOS{
			Type:    &libvirtxml.DomainOSType{Type: "hvm"},
			Kernel:  s.Kernel,
			Initrd:  s.Initrd,
			Cmdline: s.Cmdline,
		},
		Devices: &libvirtxml.DomainDeviceList{},
	}
	real := h.domType != "test"
	if real {
		d.OS.Type.Arch = "x86_64"
		d.Features = &libvirtxml.DomainFeatureList{ACPI: &libvirtxml.DomainFeature{}}
		d.OnPoweroff, d.OnReboot, d.OnCrash = "destroy", "restart", "destroy"
		if s.Kernel == "" {
			d.OS.BootDevices = []libvirtxml.DomainBootDevice{{Dev: "hd"}}
		}
	}
	for i, att := range s.Disks {
		disk, err := h.diskXML(s.Name, i, att, real)
		if err != nil {
			return "", err
		}
		d.Devices.Disks = append(d.Devices.Disks, disk)
	}
	if s.Seed != "" {
		// On virtio-scsi: cloud kernels (Debian's, for one) have no AHCI for a SATA CD-ROM, and
		// q35 machines have no IDE; virtio-scsi is in both and on every machine type.
		d.Devices.Controllers = append(d.Devices.Controllers, libvirtxml.DomainController{Type: "scsi", Model: "virtio-scsi"})
		d.Devices.Disks = append(d.Devices.Disks, libvirtxml.DomainDisk{
			Device:   "cdrom",
			Driver:   &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "raw"},
			Source:   &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: s.Seed}},
			Target:   &libvirtxml.DomainDiskTarget{Dev: "sda", Bus: "scsi"},
			ReadOnly: &libvirtxml.DomainDiskReadOnly{},
		})
	}
	for _, n := range s.NICs {
		model := n.Model
		if model == "" {
			model = "virtio"
		}
		iface := libvirtxml.DomainInterface{
			MAC:    &libvirtxml.DomainInterfaceMAC{Address: n.MAC},
			Source: &libvirtxml.DomainInterfaceSource{Bridge: &libvirtxml.DomainInterfaceSourceBridge{Bridge: n.Bridge}},
			Model:  &libvirtxml.DomainInterfaceModel{Type: model},
		}
		if n.Target != "" {
			iface.Target = &libvirtxml.DomainInterfaceTarget{Dev: n.Target}
		}
		d.Devices.Interfaces = append(d.Devices.Interfaces, iface)
	}
	if real && s.Console != "" {
		// A pty, so that an operator can attach (OpenConsole), logged to the file whether anyone is
		// attached or not: the history outlives sessions, restarts and, on a path that is the same
		// everywhere, migrations.
		src := &libvirtxml.DomainChardevSource{Pty: &libvirtxml.DomainChardevSourcePty{}}
		log := &libvirtxml.DomainChardevLog{File: s.Console, Append: "on"}
		port := uint(0)
		d.Devices.Serials = []libvirtxml.DomainSerial{{Source: src, Log: log, Target: &libvirtxml.DomainSerialTarget{Port: &port}}}
		d.Devices.Consoles = []libvirtxml.DomainConsole{{Source: src, Log: log, Target: &libvirtxml.DomainConsoleTarget{Type: "serial", Port: &port}}}
	}
	return d.Marshal()
}

func cephSecretUsage(user string) string { return "client." + user + " secret" }

// EnsureCephSecret defines (idempotently) the libvirt secret of usage "ceph" that QEMU authenticates
// to Ceph with, and sets its value. key is the cephx key as keyrings print it (base64); libvirt
// stores the decoded bytes. The UUID is derived from the user, so every node names it alike.
func (h *Libvirt) EnsureCephSecret(ctx context.Context, user, key string) (string, error) {
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(key))
	if err != nil {
		return "", fmt.Errorf("cephx key of %s is not base64: %w", user, err)
	}
	id := uuid.NewSHA1(uuid.NameSpaceOID, []byte("herd ceph secret client."+user)).String()
	c, err := h.connection()
	if err != nil {
		return "", err
	}
	doc := &libvirtxml.Secret{Ephemeral: "no", Private: "yes", UUID: id,
		Usage: &libvirtxml.SecretUsage{Type: "ceph", Name: cephSecretUsage(user)}}
	x, err := doc.Marshal()
	if err != nil {
		return "", err
	}
	err = h.call(ctx, "define ceph secret", func() error {
		sec, err := c.SecretDefineXML(x, 0)
		if err != nil {
			return err
		}
		defer sec.Free()
		return sec.SetValue(raw, 0)
	})
	if err != nil {
		return "", fmt.Errorf("libvirt secret for client.%s: %w", user, err)
	}
	h.mu.Lock()
	if h.secrets == nil {
		h.secrets = map[string]string{}
	}
	h.secrets[user] = id
	h.mu.Unlock()
	return id, nil
}

// Define creates or updates the persistent definition of a domain. Changes to a running domain
// take effect at its next start, except its herd metadata, which is updated live at once so the
// running domain always says which epoch it belongs to.
func (h *Libvirt) Define(ctx context.Context, s Spec) error {
	c, err := h.connection()
	if err != nil {
		return err
	}
	x, err := h.DomainXML(s)
	if err != nil {
		return err
	}
	return h.call(ctx, "define "+s.Name, func() error {
		dom, err := c.DomainDefineXML(x)
		if err != nil {
			return err
		}
		defer dom.Free()
		active, err := dom.IsActive()
		if err != nil || !active {
			return err
		}
		return dom.SetMetadata(libvirt.DOMAIN_METADATA_ELEMENT, metadataXML(s), "herd", MetadataNS, libvirt.DOMAIN_AFFECT_LIVE)
	})
}

func (h *Libvirt) withDomain(ctx context.Context, op, name string, fn func(*libvirt.Domain) error) error {
	c, err := h.connection()
	if err != nil {
		return err
	}
	return h.call(ctx, op+" "+name, func() error {
		dom, err := c.LookupDomainByName(name)
		if err != nil {
			return err
		}
		defer dom.Free()
		return fn(dom)
	})
}

// Start boots a defined domain; starting a running domain is not an error.
func (h *Libvirt) Start(ctx context.Context, name string) error {
	return h.withDomain(ctx, "start", name, func(d *libvirt.Domain) error {
		if active, err := d.IsActive(); err != nil || active {
			return err
		}
		return d.Create()
	})
}

// Shutdown asks the guest to power off (the ACPI power button); it returns at once.
func (h *Libvirt) Shutdown(ctx context.Context, name string) error {
	return h.withDomain(ctx, "shutdown", name, func(d *libvirt.Domain) error {
		if active, err := d.IsActive(); err != nil || !active {
			return err
		}
		if h.domType == "test" {
			return d.Shutdown()
		}
		return d.ShutdownFlags(libvirt.DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
	})
}

// Migrate moves a running domain live to the libvirtd at peerURI (peer to peer: this daemon talks
// to the other), the memory over tcp to address, persistent there and undefined here. Disks are on
// shared storage: nothing is copied. If ctx ends first the migration job is aborted and the domain
// keeps running here.
func (h *Libvirt) Migrate(ctx context.Context, name, peerURI, address string) error {
	c, err := h.connection()
	if err != nil {
		return err
	}
	dom, err := c.LookupDomainByName(name)
	if err != nil {
		return fmt.Errorf("migrate %s: %w", name, err)
	}
	defer dom.Free()
	params := &libvirt.DomainMigrateParameters{}
	if address != "" {
		params.URISet, params.URI = true, "tcp://"+address
		params.ListenAddressSet, params.ListenAddress = true, address
	}
	flags := libvirt.MIGRATE_LIVE | libvirt.MIGRATE_PEER2PEER | libvirt.MIGRATE_PERSIST_DEST | libvirt.MIGRATE_UNDEFINE_SOURCE
	if h.MigrateTLS {
		flags |= libvirt.MIGRATE_TLS
	}
	done := make(chan error, 1)
	go func() { done <- dom.MigrateToURI3(peerURI, params, flags) }()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("migrate %s to %s: %w", name, peerURI, err)
		}
		return nil
	case <-ctx.Done():
		_ = dom.AbortJob()
		err := <-done
		return fmt.Errorf("migrate %s to %s: aborted (%v): %w", name, peerURI, ctx.Err(), err)
	}
}

// Destroy pulls the plug; destroying a stopped domain is not an error.
func (h *Libvirt) Destroy(ctx context.Context, name string) error {
	return h.withDomain(ctx, "destroy", name, func(d *libvirt.Domain) error {
		if active, err := d.IsActive(); err != nil || !active {
			return err
		}
		return d.Destroy()
	})
}

// Remove destroys (if running) and undefines a domain; a missing domain is not an error.
func (h *Libvirt) Remove(ctx context.Context, name string) error {
	err := h.withDomain(ctx, "remove", name, func(d *libvirt.Domain) error {
		if active, err := d.IsActive(); err != nil {
			return err
		} else if active {
			if err := d.Destroy(); err != nil {
				return err
			}
		}
		return d.Undefine()
	})
	if isNoDomain(err) {
		return nil
	}
	return err
}

// diskXML is the i-th disk of domain name (vda, vdb, ...).
func (h *Libvirt) diskXML(name string, i int, att volume.Attachment, real bool) (libvirtxml.DomainDisk, error) {
	disk := libvirtxml.DomainDisk{
		Device: "disk",
		Target: &libvirtxml.DomainDiskTarget{Dev: "vd" + string(rune('a'+i)), Bus: "virtio"},
	}
	switch att.Kind {
	case "rbd":
		var hosts []libvirtxml.DomainDiskSourceHost
		for _, m := range att.Monitors {
			host, port, err := net.SplitHostPort(m)
			if err != nil {
				return libvirtxml.DomainDisk{}, fmt.Errorf("domain %s: monitor %q: %w", name, m, err)
			}
			hosts = append(hosts, libvirtxml.DomainDiskSourceHost{Name: host, Port: port})
		}
		h.mu.Lock()
		_, defined := h.secrets[att.User]
		h.mu.Unlock()
		if !defined && real {
			return libvirtxml.DomainDisk{}, fmt.Errorf("domain %s: no libvirt secret for cephx user %s (agent started without --ceph-keyring?)", name, att.User)
		}
		disk.Driver = &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "raw", Cache: "none"}
		disk.Source = &libvirtxml.DomainDiskSource{Network: &libvirtxml.DomainDiskSourceNetwork{
			Protocol: "rbd", Name: att.Pool + "/" + att.Image, Hosts: hosts,
			// By usage name: every node defines the secret under the same usage.
			Auth: &libvirtxml.DomainDiskAuth{Username: att.User, Secret: &libvirtxml.DomainDiskSecret{Type: "ceph", Usage: cephSecretUsage(att.User)}},
		}}
	case "file":
		// cache=none: no host page cache, so a migration or a restart elsewhere never reads
		// stale data and libvirt accepts live migration on shared storage.
		disk.Driver = &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "raw", Cache: "none"}
		disk.Source = &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: att.Path}}
	default:
		return libvirtxml.DomainDisk{}, fmt.Errorf("domain %s: disk kind %q not supported", name, att.Kind)
	}
	return disk, nil
}
