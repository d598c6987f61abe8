package qemu

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"libvirt.org/go/libvirt"

	"github.com/herdhq/herd/e2e/rig"
)

// interleaved reports whether a record of the first writer comes after the second writer's first
// record: two writers were active on the disk at once.
func interleaved(recs []rig.Record) (bool, string) {
	if len(recs) == 0 {
		return false, "no records"
	}
	first := recs[0].Writer
	sawSecond := false
	for _, r := range recs {
		if r.Writer != first {
			sawSecond = true
		} else if sawSecond {
			return true, fmt.Sprintf("writer %s at sector %d after the second writer began", first, r.Sector)
		}
	}
	if !sawSecond {
		return false, "only one writer"
	}
	return false, ""
}

type splitLab struct {
	*rig.Lab
	ceph rig.CephConf
	a, b *rig.Host
}

// newSplitLab: Ceph and a coordinator (fencing as asked) in the lab; hosts A and B with storage
// IPs; the writer guest "sb" on host A with an RBD disk, writing records.
func newSplitLab(t *testing.T, fenceArgs ...string) *splitLab {
	l := rig.NewLab(t, bin, 0)
	ceph := l.StartCeph()
	cephArgs := []string{"--ceph-conf", ceph.Conf, "--ceph-user", "admin", "--ceph-keyring", ceph.Keyring}
	l.StartCoordinator(append(append([]string{"--session-ttl", "2s", "--grace", "2s", "--strategy", "binpack", "--pools", "rbd"}, cephArgs...), fenceArgs...)...)
	s := &splitLab{Lab: l, ceph: ceph}
	s.a, s.b = l.AddHost(), l.AddHost()
	for _, h := range []*rig.Host{s.a, s.b} {
		l.MustHerdctl("hw", "add", h.HWID, "--storage-ip", h.IP)
		h.StartAgent(append([]string{"--lease-ttl", "3s"}, cephArgs...)...)
	}
	rig.Eventually(t, 60*time.Second, "nodes ready", func() error {
		if n := strings.Count(l.MustHerdctl("node", "list"), " ready "); n != 2 {
			return fmt.Errorf("%d ready", n)
		}
		return nil
	})
	l.MustHerdctl("node", "cordon", s.b.HWID)
	l.MustHerdctl("vm", "create", "sb", "--memory", "128MiB", "--disk", "1GiB", "--pool", "rbd", "--kernel", l.Guest.Kernel,
		"--initrd", l.Guest.Initrd, "--cmdline", "console=ttyS0 quiet herd.guest=sb herd.writer")
	rig.Eventually(t, 120*time.Second, "writer running on A", func() error {
		if !l.ConsoleHas("sb", "guest sb: rec ") {
			return fmt.Errorf("no records yet")
		}
		return runsOnlyOn(l, "sb", s.a)
	})
	l.MustHerdctl("node", "uncordon", s.b.HWID)
	return s
}

// cutOffA partitions host A from etcd and waits until the VM writes from host B.
func (s *splitLab) cutOffA(t *testing.T) time.Duration {
	start := time.Now()
	s.a.Partition()
	rig.Eventually(t, 120*time.Second, "the VM moved to B and writes there", func() error {
		r := vms(s.Lab)["sb"]
		if r.Placement == nil || r.Placement.Node != s.b.HWID || r.State != "running" {
			return fmt.Errorf("%+v", r)
		}
		if c := s.ReadConsole("sb"); c.Boots < 2 {
			return fmt.Errorf("%d boots", c.Boots)
		}
		return nil
	})
	took := time.Since(start)
	time.Sleep(6 * time.Second) // both writers get their chance
	return took
}

