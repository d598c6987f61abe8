// Package pki is herd's small certificate authority: a cluster CA, certificates whose common name is
// the etcd user they act as, and signing of node certificate requests at join time.
//
// Certificates are issued by purpose. Every one names its herd role in a URI SAN (urn:herd:role:R).
// Only server roles (etcd, coordinator, bootserver) and live-migration certificates may serve TLS:
// they alone carry server-auth usage and addresses; everything else, nodes included, is client-only
// and names no address, so a stolen node certificate cannot pose as any server. Clients check the
// role of the server they reach (ServerRole): an agent joins only at a coordinator's endpoint, and
// herd's etcd clients reach only an etcd server.
//
// Keys are ECDSA P-256, written with mode 0600.
package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// CA is a loaded certificate authority.
type CA struct {
	Cert    *x509.Certificate
	Key     *ecdsa.PrivateKey
	CertPEM []byte
	// Dir is where the CA's files are.
	Dir string
}

// Files of a CA directory.
const (
	CACert = "ca.crt"
	CAKey  = "ca.key"
)

func newKey() (*ecdsa.PrivateKey, []byte, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		return nil, nil, err
	}
	return k, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}

// InitCA creates a CA in dir; it refuses to overwrite an existing one.
func InitCA(dir, name string, validity time.Duration) (*CA, error) {
	if _, err := os.Stat(filepath.Join(dir, CAKey)); err == nil {
		return nil, fmt.Errorf("a CA already exists in %s; refusing to replace it (see docs/security.md to rotate)", dir)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	key, keyPEM, err := newKey()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"herd"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := writeFile(filepath.Join(dir, CAKey), keyPEM, 0o600); err != nil {
		return nil, err
	}
	if err := writeFile(filepath.Join(dir, CACert), certPEM, 0o644); err != nil {
		return nil, err
	}
	return LoadCA(dir)
}

func writeFile(path string, b []byte, mode os.FileMode) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, mode); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// LoadCA reads a CA directory.
func LoadCA(dir string) (*CA, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, CACert))
	if err != nil {
		return nil, fmt.Errorf("CA certificate: %w", err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, CAKey))
	if err != nil {
		return nil, fmt.Errorf("CA key: %w", err)
	}
	cert, err := ParseCert(certPEM)
	if err != nil {
		return nil, err
	}
	kb, _ := pem.Decode(keyPEM)
	if kb == nil {
		return nil, errors.New("CA key: not PEM")
	}
	key, err := x509.ParseECPrivateKey(kb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("CA key: %w", err)
	}
	return &CA{Cert: cert, Key: key, CertPEM: certPEM, Dir: dir}, nil
}

// ParseCert decodes one PEM certificate.
func ParseCert(b []byte) (*x509.Certificate, error) {
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, errors.New("not a PEM certificate")
	}
	return x509.ParseCertificate(blk.Bytes)
}

// Fingerprint is "sha256:<hex>" of a certificate's DER: what a node pins the CA by.
func Fingerprint(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.Raw)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// Role is what a certificate is for.
type Role string

// Roles. Servers: etcd, coordinator (its join endpoint), bootserver (its HTTPS). Migration: a
// node's QEMU live-migration endpoint, naming only the address the leader vouches for. The rest
// are clients.
const (
	RoleEtcd        Role = "etcd"
	RoleCoordinator Role = "coordinator"
	RoleBootserver  Role = "bootserver"
	RoleMigration   Role = "migration"
	RoleOperator    Role = "operator"
	RoleViewer      Role = "viewer"
	RoleRoot        Role = "root"
	RoleNode        Role = "node"
)

// serves says whether a role's certificates may serve TLS (server-auth usage, addresses).
func (r Role) serves() bool {
	switch r {
	case RoleEtcd, RoleCoordinator, RoleBootserver, RoleMigration:
		return true
	}
	return false
}

// ParseRole checks a role name.
func ParseRole(s string) (Role, error) {
	switch r := Role(s); r {
	case RoleEtcd, RoleCoordinator, RoleBootserver, RoleMigration, RoleOperator, RoleViewer, RoleRoot, RoleNode:
		return r, nil
	}
	return "", fmt.Errorf("certificate role %q: want etcd, coordinator, bootserver, migration, operator, viewer, root or node", s)
}

