// Package rbac defines herd's etcd roles and applies them: who may read and write which keys.
// Authority follows the keyspace (keys.SchemaVersion 2): operators write intents under their own
// prefixes, the leader writes its decisions under prefixes only it (and root) may touch, and a
// node's credentials reach only keys under prefixes that name the node. So etcd itself refuses an
// operator who writes a placement and a node that writes another node's keys.
//
// Matrix (matrix.go) states the intended permissions in one table; a test applies Roles to a real
// etcd and tries every cell of it, and docs/security.md carries it as generated.
package rbac

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/keys"
)

// Perm grants a permission on one key, or on a prefix.
type Perm struct {
	Key    string
	Prefix bool
	Type   clientv3.PermissionType
}

func read(k string) Perm { return Perm{Key: k, Type: clientv3.PermissionType(clientv3.PermRead)} }
func readAll(p string) Perm {
	return Perm{Key: p, Prefix: true, Type: clientv3.PermissionType(clientv3.PermRead)}
}
func write(k string) Perm { return Perm{Key: k, Type: clientv3.PermissionType(clientv3.PermReadWrite)} }
func writeAll(p string) Perm {
	return Perm{Key: p, Prefix: true, Type: clientv3.PermissionType(clientv3.PermReadWrite)}
}

// end is the permission's range end as etcd stores it ("" for a single key).
func (p Perm) end() string {
	if p.Prefix {
		return clientv3.GetPrefixRangeEnd(p.Key)
	}
	return ""
}

// Role names. Certificates name the etcd user (CN); users get these roles.
const (
	Coordinator = "herd-coordinator"
	Bootserver  = "herd-bootserver"
	Operator    = "herd-operator"
	Viewer      = "herd-viewer"
	Root        = "root"
)

// Roles are the fixed roles, by name.
func Roles(s keys.Space) map[string][]Perm {
	return map[string][]Perm{
		// The leader decides: everything under the prefix.
		Coordinator: {writeAll(s.All())},
		Bootserver: {
			readAll(s.HardwarePrefix()), readAll(s.ImagePrefix()), readAll(s.NodeStatePrefix()),
			writeAll(s.DiscoveredPrefix()), writeAll(s.Root() + "/dhcp/"), writeAll(s.BootserverPrefix()),
			writeAll(s.JoinTokenPrefix()), writeAll(s.EventWriterPrefix(keys.EventsByBootserver)),
		},
		// Operators say what they want; none of these prefixes holds a decision of the leader.
		Operator: {
			readAll(s.All()),
			writeAll(s.VMPrefix()), writeAll(s.HardwarePrefix()), writeAll(s.NodeSpecPrefix()),
			writeAll(s.ImagePrefix()), writeAll(s.DiscoveredPrefix()), write(s.Rollout()),
			writeAll(s.RequestPrefix()), writeAll(s.JoinTokenPrefix()), writeAll(s.EventWriterPrefix(keys.EventsByOperator)),
			writeAll(s.ConsolePrefix()), writeAll(s.NetworkPrefix()), writeAll(s.VMImagePrefix()),
		},
		Viewer: {readAll(s.All())},
	}
}

// NodeUser is the etcd user (and certificate CN) of a node.
func NodeUser(hwid string) string { return "herd-node:" + hwid }

// NodePerms are what one node may touch: write its own node key, statuses, command results and
// events; read its own assignments, fence records, hardware record, commands and console tickets,
// and what the evidence rule needs (specs, placements, the cluster record).
func NodePerms(s keys.Space, hwid string) []Perm {
	return []Perm{
		write(s.Node(hwid)),
		writeAll(s.StatusPrefix(hwid)),
		readAll(s.AssignPrefix(hwid)),
		readAll(s.FencePrefix(hwid)),
		read(s.Hardware(hwid)),
		readAll(s.Cluster()), // watched through an informer, which ranges over a prefix
		readAll(s.VMPrefix()),
		readAll(s.PlacementPrefix()),
		writeAll(s.NodeCmdPrefix(hwid)),
		writeAll(s.EventWriterPrefix(keys.EventsByNode(hwid))),
		readAll(s.ConsoleTicketPrefix(hwid)),
	}
}

