package join

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/pki"
	"github.com/herdhq/herd/lib/rbac"
)

// Files the client keeps in its directory (a tmpfs on a netbooted node: gone at reboot, which is
// exactly when a new token arrives).
const (
	FileCA     = "ca.crt"
	FileCert   = "node.crt"
	FileKey    = "node.key"
	FileCephKR = "ceph.keyring"
	FileCephCf = "ceph.conf"
)

// Client is the node side: it joins with a token once, then keeps its certificate fresh.
type Client struct {
	// URLs are join endpoints of any coordinator replicas; tried in turn.
	URLs []string
	// CAHash pins the cluster CA ("sha256:<hex>"); or CAFile names a CA certificate already trusted.
	CAHash, CAFile string
	Dir            string
	HWID           string
	// MAC is this machine's boot NIC, sent with a join: a token the boot server bound to it is spent
	// only by that machine.
	MAC string
	Log hclog.Logger
	// QEMUDir, if set, receives a live-migration certificate in QEMU's migrate_tls_x509_cert_dir
	// layout (RunMigrationCert), for TLS live migration.
	QEMUDir string
	// Now is the clock (tests move it); nil means time.Now.
	Now func() time.Time
}

func (c *Client) now() time.Time {
	if c.Now != nil {
		return c.Now()
	}
	return time.Now()
}

// Paths of the credentials the client maintains.
func (c *Client) CAPath() string   { return filepath.Join(c.Dir, FileCA) }
func (c *Client) CertPath() string { return filepath.Join(c.Dir, FileCert) }
func (c *Client) KeyPath() string  { return filepath.Join(c.Dir, FileKey) }

// CephKeyring and CephConf are the Ceph files the join handed out, "" when it handed out none.
func (c *Client) CephKeyring() string { return existing(filepath.Join(c.Dir, FileCephKR)) }
func (c *Client) CephConf() string    { return existing(filepath.Join(c.Dir, FileCephCf)) }

func existing(p string) string {
	if _, err := os.Stat(p); err == nil {
		return p
	}
	return ""
}

// Ensure leaves valid credentials in Dir: the ones there if they are good for this node and not
// due for renewal, else renewed ones, else (with a token) fresh ones. After an agent restart
// without a reboot the token has been used; the certificate carries on.
func (c *Client) Ensure(ctx context.Context, token string) error {
	if err := os.MkdirAll(c.Dir, 0o700); err != nil {
		return err
	}
	cert, why := c.current()
	switch {
	case cert != nil && !c.due(cert):
		c.Log.Info("using existing node certificate", "user", cert.Subject.CommonName, "expires", cert.NotAfter.Format(time.RFC3339))
		return nil
	case cert != nil:
		if err := c.Renew(ctx); err == nil {
			return nil
		} else if token == "" {
			return err
		} else {
			c.Log.Warn("renewal failed; joining with the token", "error", err)
		}
	case token == "":
		return fmt.Errorf("no usable node certificate in %s (%s) and no join token: a netbooted node gets one on its kernel command line (herd.token=) from the bootserver; for other machines run `herdctl hw token %s` and pass --join-token", c.Dir, why, c.HWID)
	}
	return c.Join(ctx, token)
}