const roleURIPrefix = "urn:herd:role:"

// RoleOf is the herd role a certificate names ("" when it names none: not issued by herd).
func RoleOf(c *x509.Certificate) Role {
	for _, u := range c.URIs {
		if r, ok := strings.CutPrefix(u.String(), roleURIPrefix); ok {
			return Role(r)
		}
	}
	return ""
}

func (ca *CA) sign(cn string, role Role, hosts []string, pub any, validity time.Duration) ([]byte, error) {
	if _, err := ParseRole(string(role)); err != nil {
		return nil, err
	}
	if len(hosts) > 0 && !role.serves() {
		return nil, fmt.Errorf("%s certificates are client-only and name no address (got %s): drop --host", role, strings.Join(hosts, ", "))
	}
	roleURI, err := url.Parse(roleURIPrefix + string(role))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: cn, Organization: []string{"herd"}, OrganizationalUnit: []string{string(role)}},
		NotBefore:    time.Now().Add(-5 * time.Minute),
		NotAfter:     time.Now().Add(validity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{roleURI},
	}
	if role.serves() {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
		tmpl.KeyUsage |= x509.KeyUsageKeyEncipherment
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.Key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
}

// Issue makes a key and a certificate for cn (the etcd user) in role, valid for hosts (server
// roles only).
func (ca *CA) Issue(cn string, role Role, hosts []string, validity time.Duration) (certPEM, keyPEM []byte, err error) {
	key, keyPEM, err := newKey()
	if err != nil {
		return nil, nil, err
	}
	certPEM, err = ca.sign(cn, role, hosts, &key.PublicKey, validity)
	return certPEM, keyPEM, err
}

// IssueFiles writes <dir>/<file>.crt and .key.
func (ca *CA) IssueFiles(dir, file, cn string, role Role, hosts []string, validity time.Duration) (string, string, error) {
	certPEM, keyPEM, err := ca.Issue(cn, role, hosts, validity)
	if err != nil {
		return "", "", err
	}
	crt, key := filepath.Join(dir, file+".crt"), filepath.Join(dir, file+".key")
	if err := writeFile(key, keyPEM, 0o600); err != nil {
		return "", "", err
	}
	if err := writeFile(crt, certPEM, 0o644); err != nil {
		return "", "", err
	}
	return crt, key, nil
}

// NewCSR makes a key and a certificate request for cn: the node side of joining.
func NewCSR(cn string) (csrPEM, keyPEM []byte, err error) {
	key, keyPEM, err := newKey()
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), keyPEM, nil
}

// SignCSR signs a request as cn in role, valid for hosts, whatever the request asked for: the
// signer decides who the holder is and what it may do.
func (ca *CA) SignCSR(csrPEM []byte, cn string, role Role, hosts []string, validity time.Duration) ([]byte, error) {
	blk, _ := pem.Decode(csrPEM)
	if blk == nil || blk.Type != "CERTIFICATE REQUEST" {
		return nil, errors.New("not a PEM certificate request")
	}
	csr, err := x509.ParseCertificateRequest(blk.Bytes)
	if err != nil {
		return nil, err
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("certificate request signature: %w", err)
	}
	return ca.sign(cn, role, hosts, csr.PublicKey, validity)
}

// WriteQEMUDir lays a certificate out the way QEMU's migrate_tls_x509_cert_dir wants it: the same
// pair serves as server (incoming migrations) and client (outgoing), both trusting the CA.
func WriteQEMUDir(dir string, caPEM, certPEM, keyPEM []byte) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, f := range []struct {
		name string
		b    []byte
		mode os.FileMode
	}{
		{"ca-cert.pem", caPEM, 0o644},
		{"server-key.pem", keyPEM, 0o600}, {"client-key.pem", keyPEM, 0o600},
		{"server-cert.pem", certPEM, 0o644}, {"client-cert.pem", certPEM, 0o644},
	} {
		if err := writeFile(filepath.Join(dir, f.name), f.b, f.mode); err != nil {
			return err
		}
	}
	return nil
}

