package hypervisor

import (
	"context"
	"fmt"
	"io"
	"strings"
	"sync"

	"github.com/google/uuid"
)

// Hypervisor is what the agent drives: libvirt in production and in every test that claims
// libvirt's behaviour (Libvirt), or the in-memory model of the scale rig (Memory).
type Hypervisor interface {
	URI() string
	DomainType() string
	Info(ctx context.Context) (Info, error)
	List(ctx context.Context) ([]Domain, error)
	Lookup(ctx context.Context, name string) (*Domain, error)
	EnsureCephSecret(ctx context.Context, user, key string) (string, error)
	Define(ctx context.Context, s Spec) error
	Start(ctx context.Context, name string) error
	Shutdown(ctx context.Context, name string) error
	Migrate(ctx context.Context, name, peerURI, address string) error
	Destroy(ctx context.Context, name string) error
	Remove(ctx context.Context, name string) error
	OpenConsole(ctx context.Context, name string, force bool) (io.ReadWriteCloser, error)
}

var _ Hypervisor = (*Libvirt)(nil)

// MemoryScheme is the URI scheme of in-memory hypervisors: mem://<name>.
const MemoryScheme = "mem://"

// memoryHosts lets in-memory hypervisors of one process migrate domains to each other by URI.
var memoryHosts sync.Map // uri -> *Memory

// Memory is a hypervisor that only keeps books: domains are entries in a map that change state
// when told to, at no cost but a few hundred bytes each. The scale rig runs thousands of real agents
// on it in one process; it models what the agent relies on (definitions persist, a running domain
// stays running, migration moves a domain to its peer, shutdown completes at once), nothing of a
// guest. Safe for concurrent use.
type Memory struct {
	uri  string
	info Info

	mu      sync.Mutex
	domains map[string]*Domain
	closed  bool
}

// NewMemory makes the in-memory hypervisor mem://name with the given capacity, reachable by
// Migrate from the others of this process until Close.
func NewMemory(name string, cpus int, memoryMiB int64) (*Memory, error) {
	m := &Memory{uri: MemoryScheme + name, info: Info{CPUs: cpus, MemoryMiB: memoryMiB, Model: "memory"}, domains: map[string]*Domain{}}
	if _, dup := memoryHosts.LoadOrStore(m.uri, m); dup {
		return nil, fmt.Errorf("hypervisor %s already exists in this process", m.uri)
	}
	return m, nil
}

// Close makes the hypervisor unreachable; its domains are gone with it, as with a powered-off host.
func (m *Memory) Close() {
	m.mu.Lock()
	m.closed = true
	m.domains = map[string]*Domain{}
	m.mu.Unlock()
	memoryHosts.CompareAndDelete(m.uri, m)
}

func (m *Memory) URI() string        { return m.uri }
func (m *Memory) DomainType() string { return "memory" }

func (m *Memory) Info(ctx context.Context) (Info, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.info, m.check(ctx)
}

// check is called with mu held.
func (m *Memory) check(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if m.closed {
		return fmt.Errorf("%s: hypervisor closed", m.uri)
	}
	return nil
}

func (m *Memory) List(ctx context.Context) ([]Domain, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(ctx); err != nil {
		return nil, err
	}
	out := make([]Domain, 0, len(m.domains))
	for _, d := range m.domains {
		out = append(out, *d)
	}
	return out, nil
}

func (m *Memory) Lookup(ctx context.Context, name string) (*Domain, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(ctx); err != nil {
		return nil, err
	}
	d, ok := m.domains[name]
	if !ok {
		return nil, nil
	}
	c := *d
	return &c, nil
}

// EnsureCephSecret has nothing to store: no guest reads a disk here.
func (m *Memory) EnsureCephSecret(ctx context.Context, user, _ string) (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return uuid.NewSHA1(uuid.NameSpaceOID, []byte("herd ceph secret client."+user)).String(), m.check(ctx)
}

// Define creates or updates a definition; a running domain keeps running with the new metadata,
// as libvirt updates herd's metadata live.
func (m *Memory) Define(ctx context.Context, s Spec) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(ctx); err != nil {
		return err
	}
	d, ok := m.domains[s.Name]
	if !ok {
		id := s.UUID
		if id == "" {
			id = uuid.NewString()
		}
		d = &Domain{Name: s.Name, UUID: id, State: Stopped}
		m.domains[s.Name] = d
	}
	d.Managed, d.UID, d.Epoch, d.Cluster, d.Restarts = true, s.UID, s.Epoch, s.Cluster, s.Restarts
	return nil
}

func (m *Memory) setState(ctx context.Context, op, name string, from, to State) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(ctx); err != nil {
		return err
	}
	d, ok := m.domains[name]
	if !ok {
		return fmt.Errorf("%s %s: no such domain", op, name)
	}
	if from == "" || d.State == from {
		d.State = to
	}
	return nil
}

// Start boots a defined domain; starting a running domain is not an error.
func (m *Memory) Start(ctx context.Context, name string) error {
	return m.setState(ctx, "start", name, "", Running)
}

// Shutdown powers the domain off at once (a guest that heeds ACPI, instantly).
func (m *Memory) Shutdown(ctx context.Context, name string) error {
	return m.setState(ctx, "shutdown", name, Running, Stopped)
}

// Destroy pulls the plug; destroying a stopped domain is not an error.
func (m *Memory) Destroy(ctx context.Context, name string) error {
	return m.setState(ctx, "destroy", name, Running, Stopped)
}

// Remove undefines a domain; a missing one is not an error.
func (m *Memory) Remove(ctx context.Context, name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(ctx); err != nil {
		return err
	}
	delete(m.domains, name)
	return nil
}

// Migrate moves a running domain to the in-memory hypervisor at peerURI in this process: running
// and defined there, gone here.
func (m *Memory) Migrate(ctx context.Context, name, peerURI, _ string) error {
	if !strings.HasPrefix(peerURI, MemoryScheme) {
		return fmt.Errorf("migrate %s: %s is not an in-memory hypervisor", name, peerURI)
	}
	v, ok := memoryHosts.Load(peerURI)
	if !ok {
		return fmt.Errorf("migrate %s to %s: no such hypervisor in this process", name, peerURI)
	}
	peer := v.(*Memory)
	if peer == m {
		return fmt.Errorf("migrate %s: %s is this hypervisor", name, peerURI)
	}
	m.mu.Lock()
	if err := m.check(ctx); err != nil {
		m.mu.Unlock()
		return err
	}
	d, ok := m.domains[name]
	if !ok || d.State != Running {
		m.mu.Unlock()
		return fmt.Errorf("migrate %s: not running here", name)
	}
	moved := *d
	delete(m.domains, name)
	m.mu.Unlock()

	peer.mu.Lock()
	gone := peer.closed
	if !gone {
		peer.domains[name] = &moved
	}
	peer.mu.Unlock()
	if gone {
		// The peer died mid-migration: the domain stays here, as libvirt leaves it on the source.
		m.mu.Lock()
		m.domains[name] = &moved
		m.mu.Unlock()
		return fmt.Errorf("migrate %s to %s: peer gone", name, peerURI)
	}
	return nil
}
