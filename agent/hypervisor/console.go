package hypervisor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"

	"libvirt.org/go/libvirt"

	"github.com/herdhq/herd/lib/console"
)

// The console's errors are the protocol's (lib/console), so that herdctl need not link libvirt.
var (
	ErrNoConsole   = console.ErrNoConsole
	ErrConsoleBusy = console.ErrBusy
)

// OpenConsole attaches to the running domain's serial console: what the guest prints is read,
// what is written is typed into it. libvirt lets one session hold a console at a time; force takes
// it from the current holder (whose stream ends). Close detaches.
func (h *Libvirt) OpenConsole(ctx context.Context, name string, force bool) (io.ReadWriteCloser, error) {
	c, err := h.connection()
	if err != nil {
		return nil, err
	}
	var st *libvirt.Stream
	err = h.call(ctx, "open console "+name, func() error {
		dom, err := c.LookupDomainByName(name)
		if err != nil {
			return err
		}
		defer dom.Free()
		s, err := c.NewStream(0)
		if err != nil {
			return err
		}
		var flags libvirt.DomainConsoleFlags = libvirt.DOMAIN_CONSOLE_SAFE
		if force {
			flags |= libvirt.DOMAIN_CONSOLE_FORCE
		}
		if err := dom.OpenConsole("", s, flags); err != nil {
			_ = s.Free()
			return err
		}
		st = s
		return nil
	})
	if err != nil {
		var lerr libvirt.Error
		if errors.As(err, &lerr) {
			switch {
			case lerr.Code == libvirt.ERR_NO_SUPPORT:
				return nil, fmt.Errorf("console of %s: %w (libvirt %s: %s)", name, ErrNoConsole, h.domType, lerr.Message)
			case lerr.Code == libvirt.ERR_OPERATION_FAILED && !force:
				// libvirt's "Active console session exists for this domain".
				return nil, fmt.Errorf("console of %s: %w (%s)", name, ErrConsoleBusy, lerr.Message)
			case strings.Contains(lerr.Message, "not using a PTY"):
				// Defined by a herd whose consoles were output-only files: the log works, a
				// restart gives it a pty.
				return nil, fmt.Errorf("console of %s: %w: it runs with the output-only console of an older herd; restart it (herdctl vm restart %s) for an interactive one; --log works", name, ErrNoConsole, name)
			case lerr.Code == libvirt.ERR_OPERATION_INVALID || lerr.Code == libvirt.ERR_CONFIG_UNSUPPORTED:
				return nil, fmt.Errorf("console of %s: %w: %s", name, ErrNoConsole, lerr.Message)
			}
		}
		if st != nil {
			// The call timed out after libvirt opened the stream: nobody will read it.
			_ = st.Abort()
		}
		return nil, err
	}
	return &libvirtConsole{st: st}, nil
}

// libvirtConsole is a blocking libvirt stream as an io.ReadWriteCloser. The stream is freed only
// when it is closed and no Recv is in flight: freeing under a blocked reader would be a use after
// free in C.
type libvirtConsole struct {
	st *libvirt.Stream

	mu      sync.Mutex
	readers int
	closed  bool
	freed   bool
}

func (c *libvirtConsole) enter() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.readers++
	return true
}

func (c *libvirtConsole) leave() {
	c.mu.Lock()
	c.readers--
	free := c.closed && c.readers == 0 && !c.freed
	if free {
		c.freed = true
	}
	c.mu.Unlock()
	if free {
		_ = c.st.Free()
	}
}

func (c *libvirtConsole) Read(p []byte) (int, error) {
	if !c.enter() {
		return 0, io.EOF
	}
	defer c.leave()
	n, err := c.st.Recv(p)
	if err != nil {
		return 0, err
	}
	if n < 0 { // -2: would block, which a blocking stream never says; read again
		return 0, nil
	}
	return n, nil
}

func (c *libvirtConsole) Write(p []byte) (int, error) {
	if !c.enter() {
		return 0, io.ErrClosedPipe
	}
	defer c.leave()
	done := 0
	for done < len(p) {
		n, err := c.st.Send(p[done:])
		if err != nil {
			return done, err
		}
		if n < 0 {
			continue
		}
		done += n
	}
	return done, nil
}

// Close aborts the stream, which ends a Recv blocked in another goroutine; the stream is freed by
// whoever leaves it last.
func (c *libvirtConsole) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	free := c.readers == 0
	c.freed = free
	c.mu.Unlock()
	err := c.st.Abort()
	if free {
		_ = c.st.Free()
	}
	return err
}

// OpenConsole: the in-memory model runs no guests, so there is nothing to attach to.
func (m *Memory) OpenConsole(ctx context.Context, name string, _ bool) (io.ReadWriteCloser, error) {
	return nil, fmt.Errorf("console of %s: %w (in-memory hypervisor: no guest runs)", name, ErrNoConsole)
}