// ClientTLS builds a TLS configuration from PEM files: the CA to trust, and an optional client
// certificate and key. The pair is read again whenever the certificate file changes, so a renewed
// or rotated certificate is used by the next connection without restarting the process. The server
// must show a certificate of role server (see ServerRole).
func ClientTLS(caFile, certFile, keyFile string, server ServerRole) (*tls.Config, error) {
	pool, err := Pool(caFile)
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12, VerifyConnection: server.verify}
	if certFile != "" || keyFile != "" {
		kp, err := NewKeyPair(certFile, keyFile)
		if err != nil {
			return nil, err
		}
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return kp.Get() }
	}
	return cfg, nil
}

// Pool reads a CA certificate file into a pool.
func Pool(caFile string) (*x509.CertPool, error) {
	pool := x509.NewCertPool()
	b, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("CA certificate: %w", err)
	}
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("CA certificate %s: no certificate found", caFile)
	}
	return pool, nil
}

// KeyPair is a certificate and key on disk, reloaded when the certificate file's modification time
// or size changes (renewal writes the key first, then the certificate, each by rename).
type KeyPair struct {
	certFile, keyFile string

	mu    sync.Mutex
	stamp string
	pair  *tls.Certificate
}

// NewKeyPair loads the pair once, so a bad file is reported at start-up, not at first connection.
func NewKeyPair(certFile, keyFile string) (*KeyPair, error) {
	kp := &KeyPair{certFile: certFile, keyFile: keyFile}
	if _, err := kp.Get(); err != nil {
		return nil, err
	}
	return kp, nil
}

// Get returns the current pair, reloading it if the certificate file changed. A reload that fails
// (a half-written file) keeps serving the previous pair.
func (kp *KeyPair) Get() (*tls.Certificate, error) {
	kp.mu.Lock()
	defer kp.mu.Unlock()
	fi, err := os.Stat(kp.certFile)
	if err != nil {
		if kp.pair != nil {
			return kp.pair, nil
		}
		return nil, fmt.Errorf("certificate: %w", err)
	}
	stamp := fmt.Sprint(fi.ModTime().UnixNano(), fi.Size())
	if kp.pair != nil && stamp == kp.stamp {
		return kp.pair, nil
	}
	pair, err := tls.LoadX509KeyPair(kp.certFile, kp.keyFile)
	if err != nil {
		if kp.pair != nil {
			return kp.pair, nil
		}
		return nil, fmt.Errorf("certificate %s: %w", kp.certFile, err)
	}
	kp.pair, kp.stamp = &pair, stamp
	return kp.pair, nil
}

// CommonName is the CN of the first certificate of a PEM file ("" if unreadable).
func CommonName(certFile string) string {
	b, err := os.ReadFile(certFile)
	if err != nil {
		return ""
	}
	c, err := ParseCert(b)
	if err != nil {
		return ""
	}
	return c.Subject.CommonName
}

// ServerRole is the role a client requires of the server it reaches. Go's verification has
// already checked the chain, the server-auth usage and the name; this adds the role, so that one
// kind of herd server cannot pose as another.
type ServerRole struct {
	Role Role
	// Foreign accepts a certificate that names no herd role at all (an etcd cluster whose server
	// certificates come from another CA tool). A certificate that names another herd role is
	// refused all the same.
	Foreign bool
}

// Server roles clients require.
var (
	EtcdServer        = ServerRole{Role: RoleEtcd, Foreign: true}
	CoordinatorServer = ServerRole{Role: RoleCoordinator}
	BootServer        = ServerRole{Role: RoleBootserver}
)

func (sr ServerRole) verify(cs tls.ConnectionState) error {
	if sr.Role == "" || len(cs.PeerCertificates) == 0 {
		return nil
	}
	got := RoleOf(cs.PeerCertificates[0])
	switch {
	case got == sr.Role:
		return nil
	case got == "" && sr.Foreign:
		return nil
	case got == "":
		return fmt.Errorf("pki: the server's certificate (%s) names no herd role; a %s is expected", cs.PeerCertificates[0].Subject.CommonName, sr.Role)
	}
	return fmt.Errorf("pki: the server's certificate (%s) is a %s certificate, not a %s's: refusing to talk to it", cs.PeerCertificates[0].Subject.CommonName, got, sr.Role)
}
