package hypervisor

import (
	"context"
	"testing"
)

// TestMemory: the in-memory hypervisor keeps the books the agent relies on: definitions persist
// with herd's metadata, start/shutdown/destroy are idempotent, migration moves a running domain to
// its peer in this process, and a closed peer leaves the domain where it was.
func TestMemory(t *testing.T) {
	ctx := context.Background()
	a, err := NewMemory("a", 8, 1024)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := NewMemory("b", 8, 1024)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewMemory("a", 1, 1); err == nil {
		t.Fatal("two hypervisors named a")
	}
	if info, _ := a.Info(ctx); info.CPUs != 8 || info.MemoryMiB != 1024 {
		t.Fatalf("info %+v", info)
	}
	if err := a.Start(ctx, "vm1"); err == nil {
		t.Fatal("started an undefined domain")
	}
	if err := a.Define(ctx, Spec{Name: "vm1", UID: 7, Epoch: 2, Cluster: "c"}); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := a.Start(ctx, "vm1"); err != nil {
			t.Fatal(err)
		}
	}
	d, _ := a.Lookup(ctx, "vm1")
	if d == nil || d.State != Running || !d.Managed || d.UID != 7 || d.Epoch != 2 || d.Cluster != "c" {
		t.Fatalf("vm1 %+v", d)
	}
	if err := a.Define(ctx, Spec{Name: "vm1", UID: 7, Epoch: 3, Cluster: "c"}); err != nil {
		t.Fatal(err)
	}
	if d, _ = a.Lookup(ctx, "vm1"); d.State != Running || d.Epoch != 3 {
		t.Fatalf("redefined running domain %+v", d)
	}
	if err := a.Migrate(ctx, "vm1", b.URI(), ""); err != nil {
		t.Fatal(err)
	}
	if d, _ = a.Lookup(ctx, "vm1"); d != nil {
		t.Fatalf("still on the source: %+v", d)
	}
	if d, _ = b.Lookup(ctx, "vm1"); d == nil || d.State != Running || d.Epoch != 3 {
		t.Fatalf("on the peer: %+v", d)
	}
	if err := b.Migrate(ctx, "vm1", "qemu+tcp://x/system", ""); err == nil {
		t.Fatal("migrated to libvirt")
	}
	if err := b.Shutdown(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	if err := b.Migrate(ctx, "vm1", a.URI(), ""); err == nil {
		t.Fatal("migrated a stopped domain")
	}
	if err := b.Start(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	c, _ := NewMemory("c", 1, 1)
	c.Close()
	if err := b.Migrate(ctx, "vm1", c.URI(), ""); err == nil {
		t.Fatal("migrated to a closed hypervisor")
	}
	if d, _ = b.Lookup(ctx, "vm1"); d == nil || d.State != Running {
		t.Fatalf("lost by a failed migration: %+v", d)
	}
	if err := b.Remove(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	if list, _ := b.List(ctx); len(list) != 0 {
		t.Fatalf("after remove: %+v", list)
	}
	b.Close()
	if _, err := b.List(ctx); err == nil {
		t.Fatal("a closed hypervisor answered")
	}
}
