package main

import (
	"fmt"
	"time"

	"github.com/spf13/pflag"

	"github.com/herdhq/herd/agent"
	"github.com/herdhq/herd/lib/volume"
	"github.com/herdhq/herd/lib/volume/rbd"
)

// storageFlags choose the volume backend: Ceph RBD with --ceph-conf, else a directory.
type storageFlags struct {
	volDir  string
	conf    string
	user    string
	keyring string
	timeout time.Duration
}

func (s *storageFlags) add(fs *pflag.FlagSet, defaultUser string, withDir bool) {
	if withDir {
		fs.StringVar(&s.volDir, "volume-dir", "/var/lib/herd/volumes", "root of the shared directory holding VM disks (when no --ceph-conf)")
	}
	fs.StringVar(&s.conf, "ceph-conf", "", "ceph.conf of the cluster holding VM disks (RBD); empty: directory disks")
	fs.StringVar(&s.user, "ceph-user", defaultUser, "cephx user (without client.)")
	fs.StringVar(&s.keyring, "ceph-keyring", "", "keyring with the user's key (default: the one ceph.conf names)")
	fs.DurationVar(&s.timeout, "ceph-timeout", 10*time.Second, "bound on every Ceph operation")
}

// backend builds the configured backend; nil, nil when a coordinator has none.
func (s *storageFlags) backend(pools []string) (volume.Backend, error) {
	if s.conf == "" {
		if s.volDir == "" {
			return nil, nil
		}
		return volume.Dir{Root: s.volDir}, nil
	}
	return rbd.New(rbd.Config{ConfFile: s.conf, User: s.user, Keyring: s.keyring, Timeout: s.timeout, Pools: pools})
}

// key reads the cephx key an agent hands to libvirt.
func (s *storageFlags) key() (string, error) {
	if s.conf == "" {
		return "", nil
	}
	if s.keyring == "" {
		return "", fmt.Errorf("--ceph-keyring is required with --ceph-conf: QEMU needs the key as a libvirt secret")
	}
	return agent.ReadCephKey(s.keyring, s.user)
}