// TestSplitBrainFencing: host A is cut off from etcd but not from Ceph. The leader fences it by
// blocklisting its storage address, then restarts the VM on B, which continues the records. On the
// disk, every record of the old writer precedes the new writer's first: there were never two
// writers; the old guest saw I/O errors. Healing: A stops its stale domain and stays unschedulable
// until it "reboots" (a new boot id), after which its blocklist entry is gone.
func TestSplitBrainFencing(t *testing.T) {
	s := newSplitLab(t, "--fence-ceph")
	took := s.cutOffA(t)
	t.Logf("partition -> fenced -> VM running on B: %s", took.Round(100*time.Millisecond))
	recs := rig.Records(s.Disk(s.ceph, "rbd/"+diskOf(s.Lab, "sb"), 1<<20))
	if bad, why := interleaved(recs); bad || why != "" {
		t.Fatalf("two writers on the disk: %v %s (%d records)", bad, why, len(recs))
	}
	if !s.ConsoleHas("sb", "guest sb: write error") {
		t.Fatal("the fenced guest never saw an I/O error")
	}
	if bl := s.Ceph(s.ceph, "osd", "blocklist", "ls"); !strings.Contains(bl, s.a.IP+":0/0") {
		t.Fatalf("blocklist: %s", bl)
	}

	s.a.Heal()
	rig.Eventually(t, 60*time.Second, "A stopped its stale domain and is fenced", func() error {
		doms, err := s.a.Domains()
		if err != nil {
			return err
		}
		if st, ok := doms["sb"]; ok && st == libvirt.DOMAIN_RUNNING {
			return fmt.Errorf("still running on A")
		}
		if out := s.MustHerdctl("node", "list"); !strings.Contains(out, "ready,fenced") {
			return fmt.Errorf("%s", out)
		}
		return nil
	})
	// A reboot: the agent comes back with a new boot id; the fence is undone.
	s.a.Agent.Kill()
	s.a.StartAgent("--lease-ttl", "3s", "--boot-id", uuid.NewString(), "--ceph-conf", s.ceph.Conf, "--ceph-user", "admin", "--ceph-keyring", s.ceph.Keyring)
	rig.Eventually(t, 60*time.Second, "blocklist entry removed after the reboot", func() error {
		if bl := s.Ceph(s.ceph, "osd", "blocklist", "ls"); strings.Contains(bl, s.a.IP) {
			return fmt.Errorf("%s", bl)
		}
		if out := s.MustHerdctl("fence", "list"); strings.Contains(out, s.a.HWID) {
			return fmt.Errorf("fence record left: %s", out)
		}
		return nil
	})
}

// TestSplitBrainWithoutFencing: the same without fencing shows interleaved records, so the test
// above tells fencing from luck.
func TestSplitBrainWithoutFencing(t *testing.T) {
	s := newSplitLab(t, "--unsafe-no-fencing")
	s.cutOffA(t)
	recs := rig.Records(s.Disk(s.ceph, "rbd/"+diskOf(s.Lab, "sb"), 1<<20))
	if bad, why := interleaved(recs); !bad {
		t.Fatalf("without fencing the writers should interleave: %s (%d records)", why, len(recs))
	}
	s.a.Heal()
}

// TestNoStorageIPNoFence: a node without a storage IP cannot be fenced from Ceph: its VMs stay, with
// a problem and an event.
func TestNoStorageIPNoFence(t *testing.T) {
	s := newSplitLab(t, "--fence-ceph")
	// Enrol host A again, without a storage IP (hw add keeps fields it is not given).
	s.MustHerdctl("hw", "rm", s.a.HWID)
	s.MustHerdctl("hw", "add", s.a.HWID)
	s.a.Partition()
	defer s.a.Heal()
	rig.Eventually(t, 90*time.Second, "fence failed, VM stays", func() error {
		r := vms(s.Lab)["sb"]
		if r.Placement == nil || r.Placement.Node != s.a.HWID || r.Problem == nil || !strings.Contains(r.Problem.Message, "storage_ip") {
			return fmt.Errorf("%+v %+v", r, r.Problem)
		}
		return nil
	})
	if ev := s.MustHerdctl("events", "--object", "node/"+s.a.HWID); !strings.Contains(ev, "fence-failed") {
		t.Fatalf("no event:\n%s", ev)
	}
}

// diskOf is the RBD image of a VM: <name>.<uid>.
func diskOf(l *rig.Lab, name string) string {
	out := l.MustHerdctl("volume", "list")
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) > 2 && f[2] == name && strings.Contains(line, "in use") {
			return f[1]
		}
	}
	return ""
}
