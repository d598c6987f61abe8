// Package join is how an anonymous, netbooted hypervisor gets its credentials, the way Kubernetes
// bootstraps kubelets: the bootserver mints a one-time token for each boot of known hardware and
// puts it on the kernel command line (only its hash goes to etcd, under a short lease); the agent
// sends the token with a certificate request to any coordinator's join endpoint; the coordinator
// checks and consumes the token and signs a short-lived node certificate whose common name is the
// node's etcd user. The agent renews that certificate over the same endpoint with the certificate
// itself. The image the node booted carries no secret at all.
//
// The node trusts the endpoint by the CA fingerprint on its command line (herd.ca=sha256:...), like
// kubeadm's --discovery-token-ca-cert-hash, so nothing needs to be baked into the image.
package join

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

// DefaultTokenTTL covers iPXE loading the kernel and initrd and the image coming up, with room.
const DefaultTokenTTL = 15 * time.Minute

// Paths of the join endpoint.
const (
	PathCA    = "/v1/ca"
	PathJoin  = "/v1/join"
	PathRenew = "/v1/renew"
	// PathMigration signs a node's live-migration certificate (for QEMU's TLS), naming the
	// address the leader vouches for.
	PathMigration = "/v1/migration"
)

// Request is the body of a join (token set) or a renewal (token empty, the client certificate
// proves who asks).
type Request struct {
	HWID  string `json:"hwid"`
	Token string `json:"token,omitempty"`
	// MAC is the boot NIC of the joining machine (herd.mac= on its kernel command line): a token
	// bound to a MAC is spent only by a join that names it.
	MAC string `json:"mac,omitempty"`
	// CSR is a PEM certificate request; the signer ignores the name and addresses it asks for.
	CSR string `json:"csr"`
}

// Response carries the node's credentials.
type Response struct {
	// User is the node's etcd user, also its certificate's common name.
	User string `json:"user"`
	Cert string `json:"cert"`
	CA   string `json:"ca"`
	// Ceph is set when the coordinators hand out a Ceph client key for hypervisors.
	Ceph *CephCredentials `json:"ceph,omitempty"`
}

// CephCredentials let the node's QEMU reach RBD disks.
type CephCredentials struct {
	User string `json:"user"` // without "client."
	Key  string `json:"key"`
	// Conf is a ceph.conf (at least mon_host) for nodes that were not booted with one.
	Conf string `json:"conf,omitempty"`
}

// Error is the body of a refused request: a message that says what to do.
type Error struct {
	Error string `json:"error"`
}

// NewToken returns a fresh random token (256 bits, URL- and command-line-safe) and its hash.
func NewToken() (token, hash string) {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(fmt.Sprintf("crypto/rand: %v", err)) // the platform is broken; nothing is safe to do
	}
	token = base64.RawURLEncoding.EncodeToString(b[:])
	return token, Hash(token)
}

// Hash is the key under which a token is stored: etcd never holds a usable token.
func Hash(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// Grant is what a join token lets its holder do: join once as HWID, within TTL, and, when MAC is
// set, only from the machine whose boot NIC that is (the boot script names it: herd.mac=).
type Grant struct {
	HWID     string
	MAC      string
	TTL      time.Duration
	IssuedBy string
}

// Mint stores a new token for g and returns it. The record sits on its own lease, so an unused
// token disappears by itself.
func Mint(ctx context.Context, c *clientv3.Client, space keys.Space, g Grant) (string, error) {
	if g.TTL < 10*time.Second {
		return "", fmt.Errorf("join token ttl %s is too short to boot with", g.TTL)
	}
	token, hash := NewToken()
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	l, err := c.Grant(cctx, int64(g.TTL/time.Second))
	if err != nil {
		return "", fmt.Errorf("mint join token for %s: grant lease: %w", g.HWID, err)
	}
	rec := &keys.JoinToken{HWID: g.HWID, MAC: g.MAC, Expires: time.Now().Add(g.TTL).UTC().Truncate(time.Second), IssuedBy: g.IssuedBy}
	if _, err := c.Put(cctx, space.JoinToken(hash), keys.MustEncode(rec), clientv3.WithLease(l.ID)); err != nil {
		return "", fmt.Errorf("mint join token for %s: %w", g.HWID, err)
	}
	return token, nil
}
