package rig

import (
	"context"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/herdhq/herd/lib/pki"
)

// Member is one etcd member process of a multi-member cluster.
type Member struct {
	*Proc
	Name      string
	ClientURL string
	Metrics   string
	args      []string
}

// NewCluster3 starts a three-member etcd cluster of separate processes on 127.0.0.1-3.
func NewCluster3(t testing.TB, bin Binaries) (*Cluster, []*Member) {
	t.Helper()
	return NewCluster3Lanes(t, bin, 0)
}

// NewCluster3Lanes is NewCluster3 with lanes more client URLs on every member: lane i is what
// one client (an agent) alone uses (Cluster.Lane), so that it can be cut off from etcd by itself
// (Cluster.CutLane) while everything else still reaches etcd.
func NewCluster3Lanes(t testing.TB, bin Binaries, lanes int) (*Cluster, []*Member) {
	t.Helper()
	dir := t.TempDir()
	c := &Cluster{T: t, Bin: bin, Dir: dir, Agents: map[string]*Agent{}}
	var members []*Member
	var peers, clients []string
	for i := 1; i <= 3; i++ {
		ip := fmt.Sprintf("127.0.0.%d", i)
		m := &Member{
			Name:      fmt.Sprintf("m%d", i),
			ClientURL: fmt.Sprintf("http://%s:%d", ip, FreePort(t)),
			Metrics:   fmt.Sprintf("http://%s:%d", ip, FreePort(t)),
		}
		peer := fmt.Sprintf("http://%s:%d", ip, FreePort(t))
		m.args = []string{"etcd", "--name", m.Name, "--data-dir", filepath.Join(dir, m.Name),
			"--listen-client", m.ClientURL, "--listen-peer", peer, "--listen-metrics", m.Metrics,
			"--auto-compaction", "24h"}
		for l := range lanes {
			port := FreePort(t)
			if len(c.lanes) <= l {
				c.lanes = append(c.lanes, lane{})
			}
			c.lanes[l].urls = append(c.lanes[l].urls, fmt.Sprintf("http://%s:%d", ip, port))
			c.lanes[l].ports = append(c.lanes[l].ports, port)
			m.args = append(m.args, "--listen-client", c.lanes[l].urls[len(c.lanes[l].urls)-1])
		}
		peers = append(peers, m.Name+"="+peer)
		clients = append(clients, m.ClientURL)
		members = append(members, m)
	}
	for _, m := range members {
		m.args = append(m.args, "--initial-cluster", strings.Join(peers, ","))
		m.Proc = Start(t, dir, "etcd-"+m.Name, bin.Herd, m.args...)
	}
	c.Endpoint = strings.Join(clients, ",")
	c.MetricsURL = members[0].Metrics + "/metrics"
	Eventually(t, 60*time.Second, "etcd cluster has a leader", func() error {
		_, err := EtcdLeader(members)
		return err
	})
	return c, members
}

// EtcdLeader finds the member that reports itself raft leader.
func EtcdLeader(members []*Member) (*Member, error) {
	for _, m := range members {
		if !m.Running() {
			continue
		}
		v, err := Metric(m.Metrics+"/metrics", "etcd_server_is_leader")
		if err == nil && v == 1 {
			return m, nil
		}
	}
	return nil, fmt.Errorf("no member reports itself leader")
}

// Restart starts a killed member again on its data directory.
func (m *Member) Restart(t testing.TB, c *Cluster) {
	t.Helper()
	m.Proc = Start(t, c.Dir, "etcd-"+m.Name, c.Bin.Herd, m.args...)
}

// Healthy reports whether the member serves its metrics endpoint.
func (m *Member) Healthy() bool {
	resp, err := http.Get(m.Metrics + "/health")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == 200
}

// Client returns a client to the cluster's endpoints (as root when the cluster runs with TLS and
// RBAC), closed at cleanup.
func (c *Cluster) Client() *clientv3.Client {
	c.T.Helper()
	crt, key := "", ""
	if c.Secure() {
		crt, key = c.RootCert()
	}
	return c.ClientAs(crt, key)
}

// ClientAs returns a client that authenticates with a certificate of the cluster's CA (none on a
// plain cluster), closed at cleanup.
func (c *Cluster) ClientAs(crt, key string) *clientv3.Client {
	c.T.Helper()
	cfg := clientv3.Config{Endpoints: strings.Split(c.Endpoint, ","), DialTimeout: 5 * time.Second, Logger: zap.NewNop()}
	if c.Secure() {
		tlsCfg, err := pki.ClientTLS(filepath.Join(c.PKI, "ca.crt"), crt, key, pki.EtcdServer)
		if err != nil {
			c.T.Fatal(err)
		}
		cfg.TLS = tlsCfg
	}
	cl, err := clientv3.New(cfg)
	if err != nil {
		c.T.Fatal(err)
	}
	c.T.Cleanup(func() { cl.Close() })
	return cl
}

// History returns every event under prefix from revision 1 to now: the complete record of what
// was ever written, for proofs that do not rely on sampling.
func (c *Cluster) History(prefix string) []*clientv3.Event {
	c.T.Helper()
	cl := c.Client()
	ctx, cancel := context.WithTimeout(context.Background(), max(c.HistoryTimeout, 60*time.Second))
	defer cancel()
	head, err := cl.Get(ctx, "/", clientv3.WithCountOnly())
	if err != nil {
		c.T.Fatal(err)
	}
	end := head.Header.Revision
	var out []*clientv3.Event
	wch := cl.Watch(ctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(1), clientv3.WithProgressNotify())
	// A progress notification says every event up to its revision was delivered, but etcd sends
	// one only to a watcher that has caught up and ignores a request that arrives before: ask
	// again until one comes (the last event under prefix may be far below end).
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case resp, ok := <-wch:
			if !ok {
				c.T.Fatalf("history of %s: watch ended: %v", prefix, ctx.Err())
			}
			if err := resp.Err(); err != nil {
				c.T.Fatalf("history of %s: %v", prefix, err)
			}
			out = append(out, resp.Events...)
			if n := len(resp.Events); n > 0 && resp.Events[n-1].Kv.ModRevision >= end {
				return out
			}
			if resp.IsProgressNotify() && resp.Header.Revision >= end {
				return out
			}
		case <-tick.C:
			_ = cl.RequestProgress(ctx)
		}
	}
}
