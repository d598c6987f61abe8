package hypervisor

import (
	"context"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/herdhq/herd/lib/volume"
)

func TestLibvirtTestDriverLifecycle(t *testing.T) {
	ctx := context.Background()
	uri, err := WriteTestNode(t.TempDir(), "n1", 8, 16384)
	if err != nil {
		t.Fatal(err)
	}
	h, err := Open(ctx, uri, "", hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	info, err := h.Info(ctx)
	if err != nil || info.CPUs != 8 || info.MemoryMiB != 16384 {
		t.Fatalf("info %+v %v", info, err)
	}
	if d, err := h.Lookup(ctx, "web1"); d != nil || err != nil {
		t.Fatalf("lookup of a missing domain: %v %v", d, err)
	}
	spec := Spec{Cluster: "c-1", Name: "web1", UUID: "6f1b8d4e-3c2a-4b5d-9e8f-0a1b2c3d4e5f", UID: 42, Epoch: 1, VCPUs: 2, MemoryMiB: 512,
		Disks: []volume.Attachment{{Kind: "file", Path: "/var/lib/herd/x.raw"}}}
	if err := h.Define(ctx, spec); err != nil {
		t.Fatal(err)
	}
	if err := h.Start(ctx, "web1"); err != nil {
		t.Fatal(err)
	}
	if err := h.Start(ctx, "web1"); err != nil {
		t.Fatalf("starting a running domain must be a no-op: %v", err)
	}
	spec.Epoch = 2
	if err := h.Define(ctx, spec); err != nil {
		t.Fatal(err)
	}
	doms, err := h.List(ctx)
	if err != nil || len(doms) != 1 {
		t.Fatalf("list %v %v", doms, err)
	}
	d := doms[0]
	if !d.Managed || d.UID != 42 || d.Epoch != 2 || d.State != Running || d.UUID != spec.UUID || d.Cluster != "c-1" {
		t.Fatalf("domain %+v", d)
	}

	// A second connection to the same file is another, empty hypervisor.
	h2, err := Open(ctx, uri, "", hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer h2.Close()
	if doms, _ := h2.List(ctx); len(doms) != 0 {
		t.Fatalf("second connection sees %d domains", len(doms))
	}

	if err := h.Remove(ctx, "web1"); err != nil {
		t.Fatal(err)
	}
	if err := h.Remove(ctx, "web1"); err != nil {
		t.Fatalf("removing a missing domain must be a no-op: %v", err)
	}
	if doms, _ := h.List(ctx); len(doms) != 0 {
		t.Fatalf("domain survived removal: %v", doms)
	}
}

func TestQEMUDomainXML(t *testing.T) {
	h := &Libvirt{domType: "qemu"}
	x, err := h.DomainXML(Spec{Cluster: "c", Name: "web1", UUID: "6f1b8d4e-3c2a-4b5d-9e8f-0a1b2c3d4e5f", UID: 3, Epoch: 2, Restarts: 1,
		VCPUs: 2, MemoryMiB: 256, Kernel: "/k", Initrd: "/i", Cmdline: "console=ttyS0",
		NICs: []NIC{{Bridge: "br0", MAC: "52:54:00:12:34:56"}, {Bridge: "herd-v120", MAC: "52:54:00:12:34:57", Target: "hv3n1"}}, Console: "/var/log/herd/console/web1.log",
		Disks: []volume.Attachment{{Kind: "file", Path: "/v/web1.3.raw"}, {Kind: "file", Path: "/v/web1.3.data.raw"}}, Seed: "/var/lib/herd/seeds/web1-3.iso"})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`<disk type="file" device="cdrom">`, `<target dev="hv3n1">`, `<source bridge="herd-v120">`, `<source file="/var/lib/herd/seeds/web1-3.iso">`, `<target dev="sda" bus="scsi">`, `<controller type="scsi" model="virtio-scsi">`, `<readonly>`,
		`<domain type="qemu">`, `<acpi></acpi>`, `<kernel>/k</kernel>`, `<cmdline>console=ttyS0</cmdline>`,
		`<source bridge="br0">`, `<mac address="52:54:00:12:34:56">`, `<model type="virtio">`,
		`<serial type="pty">`, `<log file="/var/log/herd/console/web1.log" append="on">`, `cache="none"`,
		`uid="3" epoch="2" cluster="c" restarts="1"`,
		`<source file="/v/web1.3.raw"></source>` + "\n" + `      <target dev="vda" bus="virtio">`,
		`<source file="/v/web1.3.data.raw"></source>` + "\n" + `      <target dev="vdb" bus="virtio">`,
	} {
		if !strings.Contains(x, want) {
			t.Errorf("XML lacks %s:\n%s", want, x)
		}
	}
}