// converge makes role hold exactly perms: it creates the role, revokes what it holds beyond perms
// (a grant an older herd made, or one added by hand) and grants perms. Idempotent.
func converge(ctx context.Context, c *clientv3.Client, role string, perms []Perm) error {
	if _, err := c.RoleAdd(ctx, role); err != nil && !errors.Is(err, rpctypes.ErrRoleAlreadyExist) {
		return fmt.Errorf("role %s: %w", role, err)
	}
	want := map[[2]string]clientv3.PermissionType{}
	for _, p := range perms {
		want[[2]string{p.Key, p.end()}] = p.Type
	}
	got, err := c.RoleGet(ctx, role)
	if err != nil {
		return fmt.Errorf("role %s: %w", role, err)
	}
	for _, p := range got.Perm {
		k := [2]string{string(p.Key), string(p.RangeEnd)}
		if t, ok := want[k]; ok && t == clientv3.PermissionType(p.PermType) {
			delete(want, k)
			continue
		}
		if _, err := c.RoleRevokePermission(ctx, role, k[0], k[1]); err != nil && !errors.Is(err, rpctypes.ErrPermissionNotGranted) {
			return fmt.Errorf("role %s: revoke %s: %w", role, k[0], err)
		}
	}
	for k, t := range want {
		if _, err := c.RoleGrantPermission(ctx, role, k[0], k[1], t); err != nil {
			return fmt.Errorf("role %s on %s: %w", role, k[0], err)
		}
	}
	return nil
}

// EnsureUser makes a certificate-authenticated user (no password) with the roles.
func EnsureUser(ctx context.Context, c *clientv3.Client, user string, roles ...string) error {
	if _, err := c.UserAddWithOptions(ctx, user, "", &clientv3.UserAddOptions{NoPassword: true}); err != nil && !errors.Is(err, rpctypes.ErrUserAlreadyExist) {
		return fmt.Errorf("user %s: %w", user, err)
	}
	for _, r := range roles {
		if _, err := c.UserGrantRole(ctx, user, r); err != nil {
			return fmt.Errorf("user %s role %s: %w", user, r, err)
		}
	}
	return nil
}

// EnsureNode makes the node's role (exactly NodePerms) and user: called by a coordinator when a
// node joins or renews, so a node's permissions follow the herd that serves it.
func EnsureNode(ctx context.Context, c *clientv3.Client, s keys.Space, hwid string) (string, error) {
	user := NodeUser(hwid)
	if err := converge(ctx, c, user, NodePerms(s, hwid)); err != nil {
		return "", err
	}
	return user, EnsureUser(ctx, c, user, user)
}

// Apply makes the fixed roles hold exactly their permissions (revoking what an older herd granted),
// converges every node's role, creates a root user and enables authentication. Run it with a root
// client certificate (or before auth is on), at set-up and after every herd upgrade. Idempotent.
func Apply(ctx context.Context, c *clientv3.Client, s keys.Space) error {
	for name, perms := range Roles(s) {
		if err := converge(ctx, c, name, perms); err != nil {
			return err
		}
	}
	if _, err := c.RoleAdd(ctx, Root); err != nil && !errors.Is(err, rpctypes.ErrRoleAlreadyExist) {
		return err
	}
	if err := EnsureUser(ctx, c, Root, Root); err != nil {
		return err
	}
	roles, err := c.RoleList(ctx)
	if err != nil {
		return fmt.Errorf("list roles: %w", err)
	}
	for _, r := range roles.Roles {
		if hwid, ok := strings.CutPrefix(r, NodeUser("")); ok {
			if err := converge(ctx, c, r, NodePerms(s, hwid)); err != nil {
				return err
			}
		}
	}
	if _, err := c.AuthEnable(ctx); err != nil && !strings.Contains(err.Error(), "already enabled") {
		return fmt.Errorf("enable auth: %w", err)
	}
	return nil
}

