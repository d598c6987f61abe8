package rbac

import (
	"fmt"
	"strings"

	"github.com/herdhq/herd/lib/keys"
)

// Access is what a subject may do with a key: nothing, read it, or read, write and delete it
// (etcd's write permission covers puts and deletes alike).
type Access int

const (
	None Access = iota
	Read
	ReadWrite
)

func (a Access) String() string { return [...]string{"-", "r", "rw"}[a] }

// Subjects of the matrix, in its column order: the fixed roles, and a node acting on its own keys
// and on another node's.
var Subjects = []string{"coordinator", "operator", "bootserver", "viewer", "node (own)", "node (other)"}

// SubjectRole is the etcd role a subject acts with (nodes: the role of SampleNode).
func SubjectRole(subject string) string {
	switch subject {
	case "coordinator":
		return Coordinator
	case "operator":
		return Operator
	case "bootserver":
		return Bootserver
	case "viewer":
		return Viewer
	}
	return NodeUser(SampleNode)
}

// SampleNode and OtherNode are the hardware ids the matrix's node-scoped keys are spelled with: a
// node's own keys, and another node's.
const (
	SampleNode = "52:54:00:00:00:01"
	OtherNode  = "52:54:00:00:00:02"
)

// Area is one part of the keyspace: a sample key in it (hwid names the node it concerns, for
// node-scoped keys) and what each subject may do there.
type Area struct {
	Name   string
	Key    func(s keys.Space, hwid string) string
	Access [6]Access // by Subjects
	Note   string
}

const (
	n  = None
	r  = Read
	rw = ReadWrite
)