// current returns the certificate in Dir if it is this node's, issued by the pinned CA and not
// expired; else nil and why not.
func (c *Client) current() (*x509.Certificate, string) {
	ca, err := c.trustedCA()
	if err != nil {
		return nil, err.Error()
	}
	b, err := os.ReadFile(c.CertPath())
	if err != nil {
		return nil, "no certificate yet"
	}
	cert, err := pki.ParseCert(b)
	if err != nil {
		return nil, err.Error()
	}
	if _, err := tls.LoadX509KeyPair(c.CertPath(), c.KeyPath()); err != nil {
		return nil, "the key does not match: " + err.Error()
	}
	if cert.Subject.CommonName != rbac.NodeUser(c.HWID) {
		return nil, fmt.Sprintf("the certificate is for %s", cert.Subject.CommonName)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: c.now(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return nil, "the certificate does not verify: " + err.Error()
	}
	return cert, ""
}

// due: renew once two thirds of the lifetime have passed.
func (c *Client) due(cert *x509.Certificate) bool {
	return c.now().After(RenewAt(cert))
}

// RenewAt is when a certificate is due for renewal.
func RenewAt(cert *x509.Certificate) time.Time {
	life := cert.NotAfter.Sub(cert.NotBefore)
	return cert.NotBefore.Add(life * 2 / 3)
}

// trustedCA is the CA in Dir if it matches the pin (or CAFile), else nil.
func (c *Client) trustedCA() (*x509.Certificate, error) {
	b, err := os.ReadFile(c.CAPath())
	if err != nil {
		return nil, errors.New("no CA certificate yet")
	}
	ca, err := pki.ParseCert(b)
	if err != nil {
		return nil, fmt.Errorf("CA certificate in %s: %w", c.Dir, err)
	}
	if err := c.checkCA(ca); err != nil {
		return nil, err
	}
	return ca, nil
}

func (c *Client) checkCA(ca *x509.Certificate) error {
	switch {
	case c.CAHash != "":
		if got := pki.Fingerprint(ca); got != c.CAHash {
			return fmt.Errorf("the CA's fingerprint is %s, but this node pins %s (herd.ca= on the kernel command line, --ca-hash)", got, c.CAHash)
		}
	case c.CAFile != "":
		b, err := os.ReadFile(c.CAFile)
		if err != nil {
			return fmt.Errorf("CA certificate: %w", err)
		}
		want, err := pki.ParseCert(b)
		if err != nil {
			return fmt.Errorf("CA certificate %s: %w", c.CAFile, err)
		}
		if !want.Equal(ca) {
			return fmt.Errorf("the join endpoint's CA is not %s", c.CAFile)
		}
	default:
		return errors.New("no way to trust the join endpoint: pass --ca-hash (herd.ca= on the kernel command line) or --cacert")
	}
	return nil
}

// fetchCA gets the CA from a join endpoint and accepts it only if it matches the pin. The TLS
// handshake cannot be verified before the CA is known; the pin is what makes it safe.
func (c *Client) fetchCA(ctx context.Context, base string) error {
	if ca, err := c.trustedCA(); err == nil && ca != nil {
		return nil
	}
	if c.CAHash == "" && c.CAFile != "" {
		b, err := os.ReadFile(c.CAFile)
		if err != nil {
			return err
		}
		return writeAtomic(c.CAPath(), b, 0o644)
	}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12}, //nolint:gosec // checked against the pin below
	}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+PathCA, nil)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("fetch CA: %w", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil || resp.StatusCode != http.StatusOK {
		return fmt.Errorf("fetch CA from %s: status %d %v", base, resp.StatusCode, err)
	}
	ca, err := pki.ParseCert(b)
	if err != nil {
		return fmt.Errorf("CA from %s: %w", base, err)
	}
	if err := c.checkCA(ca); err != nil {
		return err
	}
	return writeAtomic(c.CAPath(), b, 0o644)
}

// Join trades the token for credentials.
func (c *Client) Join(ctx context.Context, token string) error {
	return c.each(ctx, func(base string) error {
		if err := c.fetchCA(ctx, base); err != nil {
			return err
		}
		hc, err := c.httpClient(false)
		if err != nil {
			return err
		}
		return c.exchange(ctx, hc, base+PathJoin, token)
	})
}

// Renew trades the current certificate for a fresh one.
func (c *Client) Renew(ctx context.Context) error {
	return c.each(ctx, func(base string) error {
		hc, err := c.httpClient(true)
		if err != nil {
			return err
		}
		return c.exchange(ctx, hc, base+PathRenew, "")
	})
}