// Script renders Apply as etcdctl commands, for operators who set etcd up by hand. Node roles are
// made at join time by the coordinators and are not part of it. Upgrading from a herd whose
// operators could write leader records, it first revokes those grants.
func Script(s keys.Space) string {
	var b strings.Builder
	b.WriteString("#!/bin/sh\n# herd's etcd roles (herd rbac script). Run with root's certificate:\n")
	b.WriteString("#   ETCDCTL_CACERT=ca.crt ETCDCTL_CERT=root.crt ETCDCTL_KEY=root.key ETCDCTL_ENDPOINTS=https://... sh this-file\nset -e\n")
	roles := Roles(s)
	names := make([]string, 0, len(roles))
	for n := range roles {
		names = append(names, n)
	}
	sort.Strings(names)
	b.WriteString("# Grants of schema-1 herd that let operators write leader records, and nodes all events:\n")
	for _, o := range obsolete(s) {
		fmt.Fprintf(&b, "etcdctl role revoke-permission %s%s '%s' 2>/dev/null || true\n", o.role, prefixFlag(o.perm), o.perm.Key)
	}
	for _, n := range names {
		fmt.Fprintf(&b, "etcdctl role add %s || true\n", n)
		for _, p := range roles[n] {
			kind := "read"
			if p.Type == clientv3.PermissionType(clientv3.PermReadWrite) {
				kind = "readwrite"
			}
			fmt.Fprintf(&b, "etcdctl role grant-permission %s%s %s '%s'\n", n, prefixFlag(p), kind, p.Key)
		}
	}
	b.WriteString("etcdctl role add root || true\netcdctl user add root --no-password || true\netcdctl user grant-role root root\n")
	b.WriteString("etcdctl auth enable\n")
	return b.String()
}

func prefixFlag(p Perm) string {
	if p.Prefix {
		return " --prefix"
	}
	return ""
}

type roleGrant struct {
	role string
	perm Perm
}

// obsolete are the grants of schema 1 that schema 2 no longer makes.
func obsolete(s keys.Space) []roleGrant {
	return []roleGrant{
		{Operator, writeAll(s.NodeStatePrefix())}, {Operator, writeAll(s.FenceRoot())}, {Operator, write(s.LossGuard())},
		{Operator, writeAll(s.VolumeRoot())}, {Operator, writeAll(s.EventPrefix())}, {Bootserver, writeAll(s.EventPrefix())},
	}
}

// RolesFor are the etcd roles a certificate issued for a herd role gets. A coordinator is also
// root: it creates each node's user and role when the node joins, which etcd allows only root.
func RolesFor(role string) ([]string, error) {
	switch role {
	case "coordinator":
		return []string{Coordinator, Root}, nil
	case "bootserver":
		return []string{Bootserver}, nil
	case "operator":
		return []string{Operator}, nil
	case "viewer":
		return []string{Viewer}, nil
	case "root":
		return []string{Root}, nil
	}
	return nil, fmt.Errorf("role %q: want coordinator, bootserver, operator, viewer or root", role)
}

// DeleteNode removes a node's user and role: its certificate stops working at once.
func DeleteNode(ctx context.Context, c *clientv3.Client, hwid string) error {
	user := NodeUser(hwid)
	if _, err := c.UserDelete(ctx, user); err != nil && !errors.Is(err, rpctypes.ErrUserNotFound) {
		return fmt.Errorf("delete user %s: %w", user, err)
	}
	if _, err := c.RoleDelete(ctx, user); err != nil && !errors.Is(err, rpctypes.ErrRoleNotFound) {
		return fmt.Errorf("delete role %s: %w", user, err)
	}
	return nil
}
