// Package rig starts herd's real parts as separate OS processes for end-to-end tests: the built
// binaries, an etcd member, Debian's etcdctl. Every process is stopped when the test ends, also when
// it fails, and its log is printed then.
package rig

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/herdhq/herd/agent/hypervisor"
	"github.com/herdhq/herd/lib/pki"
)

// Binaries are the herd and herdctl executables the tests run.
type Binaries struct {
	Herd, Herdctl string
}

// Build compiles herd and herdctl into dir (a TestMain's temporary directory). The Go build cache
// makes this fast after the first time.
func Build(dir string) (Binaries, error) {
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	b := Binaries{Herd: filepath.Join(dir, "herd"), Herdctl: filepath.Join(dir, "herdctl")}
	for _, c := range []struct{ out, pkg, cgo string }{{b.Herd, "./cmd/herd", "1"}, {b.Herdctl, "./cmd/herdctl", "0"}} {
		cmd := exec.Command("go", "build", "-o", c.out, c.pkg)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED="+c.cgo)
		if out, err := cmd.CombinedOutput(); err != nil {
			return b, fmt.Errorf("go build %s: %v\n%s", c.pkg, err, out)
		}
	}
	return b, nil
}

// FreePort returns a loopback port free at the time of the call.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Proc is one started process.
type Proc struct {
	Name string
	Log  string
	cmd  *exec.Cmd
	done chan struct{}
	mu   sync.Mutex
	err  error
}

// Start runs bin with args in its own process group, logging to dir/name.log. It is stopped at
// test cleanup (SIGTERM, then SIGKILL after 10 s) and its log tail is printed if the test failed.
func Start(t testing.TB, dir, name, bin string, args ...string) *Proc {
	t.Helper()
	return StartEnv(t, dir, name, nil, bin, args...)
}

// StartEnv is Start with env added to the test's environment (later entries win).
func StartEnv(t testing.TB, dir, name string, env []string, bin string, args ...string) *Proc {
	t.Helper()
	logPath := filepath.Join(dir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	p := &Proc{Name: name, Log: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		f.Close()
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.Stop(10 * time.Second)
		if t.Failed() {
			t.Logf("---- last lines of %s ----\n%s", name, Tail(logPath, 40))
		}
	})
	return p
}

// Pid of the process.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Running reports whether the process has not exited.
func (p *Proc) Running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// Stop asks the process to exit and kills its group after grace.
func (p *Proc) Stop(grace time.Duration) {
	if !p.Running() {
		return
	}
	_ = syscall.Kill(p.Pid(), syscall.SIGCONT) // a stopped process can't handle SIGTERM
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		p.Kill()
	}
}

// Kill sends SIGKILL to the process group and waits for the exit.
func (p *Proc) Kill() {
	if !p.Running() {
		return
	}
	_ = syscall.Kill(-p.Pid(), syscall.SIGKILL)
	<-p.done
}