func (c *Client) each(ctx context.Context, f func(base string) error) error {
	if len(c.URLs) == 0 {
		return errors.New("no join endpoint: pass --join (herd.join= on the kernel command line)")
	}
	var errs []error
	for _, u := range c.URLs {
		err := f(u)
		if err == nil {
			return nil
		}
		var refused *RefusedError
		if errors.As(err, &refused) {
			return err // every replica answers the same; trying the others would only burn time
		}
		errs = append(errs, fmt.Errorf("%s: %w", u, err))
		if ctx.Err() != nil {
			break
		}
	}
	return errors.Join(errs...)
}

func (c *Client) httpClient(withCert bool) (*http.Client, error) {
	certFile, keyFile := "", ""
	if withCert {
		certFile, keyFile = c.CertPath(), c.KeyPath()
	}
	cfg, err := pki.ClientTLS(c.CAPath(), certFile, keyFile, pki.CoordinatorServer)
	if err != nil {
		return nil, err
	}
	return &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}, nil
}

// RefusedError is a coordinator's considered "no" (bad token, unknown hardware), as opposed to a
// network failure.
type RefusedError struct {
	Status  int
	Message string
}

func (e *RefusedError) Error() string { return fmt.Sprintf("refused (%d): %s", e.Status, e.Message) }

func (c *Client) exchange(ctx context.Context, hc *http.Client, url, token string) error {
	csr, keyPEM, err := pki.NewCSR(rbac.NodeUser(c.HWID))
	if err != nil {
		return err
	}
	out, err := c.post(ctx, hc, url, Request{HWID: c.HWID, MAC: c.MAC, Token: token, CSR: string(csr)})
	if err != nil {
		return err
	}
	cert, err := pki.ParseCert([]byte(out.Cert))
	if err != nil {
		return fmt.Errorf("join response certificate: %w", err)
	}
	if cert.Subject.CommonName != rbac.NodeUser(c.HWID) {
		return fmt.Errorf("join response certificate is for %s, not this node", cert.Subject.CommonName)
	}
	// Key first, then certificate: a reader (pki.KeyPair) reloads when the certificate changes.
	if err := writeAtomic(c.KeyPath(), keyPEM, 0o600); err != nil {
		return err
	}
	if err := writeAtomic(c.CertPath(), []byte(out.Cert), 0o644); err != nil {
		return err
	}
	if out.Ceph != nil {
		kr := fmt.Sprintf("[client.%s]\n\tkey = %s\n", out.Ceph.User, out.Ceph.Key)
		if err := writeAtomic(filepath.Join(c.Dir, FileCephKR), []byte(kr), 0o600); err != nil {
			return err
		}
		if out.Ceph.Conf != "" {
			if err := writeAtomic(filepath.Join(c.Dir, FileCephCf), []byte(out.Ceph.Conf), 0o644); err != nil {
				return err
			}
		}
	}
	c.Log.Info("node certificate issued", "user", out.User, "expires", cert.NotAfter.Format(time.RFC3339), "endpoint", url)
	return nil
}

// post sends one request to a join endpoint and decodes its answer.
func (c *Client) post(ctx context.Context, hc *http.Client, url string, r Request) (*Response, error) {
	body, _ := json.Marshal(r)
	rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(rctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		var e Error
		if json.Unmarshal(b, &e) != nil || e.Error == "" {
			e.Error = string(b)
		}
		if resp.StatusCode >= 400 && resp.StatusCode < 500 {
			return nil, &RefusedError{Status: resp.StatusCode, Message: e.Error}
		}
		return nil, fmt.Errorf("status %d: %s", resp.StatusCode, e.Error)
	}
	var out Response
	if err := json.Unmarshal(b, &out); err != nil {
		return nil, fmt.Errorf("join response: %w", err)
	}
	return &out, nil
}

