// Package rbac defines herd's etcd roles and applies them: who may read and write which keys. A
// node's credentials reach only keys under prefixes that name the node, so a compromised hypervisor
// cannot change another node's keys, any spec, or any placement: etcd itself refuses.
package rbac

import (
	"context"
	"errors"
	"fmt"
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
		// The leader writes everything under the prefix.
		Coordinator: {writeAll(s.All())},
		Bootserver: {
			readAll(s.HardwarePrefix()), readAll(s.ImagePrefix()), readAll(s.NodeStatePrefix()),
			writeAll(s.DiscoveredPrefix()), writeAll(s.Root() + "/dhcp/"), writeAll(s.BootserverPrefix()),
			writeAll(s.JoinTokenPrefix()), writeAll(s.EventPrefix()),
		},
		Operator: {
			readAll(s.All()),
			writeAll(s.VMPrefix()), writeAll(s.HardwarePrefix()), writeAll(s.NodeStatePrefix()),
			writeAll(s.ImagePrefix()), writeAll(s.DiscoveredPrefix()), writeAll(s.FenceRoot()),
			write(s.LossGuard()), writeAll(s.VolumeRoot()), writeAll(s.EventPrefix()),
			write(s.Rollout()),
		},
		Viewer: {readAll(s.All())},
	}
}

// NodeUser is the etcd user (and certificate CN) of a node.
func NodeUser(hwid string) string { return "herd-node:" + hwid }

// NodePerms are what one node may touch: write its own node key and statuses (and its command
// results), read its own assignments, fence records, hardware record and commands, and read what
// the evidence rule needs (specs, placements, the cluster record). Events are shared.
func NodePerms(s keys.Space, hwid string) []Perm {
	return []Perm{
		write(s.Node(hwid)),
		writeAll(s.StatusPrefix(hwid)),
		readAll(s.AssignPrefix(hwid)),
		readAll(s.FencePrefix(hwid)),
		read(s.Hardware(hwid)),
		read(s.Cluster()),
		readAll(s.VMPrefix()),
		writeAll(s.NodeCmdPrefix(hwid)),
		writeAll(s.EventPrefix()),
	}
}

func grant(ctx context.Context, c *clientv3.Client, role string, perms []Perm) error {
	if _, err := c.RoleAdd(ctx, role); err != nil && !errors.Is(err, rpctypes.ErrRoleAlreadyExist) {
		return fmt.Errorf("role %s: %w", role, err)
	}
	for _, p := range perms {
		end := ""
		if p.Prefix {
			end = clientv3.GetPrefixRangeEnd(p.Key)
		}
		if _, err := c.RoleGrantPermission(ctx, role, p.Key, end, p.Type); err != nil {
			return fmt.Errorf("role %s on %s: %w", role, p.Key, err)
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

// EnsureNode makes the node's role and user: called by a coordinator when a node joins.
func EnsureNode(ctx context.Context, c *clientv3.Client, s keys.Space, hwid string) (string, error) {
	user := NodeUser(hwid)
	if err := grant(ctx, c, user, NodePerms(s, hwid)); err != nil {
		return "", err
	}
	return user, EnsureUser(ctx, c, user, user)
}

// Apply creates the fixed roles and a root user, and enables authentication. Run it once per
// cluster with a root client certificate (or before auth is on). Idempotent.
func Apply(ctx context.Context, c *clientv3.Client, s keys.Space) error {
	for name, perms := range Roles(s) {
		if err := grant(ctx, c, name, perms); err != nil {
			return err
		}
	}
	if _, err := c.RoleAdd(ctx, Root); err != nil && !errors.Is(err, rpctypes.ErrRoleAlreadyExist) {
		return err
	}
	if err := EnsureUser(ctx, c, Root, Root); err != nil {
		return err
	}
	if _, err := c.AuthEnable(ctx); err != nil && !strings.Contains(err.Error(), "already enabled") {
		return fmt.Errorf("enable auth: %w", err)
	}
	return nil
}
