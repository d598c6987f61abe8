package console

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/herdhq/herd/lib/pki"
	"github.com/herdhq/herd/lib/rbac"
)

// ServerTLS is the agent's listener configuration: it serves with the node's own certificate
// (reloaded when renewed) and asks every caller for a certificate of the cluster's CA.
func ServerTLS(caFile, certFile, keyFile string) (*tls.Config, error) {
	pool, err := pki.Pool(caFile)
	if err != nil {
		return nil, err
	}
	kp, err := pki.NewKeyPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		ClientAuth:     tls.RequireAndVerifyClientCert,
		ClientCAs:      pool,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return kp.Get() },
		// HTTP/1.1 only: the console is a hijacked connection.
		NextProtos: []string{"http/1.1"},
	}, nil
}

// ClientTLS is herdctl's configuration for reaching the agent of node hwid: the caller's own
// certificate, and a server that must show that node's certificate from the cluster's CA. A node
// serves with the client certificate it has (no address is in it, and none is needed: the node is
// known by its hardware id, which the certificate names), so the chain is checked here for any key
// usage and the common name must be that node's user.
func ClientTLS(caFile, certFile, keyFile, hwid string) (*tls.Config, error) {
	pool, err := pki.Pool(caFile)
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		// Verified below, by the node's identity instead of a host name.
		InsecureSkipVerify: true, //nolint:gosec
		VerifyConnection: func(cs tls.ConnectionState) error {
			return VerifyNode(cs, pool, hwid)
		},
	}
	if certFile != "" {
		kp, err := pki.NewKeyPair(certFile, keyFile)
		if err != nil {
			return nil, err
		}
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return kp.Get() }
	}
	return cfg, nil
}

// VerifyNode checks that a TLS peer is node hwid: a chain to the cluster's CA, the node role, and
// the node's user as common name. Another node, or any other holder of a herd certificate, is
// refused.
func VerifyNode(cs tls.ConnectionState, pool *x509.CertPool, hwid string) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("console: the node showed no certificate")
	}
	leaf := cs.PeerCertificates[0]
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fmt.Errorf("console: the node's certificate: %w", err)
	}
	if r := pki.RoleOf(leaf); r != pki.RoleNode {
		return fmt.Errorf("console: the server's certificate (%s) is a %q certificate, not a node's: refusing to talk to it", leaf.Subject.CommonName, r)
	}
	if want := rbac.NodeUser(hwid); leaf.Subject.CommonName != want {
		return fmt.Errorf("console: the server's certificate is %s's, not %s's: refusing to talk to it", leaf.Subject.CommonName, want)
	}
	return nil
}

// Client reaches one node's console endpoint.
type Client struct {
	// URL is the node's console URL (keys.Node.ConsoleURL).
	URL string
	// TLS is ClientTLS's configuration for an https URL.
	TLS *tls.Config
}

func (c *Client) http() *http.Client {
	return &http.Client{Transport: &http.Transport{
		TLSClientConfig:     c.TLS,
		TLSHandshakeTimeout: 10 * time.Second,
		// A log that follows never ends: no overall timeout, the caller's context bounds it.
		ResponseHeaderTimeout: 30 * time.Second,
		Proxy:                 nil,
	}}
}

func (c *Client) url(path, vm string, q url.Values) string {
	u := strings.TrimRight(c.URL, "/") + strings.Replace(path, "{name}", url.PathEscape(vm), 1)
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	return u
}

// Log copies vm's console log to w: the last n bytes (0: all), then, with follow, what the guest
// prints until ctx ends.
func (c *Client) Log(ctx context.Context, vm string, n int64, follow bool, w io.Writer) error {
	q := url.Values{"bytes": {strconv.FormatInt(n, 10)}}
	if follow {
		q.Set("follow", "1")
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.url(LogPath, vm, q), nil)
	if err != nil {
		return err
	}
	resp, err := c.http().Do(req)
	if err != nil {
		return fmt.Errorf("console log of %s at %s: %w", vm, c.URL, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return refusal(resp)
	}
	if _, err := io.Copy(w, resp.Body); err != nil && ctx.Err() == nil {
		return fmt.Errorf("console log of %s: %w", vm, err)
	}
	return nil
}

// Attach opens vm's interactive console: read what the guest prints, write what to type. Close
// detaches. force takes the console from whoever holds it; ticket names the console ticket the
// caller wrote in etcd (a node with TLS admits no attach without one).
func (c *Client) Attach(ctx context.Context, vm string, force bool, ticket string) (io.ReadWriteCloser, error) {
	q := url.Values{}
	if force {
		q.Set("force", "1")
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.url(AttachPath, vm, q), nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", Protocol)
	if ticket != "" {
		req.Header.Set(TicketHeader, ticket)
	}
	resp, err := c.http().Do(req)
	if err != nil {
		return nil, fmt.Errorf("console of %s at %s: %w", vm, c.URL, err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		defer resp.Body.Close()
		return nil, refusal(resp)
	}
	rwc, ok := resp.Body.(io.ReadWriteCloser)
	if !ok {
		resp.Body.Close()
		return nil, errors.New("console: the connection cannot be upgraded")
	}
	return rwc, nil
}

// Refused is the node's answer when it does not serve a request: its status and its words.
type Refused struct {
	Status  int
	Message string
}

func (r *Refused) Error() string { return r.Message }

func refusal(resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	msg := strings.TrimSpace(string(b))
	if msg == "" {
		msg = resp.Status
	}
	return &Refused{Status: resp.StatusCode, Message: msg}
}