// MigrationCert asks for a live-migration certificate (authenticated by the node certificate) and
// writes it, with the CA, into QEMUDir. The coordinator names in it only the migration address the
// leader vouches for.
func (c *Client) MigrationCert(ctx context.Context) error {
	csr, keyPEM, err := pki.NewCSR("herd-migration:" + c.HWID)
	if err != nil {
		return err
	}
	return c.each(ctx, func(base string) error {
		hc, err := c.httpClient(true)
		if err != nil {
			return err
		}
		out, err := c.post(ctx, hc, base+PathMigration, Request{HWID: c.HWID, CSR: string(csr)})
		if err != nil {
			return err
		}
		cert, err := pki.ParseCert([]byte(out.Cert))
		if err != nil {
			return fmt.Errorf("migration certificate: %w", err)
		}
		if pki.RoleOf(cert) != pki.RoleMigration {
			return fmt.Errorf("migration certificate has role %q", pki.RoleOf(cert))
		}
		if err := pki.WriteQEMUDir(c.QEMUDir, []byte(out.CA), []byte(out.Cert), keyPEM); err != nil {
			return fmt.Errorf("migration TLS credentials: %w", err)
		}
		c.Log.Info("migration certificate issued", "addresses", cert.IPAddresses, "expires", cert.NotAfter.Format(time.RFC3339), "dir", c.QEMUDir)
		return nil
	})
}

// migrationCert is the migration certificate in QEMUDir, or nil.
func (c *Client) migrationCert() *x509.Certificate {
	b, err := os.ReadFile(filepath.Join(c.QEMUDir, "server-cert.pem"))
	if err != nil {
		return nil
	}
	cert, err := pki.ParseCert(b)
	if err != nil || pki.RoleOf(cert) != pki.RoleMigration || c.now().After(cert.NotAfter) {
		return nil
	}
	return cert
}

// RunMigrationCert keeps a live-migration certificate in QEMUDir until ctx ends: at first as soon
// as the leader vouches for the node's migration address (retried until then), then renewed at two
// thirds of its life.
func (c *Client) RunMigrationCert(ctx context.Context) {
	if c.QEMUDir == "" {
		return
	}
	bo := etcdutil.Backoff{Min: 2 * time.Second, Max: time.Minute}
	for {
		wait := time.Duration(0)
		if cert := c.migrationCert(); cert != nil {
			wait = time.Until(RenewAt(cert))
		}
		if wait > 0 && !etcdutil.Sleep(ctx, wait) {
			return
		}
		if err := c.MigrationCert(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			d := bo.Next()
			c.Log.Warn("no live-migration certificate yet; TLS migrations to and from this node fail until there is one", "error", err, "retry_in", d)
			if !etcdutil.Sleep(ctx, d) {
				return
			}
			continue
		}
		bo.Reset()
	}
}

// RunRenewal renews the certificate when it is due until ctx ends, retrying with backoff; the
// etcd client picks up the new pair by itself (pki.KeyPair).
func (c *Client) RunRenewal(ctx context.Context) {
	bo := etcdutil.Backoff{Min: 5 * time.Second, Max: 5 * time.Minute}
	for {
		wait := time.Minute
		if cert, _ := c.current(); cert != nil {
			wait = time.Until(RenewAt(cert))
		}
		if wait > 0 {
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
		}
		if err := c.Renew(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			d := bo.Next()
			c.Log.Error("cannot renew the node certificate; retrying", "error", err, "retry_in", d,
				"hint", "a refused renewal means the hardware record was removed or the CA changed: reboot the node to join again")
			select {
			case <-ctx.Done():
				return
			case <-time.After(d):
			}
			continue
		}
		bo.Reset()
	}
}

func writeAtomic(path string, b []byte, mode os.FileMode) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, mode); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// CephUser is the cephx user of the keyring the join handed out ("" without one).
func (c *Client) CephUser() string {
	b, err := os.ReadFile(filepath.Join(c.Dir, FileCephKR))
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		if u, ok := strings.CutPrefix(strings.TrimSpace(line), "[client."); ok {
			return strings.TrimSuffix(u, "]")
		}
	}
	return ""
}