// Wait waits up to timeout for the process to exit by itself and returns how it exited.
func (p *Proc) Wait(timeout time.Duration) error {
	select {
	case <-p.done:
	case <-time.After(timeout):
		return fmt.Errorf("%s still running after %s", p.Name, timeout)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// Signal sends sig to the process only.
func (p *Proc) Signal(sig syscall.Signal) error { return syscall.Kill(p.Pid(), sig) }

// Tail returns the last n lines of a file.
func Tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Eventually polls cond every 100 ms until it returns nil or timeout passes, then fails with the
// last error. Timeouts are generous: tests never assert wall-clock times.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var err error
	for {
		if err = cond(); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not true after %s: %v", what, timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Cluster is an etcd member plus the herd processes of one test.
type Cluster struct {
	T          testing.TB
	Bin        Binaries
	Dir        string
	Endpoint   string
	MetricsURL string
	Etcd       *Proc
	Coords     []*Coordinator
	Agents     map[string]*Agent
	AgentArgs  []string // extra flags for every agent
	CoordArgs  []string // extra flags for every coordinator
	CoordEnv   []string // extra environment for every coordinator (GOMEMLIMIT=...)
	// AgentEndpoints, if set for an hwid, are the etcd endpoints its agent uses (a Lane).
	AgentEndpoints map[string]string
	lanes          []lane
	// AgentBin and CoordBin, if set, are the herd binaries agents and coordinators start from
	// (an earlier release, BuildRelease); etcd and the rig's own commands use Bin.Herd.
	AgentBin, CoordBin string
	agentsOrder        []string
	etcdArgs           []string
	// CommandTimeout bounds each command Run runs (at least a minute; the scale rig applies
	// 100,000 specs into an etcd it overloads).
	CommandTimeout time.Duration
	// HistoryTimeout bounds History's replay (at least a minute; the scale rig replays millions of
	// events).
	HistoryTimeout time.Duration

	// With TLS and RBAC (NewSecureCluster): the CA's directory, its fingerprint, the coordinators'
	// join endpoints, and the environment herdctl and etcdctl run with (the operator's certificate).
	PKI      string
	CAHash   string
	JoinURLs []string
	Env      []string
}

// Secure reports whether the cluster runs with TLS and RBAC.
func (c *Cluster) Secure() bool { return c.PKI != "" }

// Coordinator is one coordinator process with its status endpoint.
type Coordinator struct {
	*Proc
	Status string
}

// IsLeader asks the coordinator whether it leads.
func (c *Coordinator) IsLeader() bool {
	resp, err := http.Get(c.Status + "/v1/leader")
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	_, _ = b.ReadFrom(resp.Body)
	return strings.TrimSpace(b.String()) == "true"
}

// Leader waits until exactly one running coordinator says it leads and returns it.
func (c *Cluster) Leader(timeout time.Duration) *Coordinator {
	c.T.Helper()
	var l *Coordinator
	Eventually(c.T, timeout, "one leader", func() error {
		l = nil
		n := 0
		for _, co := range c.Coords {
			if co.Running() && co.IsLeader() {
				l = co
				n++
			}
		}
		if n != 1 {
			return fmt.Errorf("%d coordinators say they lead", n)
		}
		return nil
	})
	return l
}

// Agent is one agent process with its status endpoint.
type Agent struct {
	*Proc
	HWID   string
	Status string // base URL of its status endpoint
	URI    string
}

// NewCluster starts a single etcd member (as its own process, `herd etcd`).
func NewCluster(t testing.TB, bin Binaries) *Cluster {
	return newCluster(t, bin, false)
}

// NewSecureCluster is NewCluster the way production runs: the CA made with `herd pki init`, etcd
// serving TLS and requiring client certificates, `herd rbac apply`, coordinators with their own
// certificates serving join endpoints, agents that join with one-time tokens, and herdctl and
// etcdctl acting as an operator.
func NewSecureCluster(t testing.TB, bin Binaries) *Cluster {
	return newCluster(t, bin, true)
}

func newCluster(t testing.TB, bin Binaries, secure bool) *Cluster {
	t.Helper()
	dir := t.TempDir()
	c := &Cluster{T: t, Bin: bin, Dir: dir, Agents: map[string]*Agent{}}
	cp, pp, mp := FreePort(t), FreePort(t), FreePort(t)
	scheme := "http"
	if secure {
		scheme = "https"
		c.PKI = filepath.Join(dir, "pki")
		c.must(bin.Herd, "pki", "init", "--dir", c.PKI, "--etcd-host", "127.0.0.1")
		b, err := os.ReadFile(filepath.Join(c.PKI, "ca.crt"))
		if err != nil {
			t.Fatal(err)
		}
		ca, err := pki.ParseCert(b)
		if err != nil {
			t.Fatal(err)
		}
		c.CAHash = pki.Fingerprint(ca)
	}
	c.Endpoint = fmt.Sprintf("%s://127.0.0.1:%d", scheme, cp)
	c.MetricsURL = fmt.Sprintf("http://127.0.0.1:%d/metrics", mp)
	c.etcdArgs = []string{"etcd", "--data-dir", filepath.Join(dir, "etcd"),
		"--listen-client", c.Endpoint, "--listen-peer", fmt.Sprintf("http://127.0.0.1:%d", pp),
		// Compaction far beyond a test's length: tests replay etcd's history from revision 1.
		"--listen-metrics", fmt.Sprintf("http://127.0.0.1:%d", mp), "--unsafe-no-fsync", "--auto-compaction", "24h"}
	if secure {
		c.etcdArgs = append(c.etcdArgs, "--cert-file", filepath.Join(c.PKI, "etcd-server.crt"),
			"--key-file", filepath.Join(c.PKI, "etcd-server.key"), "--trusted-ca-file", filepath.Join(c.PKI, "ca.crt"))
	}
	c.StartEtcd()
	if secure {
		c.must(bin.Herd, append([]string{"rbac", "apply"}, c.tlsArgs("root")...)...)
		c.must(bin.Herd, append([]string{"pki", "issue", "--dir", c.PKI, "--role", "operator", "rig-operator"}, c.tlsArgs("root")...)...)
		crt, key := c.certFiles("rig-operator")
		c.Env = []string{"HERD_CACERT=" + filepath.Join(c.PKI, "ca.crt"), "HERD_CERT=" + crt, "HERD_KEY=" + key,
			"ETCDCTL_CACERT=" + filepath.Join(c.PKI, "ca.crt"), "ETCDCTL_CERT=" + crt, "ETCDCTL_KEY=" + key}
	}
	return c
}

func (c *Cluster) certFiles(user string) (string, string) {
	return filepath.Join(c.PKI, user+".crt"), filepath.Join(c.PKI, user+".key")
}

// UserArgs issues a certificate for a new etcd user of role (operator, viewer) on a secure
// cluster and returns the etcd flags of a process acting as that user.
func (c *Cluster) UserArgs(role, name string) []string {
	c.T.Helper()
	c.must(c.Bin.Herd, append([]string{"pki", "issue", "--dir", c.PKI, "--role", role, name}, c.tlsArgs("root")...)...)
	return c.tlsArgs(name)
}

// tlsArgs are the etcd flags of a herd process acting as user.
func (c *Cluster) tlsArgs(user string) []string {
	crt, key := c.certFiles(user)
	return []string{"--endpoints", c.Endpoint, "--cacert", filepath.Join(c.PKI, "ca.crt"), "--cert", crt, "--key", key}
}

func (c *Cluster) must(bin string, args ...string) string {
	c.T.Helper()
	out, errOut, code := c.Run(bin, args...)
	if code != 0 {
		c.T.Fatalf("%s %s: exit %d: %s%s", filepath.Base(bin), strings.Join(args, " "), code, out, errOut)
	}
	return out
}

// StartEtcd starts (or restarts) the single etcd member on its data directory.
func (c *Cluster) StartEtcd() {
	c.T.Helper()
	c.Etcd = Start(c.T, c.Dir, "etcd", c.Bin.Herd, c.etcdArgs...)
	Eventually(c.T, 30*time.Second, "etcd serving", func() error {
		resp, err := http.Get(c.MetricsURL)
		if err == nil {
			resp.Body.Close()
		}
		return err
	})
}

// WipeEtcd stops etcd, deletes its data and starts an empty member on the same endpoint: a new
// cluster, as after a disaster or a mistaken re-provisioning.
func (c *Cluster) WipeEtcd() {
	c.T.Helper()
	c.Etcd.Stop(10 * time.Second)
	if err := os.RemoveAll(filepath.Join(c.Dir, "etcd")); err != nil {
		c.T.Fatal(err)
	}
	c.StartEtcd()
}

// RestartEtcd stops the single member and starts it again on its data with extra flags.
func (c *Cluster) RestartEtcd(extra ...string) {
	c.T.Helper()
	c.Etcd.Stop(10 * time.Second)
	c.etcdArgs = append(c.etcdArgs, extra...)
	c.StartEtcd()
}

// SnapshotEtcd saves etcd's keyspace to a file with `herd etcd snapshot save` and returns its path.
func (c *Cluster) SnapshotEtcd(name string) string {
	c.T.Helper()
	path := filepath.Join(c.Dir, name+".db")
	c.must(c.Bin.Herd, "etcd", "snapshot", "save", path, "--endpoints", c.Endpoint)
	return path
}

// RestoreEtcd stops etcd, restores the snapshot into a fresh data directory with `herd etcd
// snapshot restore` and starts the member on it at the same URLs: the daemons keep running, as
// they would while an operator restores a backup.
func (c *Cluster) RestoreEtcd(snapshot string) {
	c.T.Helper()
	c.Etcd.Stop(10 * time.Second)
	data := filepath.Join(c.Dir, "etcd")
	if err := os.Rename(data, data+fmt.Sprintf(".before-restore-%d", time.Now().UnixNano())); err != nil {
		c.T.Fatal(err)
	}
	peer := ""
	for i, a := range c.etcdArgs {
		if a == "--listen-peer" {
			peer = c.etcdArgs[i+1]
		}
	}
	c.must(c.Bin.Herd, "etcd", "snapshot", "restore", snapshot, "--data-dir", data, "--listen-peer", peer)
	c.StartEtcd()
}

// CoordinatorRevisionFile is where the n-th coordinator started keeps its revision watermark; a
// replica started again with it (--revision-file) is the same replica restarted.
func CoordinatorRevisionFile(dir string, n int) string {
	return filepath.Join(dir, fmt.Sprintf("coordinator%d-revision.json", n))
}

// StartCoordinator starts one more coordinator replica.
func (c *Cluster) StartCoordinator(extra ...string) *Coordinator {
	n := len(c.Coords) + 1
	name := fmt.Sprintf("coordinator%d", n)
	port := FreePort(c.T)
	herd := cmp.Or(c.CoordBin, c.Bin.Herd)
	args := []string{"coordinator", "--endpoints", c.Endpoint, "--name", name, "--listen", fmt.Sprintf("127.0.0.1:%d", port)}
	if HasFlag(herd, "coordinator", "--revision-file") {
		args = append(args, "--revision-file", CoordinatorRevisionFile(c.Dir, n))
	}
	args = append(args, c.CoordArgs...)
	if c.Secure() {
		c.must(c.Bin.Herd, append([]string{"pki", "issue", "--dir", c.PKI, "--role", "coordinator", name, "--host", "127.0.0.1"}, c.tlsArgs("root")...)...)
		jp := FreePort(c.T)
		args = append(append(args, c.tlsArgs(name)[2:]...), "--ca-dir", c.PKI, "--join-listen", fmt.Sprintf("127.0.0.1:%d", jp))
		c.JoinURLs = append(c.JoinURLs, fmt.Sprintf("https://127.0.0.1:%d", jp))
	}
	p := StartEnv(c.T, c.Dir, name, c.CoordEnv, herd, append(args, extra...)...)
	co := &Coordinator{Proc: p, Status: fmt.Sprintf("http://127.0.0.1:%d", port)}
	c.Coords = append(c.Coords, co)
	return co
}

// StartAgent enrols hwid (with herdctl) and starts an agent on its own test-driver node.
func (c *Cluster) StartAgent(hwid string, cpus int, memMiB int64, extra ...string) *Agent {
	c.T.Helper()
	if _, ok := c.Agents[hwid]; !ok {
		c.Herdctl("hw", "add", hwid)
	}
	idx := len(c.agentsOrder) + 1
	uri, err := hypervisor.WriteTestNode(c.Dir, fmt.Sprintf("node-%d", idx), cpus, memMiB)
	if err != nil {
		c.T.Fatal(err)
	}
	port := FreePort(c.T)
	name := "agent-" + strings.ReplaceAll(hwid, ":", "")
	herd := cmp.Or(c.AgentBin, c.Bin.Herd)
	args := []string{"agent", "--endpoints", cmp.Or(c.AgentEndpoints[hwid], c.Endpoint), "--hwid", hwid, "--libvirt-uri", uri,
		"--volume-dir", filepath.Join(c.Dir, "volumes"), "--listen", fmt.Sprintf("127.0.0.1:%d", port)}
	if HasFlag(herd, "agent", "--revision-file") {
		// The revision file outlives the agent: a restart of the same hwid finds it.
		args = append(args, "--revision-file", filepath.Join(c.Dir, name+"-revision.json"))
	}
	if HasFlag(herd, "agent", "--console-listen") {
		args = append(args, "--console-listen", "127.0.0.1:0")
	}
	if HasFlag(herd, "agent", "--seed-dir") {
		// Never the host's /var/lib/herd: each agent's seeds in the test's directory.
		args = append(args, "--seed-dir", filepath.Join(c.Dir, name+"-seeds"))
	}
	args = append(args, c.AgentArgs...)
	if c.Secure() {
		// As the bootserver does for a netboot: a one-time token for this start, the join
		// endpoints and the CA's fingerprint.
		tok := strings.TrimSpace(c.Herdctl("hw", "token", hwid, "--ttl", "5m"))
		args = append(args, "--join", strings.Join(c.JoinURLs, ","), "--join-token", tok, "--ca-hash", c.CAHash,
			"--cred-dir", filepath.Join(c.Dir, "creds-"+strings.ReplaceAll(hwid, ":", "")))
	}
	p := Start(c.T, c.Dir, name, herd, append(args, extra...)...)
	a := &Agent{Proc: p, HWID: hwid, Status: fmt.Sprintf("http://127.0.0.1:%d", port), URI: uri}
	if _, ok := c.Agents[hwid]; !ok {
		c.agentsOrder = append(c.agentsOrder, hwid)
	}
	c.Agents[hwid] = a
	return a
}

// Run runs a command with the cluster's endpoint in its environment and returns stdout, stderr and
// the exit code.
func (c *Cluster) Run(bin string, args ...string) (string, string, int) {
	ctx, cancel := context.WithTimeout(context.Background(), max(c.CommandTimeout, 60*time.Second))
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(append(os.Environ(), "HERD_ENDPOINTS="+c.Endpoint, "ETCDCTL_API=3"), c.Env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else {
			c.T.Fatalf("run %s %v: %v", bin, args, err)
		}
	}
	return out.String(), errb.String(), code
}

// EtcdctlAs runs Debian's etcdctl with a certificate of the cluster's CA (crt, key) instead of the
// operator's, and returns stdout, stderr and the exit code: for tests that act as root, or as a node
// with its own credentials.
func (c *Cluster) EtcdctlAs(crt, key string, args ...string) (string, string, int) {
	c.T.Helper()
	bin, err := exec.LookPath("etcdctl")
	if err != nil {
		c.T.Fatalf("etcdctl not found: install Debian's etcd-client package (just deps)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, append([]string{"--endpoints", c.Endpoint}, args...)...)
	cmd.Env = append(os.Environ(), "ETCDCTL_API=3", "ETCDCTL_CACERT="+filepath.Join(c.PKI, "ca.crt"), "ETCDCTL_CERT="+crt, "ETCDCTL_KEY="+key)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err = cmd.Run()
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			c.T.Fatalf("etcdctl %v: %v", args, err)
		}
		code = ee.ExitCode()
	}
	return out.String(), errb.String(), code
}

// RootCert is root's certificate and key (made by herd pki init).
func (c *Cluster) RootCert() (string, string) { return c.certFiles("root") }

// NodeCert is the certificate and key the agent of hwid joined with.
func (c *Cluster) NodeCert(hwid string) (string, string) {
	dir := filepath.Join(c.Dir, "creds-"+strings.ReplaceAll(hwid, ":", ""))
	return filepath.Join(dir, "node.crt"), filepath.Join(dir, "node.key")
}

// Herdctl runs herdctl and fails the test unless it succeeds.
func (c *Cluster) Herdctl(args ...string) string {
	c.T.Helper()
	out, errOut, code := c.Run(c.Bin.Herdctl, args...)
	if code != 0 {
		c.T.Fatalf("herdctl %s: exit %d: %s%s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

// Etcdctl runs Debian's etcdctl against the cluster and fails the test unless it succeeds.
func (c *Cluster) Etcdctl(args ...string) string {
	c.T.Helper()
	bin, err := exec.LookPath("etcdctl")
	if err != nil {
		c.T.Fatalf("etcdctl not found: install Debian's etcd-client package (just deps)")
	}
	out, errOut, code := c.Run(bin, append([]string{"--endpoints", c.Endpoint}, args...)...)
	if code != 0 {
		c.T.Fatalf("etcdctl %s: exit %d: %s%s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

// VM is the part of `herdctl vm list -o json` the tests read.
type VM struct {
	Name      string `json:"name"`
	UID       int64  `json:"uid"`
	State     string `json:"state"`
	SpecError string `json:"spec_error"`
	Placement *struct {
		Node  string `json:"node"`
		Epoch int64  `json:"epoch"`
	} `json:"placement"`
	Problem *struct {
		Kind    string `json:"kind"`
		Message string `json:"message"`
	} `json:"problem"`
}

// VMs lists VMs through herdctl.
func (c *Cluster) VMs() map[string]VM {
	c.T.Helper()
	var list []VM
	if err := json.Unmarshal([]byte(c.Herdctl("vm", "list", "-o", "json")), &list); err != nil {
		c.T.Fatal(err)
	}
	m := map[string]VM{}
	for _, v := range list {
		m[v.Name] = v
	}
	return m
}

// Domains asks an agent for its own report of its libvirt domains.
func (a *Agent) Domains() ([]hypervisor.Domain, error) {
	// A stopped agent (SIGSTOP) accepts the connection and never answers.
	resp, err := statusClient.Get(a.Status + "/v1/domains")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return nil, fmt.Errorf("status %s", resp.Status)
	}
	var doms []hypervisor.Domain
	return doms, json.NewDecoder(resp.Body).Decode(&doms)
}

// statusClient asks daemons' status endpoints, giving up on one that does not answer.
var statusClient = &http.Client{Timeout: 5 * time.Second}

// MetricLines returns a metric's samples as "labels value" pairs on one line, for logs.
func MetricLines(url, name string) (string, error) {
	resp, err := http.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var out []string
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), name); ok && (strings.HasPrefix(rest, "{") || strings.HasPrefix(rest, " ")) {
			out = append(out, strings.TrimSpace(rest))
		}
	}
	return strings.Join(out, ", "), sc.Err()
}

// Metric sums the samples of a Prometheus metric at url whose labels contain every filter
// (e.g. `grpc_method="Range"`).
func Metric(url, name string, filters ...string) (float64, error) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var sum float64
	found := false
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		ok := true
		for _, f := range filters {
			if !strings.Contains(line, f) {
				ok = false
			}
		}
		if !ok {
			continue
		}
		fields := strings.Fields(line)
		v, err := strconv.ParseFloat(fields[len(fields)-1], 64)
		if err != nil {
			return 0, err
		}
		sum += v
		found = true
	}
	if !found {
		return 0, fmt.Errorf("metric %s%v not found at %s", name, filters, url)
	}
	return sum, sc.Err()
}
