//go:build !agentonly

package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/pki"
	"github.com/herdhq/herd/lib/rbac"
)

// devPKI is herd dev's CA: created in the data directory on first run, reused after.
type devPKI struct {
	dir string
	ca  *pki.CA
}

func newDevPKI(dir string) (*devPKI, error) {
	ca, err := pki.LoadCA(dir)
	if errors.Is(err, fs.ErrNotExist) {
		ca, err = pki.InitCA(dir, "herd dev CA", 10*year)
	}
	if err != nil {
		return nil, fmt.Errorf("dev CA in %s: %w", dir, err)
	}
	return &devPKI{dir: dir, ca: ca}, nil
}

func (p *devPKI) caFile() string { return filepath.Join(p.dir, pki.CACert) }

func (p *devPKI) files(name string) (string, string) {
	return filepath.Join(p.dir, name+".crt"), filepath.Join(p.dir, name+".key")
}

// issue writes a fresh certificate for name in role, valid long enough for any dev session.
func (p *devPKI) issue(name string, role pki.Role, hosts []string) (string, string, error) {
	return p.ca.IssueFiles(p.dir, name, name, role, hosts, 30*24*time.Hour)
}

// options points eo at a certificate for user in role (issued now; a coordinator's also serves
// loopback, for its join endpoint).
func (p *devPKI) options(eo etcdutil.Options, user string, role pki.Role) (etcdutil.Options, error) {
	var hosts []string
	if role == pki.RoleCoordinator {
		hosts = []string{"127.0.0.1", "localhost"}
	}
	crt, key, err := p.issue(user, role, hosts)
	if err != nil {
		return eo, err
	}
	eo.CACert, eo.Cert, eo.Key = p.caFile(), crt, key
	return eo, nil
}

// users creates dev's etcd users: coordinators (which are root: they make node users), an
// operator for herdctl and a viewer to show what read-only means. Their certificates are issued too.
func (p *devPKI) users(ctx context.Context, root *clientv3.Client, coordinators []string) error {
	want := map[string][]string{"dev-operator": {rbac.Operator}, "dev-viewer": {rbac.Viewer}}
	for _, c := range coordinators {
		want[c] = []string{rbac.Coordinator, rbac.Root}
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for u, roles := range want {
		if err := rbac.EnsureUser(cctx, root, u, roles...); err != nil {
			return err
		}
	}
	for u, role := range map[string]pki.Role{"dev-operator": pki.RoleOperator, "dev-viewer": pki.RoleViewer} {
		if _, _, err := p.issue(u, role, nil); err != nil {
			return err
		}
	}
	return nil
}
