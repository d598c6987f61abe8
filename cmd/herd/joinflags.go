package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/pflag"

	"github.com/herdhq/herd/agent"
	"github.com/herdhq/herd/coordinator/join"
	"github.com/herdhq/herd/lib/etcdutil"
	ljoin "github.com/herdhq/herd/lib/join"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/pki"
)

// joinServerFlags configure a coordinator's join endpoint.
type joinServerFlags struct {
	listen, caDir, cert, key string
	certTTL                  time.Duration
	cephUser, cephKeyring    string
	cephConf                 string
}

func (j *joinServerFlags) add(fs *pflag.FlagSet) {
	fs.StringVar(&j.listen, "join-listen", "", "serve the node join endpoint (HTTPS) here, e.g. :9443; needs --ca-dir")
	fs.StringVar(&j.caDir, "ca-dir", "", "the cluster CA's directory (herd pki init): node certificates are signed with it")
	fs.StringVar(&j.cert, "join-cert", "", "the join endpoint's certificate (default --cert: issue it with --host)")
	fs.StringVar(&j.key, "join-key", "", "the join endpoint's key (default --key)")
	fs.DurationVar(&j.certTTL, "node-cert-ttl", join.DefaultCertTTL, "lifetime of node certificates (agents renew at two thirds)")
	fs.StringVar(&j.cephUser, "node-ceph-user", "herd-agent", "cephx user handed to joining nodes (without client.)")
	fs.StringVar(&j.cephKeyring, "node-ceph-keyring", "", "keyring with that user's key; empty: nodes get no Ceph key")
	fs.StringVar(&j.cephConf, "node-ceph-conf", "", "ceph.conf handed to joining nodes (mon_host)")
}

// server builds the endpoint and its listener; nil when --join-listen is empty.
func (j *joinServerFlags) server(eo etcdutil.Options, cfg join.Config) (*join.Server, net.Listener, error) {
	if j.listen == "" {
		return nil, nil, nil
	}
	if j.caDir == "" {
		return nil, nil, errors.New("--join-listen needs --ca-dir")
	}
	if j.cert == "" {
		j.cert, j.key = eo.Cert, eo.Key
	}
	if j.cert == "" {
		return nil, nil, errors.New("--join-listen needs a server certificate: --join-cert/--join-key or --cert/--key")
	}
	ca, err := pki.LoadCA(j.caDir)
	if err != nil {
		return nil, nil, err
	}
	cfg.CA, cfg.CertTTL = ca, j.certTTL
	if j.cephKeyring != "" {
		user, keyring, confFile := j.cephUser, j.cephKeyring, j.cephConf
		if _, err := agent.ReadCephKey(keyring, user); err != nil {
			return nil, nil, fmt.Errorf("--node-ceph-keyring: %w", err)
		}
		cfg.Ceph = func() (*ljoin.CephCredentials, error) {
			// Read on every join, so a rotated key reaches the next node without a restart.
			key, err := agent.ReadCephKey(keyring, user)
			if err != nil {
				return nil, err
			}
			cc := &ljoin.CephCredentials{User: user, Key: key}
			if confFile != "" {
				b, err := os.ReadFile(confFile)
				if err != nil {
					return nil, err
				}
				cc.Conf = string(b)
			}
			return cc, nil
		}
	}
	ln, err := net.Listen("tcp", j.listen)
	if err != nil {
		return nil, nil, fmt.Errorf("--join-listen: %w", err)
	}
	return join.New(cfg), ln, nil
}

// joinClientFlags let an agent join with a one-time token.
type joinClientFlags struct {
	urls          []string
	token, caHash string
	mac           string
	dir           string
	// qemuDir: see ljoin.Client.
	qemuDir string
}

func (j *joinClientFlags) add(fs *pflag.FlagSet) {
	fs.StringSliceVar(&j.urls, "join", nil, "coordinators' join endpoints, e.g. https://10.0.0.7:9443 (herd.join= on the kernel command line): get etcd and Ceph credentials with a join token")
	fs.StringVar(&j.token, "join-token", os.Getenv("HERD_JOIN_TOKEN"), "one-time join token (herd.token=; env HERD_JOIN_TOKEN); not needed while the credentials in --cred-dir are valid")
	fs.StringVar(&j.caHash, "ca-hash", "", "fingerprint the cluster CA must have, sha256:<hex> (herd.ca=)")
	fs.StringVar(&j.mac, "join-mac", "", "this machine's boot NIC MAC, sent with the join (herd.mac=): the boot server binds a token to the machine it served it to (default: herd.mac= or BOOTIF= on the kernel command line)")
	fs.StringVar(&j.dir, "cred-dir", "/run/herd/credentials", "where the node's certificate, key and Ceph keyring are kept")
}

// bootstrap obtains credentials (waiting for a coordinator if none answers yet) and points the etcd
// options and storage flags at them. It returns the client that keeps them renewed.
func (j *joinClientFlags) bootstrap(ctx context.Context, hwid string, eo *etcdutil.Options, st *storageFlags, log hclog.Logger) (*ljoin.Client, error) {
	if len(j.urls) == 0 {
		return nil, nil
	}
	hwid, err := keys.NormalizeHWID(hwid)
	if err != nil {
		return nil, err
	}
	mac := j.mac
	if mac == "" {
		mac = agent.LocalHost().BootMAC()
	}
	jc := &ljoin.Client{URLs: j.urls, CAHash: j.caHash, Dir: j.dir, HWID: hwid, MAC: mac, Log: log.Named("join"), QEMUDir: j.qemuDir}
	if j.caHash == "" {
		jc.CAFile = eo.CACert
	}
	bo := etcdutil.Backoff{Min: time.Second, Max: 30 * time.Second}
	for {
		err := jc.Ensure(ctx, j.token)
		if err == nil {
			break
		}
		var refused *ljoin.RefusedError
		if errors.As(err, &refused) || ctx.Err() != nil {
			return nil, fmt.Errorf("join: %w", err)
		}
		d := bo.Next()
		log.Warn("cannot join yet; retrying", "error", err, "retry_in", d)
		if !etcdutil.Sleep(ctx, d) {
			return nil, ctx.Err()
		}
	}
	eo.CACert, eo.Cert, eo.Key = jc.CAPath(), jc.CertPath(), jc.KeyPath()
	if st.conf == "" && jc.CephConf() != "" {
		st.conf = jc.CephConf()
	}
	if st.keyring == "" && jc.CephKeyring() != "" {
		st.keyring, st.user = jc.CephKeyring(), jc.CephUser()
	}
	return jc, nil
}