// Matrix is herd's authority, stated once: who may do what where. Roles and NodePerms must grant
// exactly this (a test tries every cell against a real etcd), and docs/security.md shows it.
var Matrix = []Area{
	{"cluster", func(s keys.Space, _ string) string { return s.Cluster() }, [6]Access{rw, r, n, r, r, r}, "cluster id and pools (the first coordinator)"},
	{"hardware/HWID", func(s keys.Space, h string) string { return s.Hardware(h) }, [6]Access{rw, rw, r, r, r, n}, "the allow-list (operators)"},
	{"nodespec/HWID", func(s keys.Space, h string) string { return s.NodeSpec(h) }, [6]Access{rw, rw, n, r, n, n}, "operators' wishes for a node: cordon, drain, pin"},
	{"nodes/HWID", func(s keys.Space, h string) string { return s.Node(h) }, [6]Access{rw, r, n, r, rw, n}, "the node's registration (its agent, under a lease)"},
	{"nodestate/HWID", func(s keys.Space, h string) string { return s.NodeState(h) }, [6]Access{rw, r, r, r, n, n}, "what the leader knows and decided of a node"},
	{"vms/NAME/spec", func(s keys.Space, _ string) string { return s.VMSpec("web1") }, [6]Access{rw, rw, n, r, r, r}, "desired VMs (operators)"},
	{"vms/NAME/migrate", func(s keys.Space, _ string) string { return s.VMMigrate("web1") }, [6]Access{rw, rw, n, r, r, r}, "operators' move requests"},
	{"placements/NAME", func(s keys.Space, _ string) string { return s.Placement("web1") }, [6]Access{rw, r, n, r, r, r}, "where each VM runs (the leader)"},
	{"problems/NAME", func(s keys.Space, _ string) string { return s.Problem("web1") }, [6]Access{rw, r, n, r, n, n}, "why a VM is not where it should be (the leader)"},
	{"assign/HWID/NAME", func(s keys.Space, h string) string { return s.Assign(h, "web1") }, [6]Access{rw, r, n, r, r, n}, "each node's work list (the leader)"},
	{"status/HWID/NAME", func(s keys.Space, h string) string { return s.Status(h, "web1") }, [6]Access{rw, r, n, r, rw, n}, "what each node reports"},
	{"fence/HWID/BOOT", func(s keys.Space, h string) string { return s.Fence(h, "boot1") }, [6]Access{rw, r, n, r, r, n}, "the commit point of a boot's death (the leader)"},
	{"lossguard", func(s keys.Space, _ string) string { return s.LossGuard() }, [6]Access{rw, r, n, r, n, n}, "failover held by the mass-failure guard (the leader)"},
	{"requests/...", func(s keys.Space, h string) string { return s.FenceClearRequest(h, "boot1") }, [6]Access{rw, rw, n, r, n, n}, "operators' one-shot requests: clear a fence, confirm a loss, purge a disk"},
	{"rollout", func(s keys.Space, _ string) string { return s.Rollout() }, [6]Access{rw, rw, n, r, n, n}, "the rolling upgrade an operator asked for"},
	{"rolloutstatus", func(s keys.Space, _ string) string { return s.RolloutStatus() }, [6]Access{rw, r, n, r, n, n}, "its progress (the leader)"},
	{"images/VERSION", func(s keys.Space, _ string) string { return s.Image("v1") }, [6]Access{rw, rw, r, r, n, n}, "the image catalogue (operators)"},
	{"volumes/POOL/IMAGE", func(s keys.Space, _ string) string { return s.Volume("rbd", "web1.7") }, [6]Access{rw, r, n, r, n, n}, "disks the leader made"},
	{"networks/NAME", func(s keys.Space, _ string) string { return s.Network("prod") }, [6]Access{rw, rw, n, r, n, n}, "the networks VMs attach to (operators)"},
	{"addresses/NET/IP", func(s keys.Space, _ string) string { return s.Address("prod", "10.20.0.17") }, [6]Access{rw, r, n, r, n, n}, "the address each VM's NIC holds (the leader)"},
	{"vmimages/NAME", func(s keys.Space, _ string) string { return s.VMImage("debian-12") }, [6]Access{rw, rw, n, r, n, n}, "VM images to import, which disks clone (operators)"},
	{"vmimagestatus/NAME", func(s keys.Space, _ string) string { return s.VMImageStatus("debian-12") }, [6]Access{rw, r, n, r, n, n}, "how each image's import went (the leader)"},
	{"nodecmd/HWID/ID", func(s keys.Space, h string) string { return s.NodeCmd(h, "r1-1") }, [6]Access{rw, r, n, r, rw, n}, "commands for a node (the leader), results (the node)"},
	{"consoles/HWID/ID", func(s keys.Space, h string) string { return s.ConsoleTicket(h, "t1") }, [6]Access{rw, rw, n, r, r, n}, "operators' tickets to type into a VM's serial console on that node"},
	{"jointokens/HASH", func(s keys.Space, _ string) string { return s.JoinToken("ab12") }, [6]Access{rw, rw, rw, r, n, n}, "one-time join tokens (hashes)"},
	{"discovered/MAC", func(s keys.Space, _ string) string { return s.Discovered("52:54:00:aa:00:01") }, [6]Access{rw, rw, rw, r, n, n}, "unknown machines that tried to boot"},
	{"dhcp/...", func(s keys.Space, _ string) string { return s.DHCPLease("52:54:00:aa:00:01") }, [6]Access{rw, r, rw, r, n, n}, "the full-mode DHCP pool"},
	{"bootservers/NAME", func(s keys.Space, _ string) string { return s.Bootserver("bs1") }, [6]Access{rw, r, rw, r, n, n}, "where bootservers serve"},
	{"events/coordinator/...", func(s keys.Space, _ string) string { return s.EventWriterPrefix(keys.EventsByCoordinator) + "x" }, [6]Access{rw, r, n, r, n, n}, "the audit trail, one prefix per writer"},
	{"events/operator/...", func(s keys.Space, _ string) string { return s.EventWriterPrefix(keys.EventsByOperator) + "x" }, [6]Access{rw, rw, n, r, n, n}, ""},
	{"events/bootserver/...", func(s keys.Space, _ string) string { return s.EventWriterPrefix(keys.EventsByBootserver) + "x" }, [6]Access{rw, r, rw, r, n, n}, ""},
	{"events/node/HWID/...", func(s keys.Space, h string) string { return s.EventWriterPrefix(keys.EventsByNode(h)) + "x" }, [6]Access{rw, r, n, r, rw, n}, ""},
	{"leader/...", func(s keys.Space, _ string) string { return s.Election() + "/7587" }, [6]Access{rw, r, n, r, n, n}, "the coordinators' election"},
}

// KeyFor is the sample key of an area a subject acts on: a node's own, or another node's.
func (a Area) KeyFor(s keys.Space, subject string) string {
	if subject == "node (other)" {
		return a.Key(s, OtherNode)
	}
	return a.Key(s, SampleNode)
}

// MatrixMarkdown renders Matrix for docs/security.md.
func MatrixMarkdown() string {
	var b strings.Builder
	b.WriteString("| keys under /herd/ | " + strings.Join(Subjects, " | ") + " | what |\n")
	b.WriteString("|---" + strings.Repeat("|---", len(Subjects)) + "|---|\n")
	for _, a := range Matrix {
		cells := make([]string, len(Subjects))
		for i, x := range a.Access {
			cells[i] = x.String()
		}
		fmt.Fprintf(&b, "| `%s` | %s | %s |\n", a.Name, strings.Join(cells, " | "), a.Note)
	}
	return b.String()
}
