package qemu

import (
	"bytes"
	"fmt"
	"io"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/herdhq/herd/e2e/rig"
)

// syncBuffer collects a process's output while the test reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// session is `herdctl vm console` running with a pipe for a keyboard.
type session struct {
	t    *testing.T
	vm   string
	in   io.WriteCloser
	out  *syncBuffer
	done chan error
	pid  int
}

func attach(t *testing.T, l *rig.Lab, vm string, args ...string) *session {
	t.Helper()
	cmd := l.NS.Command(l.Bin.Herdctl, append([]string{"--endpoints", l.Endpoint, "vm", "console", vm}, args...)...)
	s := &session{t: t, vm: vm, out: &syncBuffer{}, done: make(chan error, 1)}
	cmd.Stdout, cmd.Stderr = s.out, s.out
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	s.in = in
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s.pid = cmd.Process.Pid
	go func() { s.done <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-s.done
	})
	return s
}

// sees waits until the session's output contains want.
func (s *session) sees(want string) {
	s.t.Helper()
	rig.Eventually(s.t, 30*time.Second, fmt.Sprintf("console of %s shows %q", s.vm, want), func() error {
		if !strings.Contains(s.out.String(), want) {
			return fmt.Errorf("output so far:\n%s", s.out.String())
		}
		return nil
	})
}

func (s *session) typeLine(line string) {
	s.t.Helper()
	if _, err := io.WriteString(s.in, line+"\n"); err != nil {
		s.t.Fatal(err)
	}
}

// exit waits for herdctl to end and returns its error (nil: exit status 0).
func (s *session) exit() error {
	s.t.Helper()
	select {
	case err := <-s.done:
		s.done <- err // for the cleanup
		return err
	case <-time.After(30 * time.Second):
		s.t.Fatalf("herdctl vm console %s did not end; output:\n%s", s.vm, s.out.String())
		return nil
	}
}

// checkConsole drives vm's serial console the way an operator does, on a real QEMU guest: the log
// holds what the guest printed before anyone attached (and before it moved); a session types and
// the guest answers; a second session is refused while one holds the console, --force takes it;
// Ctrl+] detaches and frees it; --log -f follows; every session is an event.
func checkConsole(t *testing.T, l *rig.Lab, vm string) {
	log := l.MustHerdctl("vm", "console", vm, "--log", "--bytes", "0")
	if !strings.Contains(log, "guest "+vm+": booted") || !strings.Contains(log, "guest "+vm+": counter") {
		t.Fatalf("console log of %s lacks the boot:\n%s", vm, log)
	}
	if tail := l.MustHerdctl("vm", "console", vm, "--log", "--bytes", "100"); len(tail) > 100 {
		t.Fatalf("--bytes 100 printed %d bytes", len(tail))
	}

	s := attach(t, l, vm)
	s.sees("Connected to vm/" + vm)
	s.typeLine("hello-console")
	s.sees("guest " + vm + ": heard hello-console")
	if out, err := l.Herdctl("vm", "console", vm); err == nil || !strings.Contains(err.Error(), "holds the console") || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("a second session while one holds the console: %v\n%s", err, out)
	}
	if _, err := s.in.Write([]byte{0x1d}); err != nil {
		t.Fatal(err)
	}
	if err := s.exit(); err != nil {
		t.Fatalf("detach: %v\n%s", err, s.out.String())
	}
	if !strings.Contains(s.out.String(), "Detached from vm/"+vm) {
		t.Fatalf("no detach message:\n%s", s.out.String())
	}

	// Detached means free: a new session without --force gets it; --force then takes it over.
	s2 := attach(t, l, vm)
	s2.typeLine("second-session")
	s2.sees("heard second-session")
	s3 := attach(t, l, vm, "--force")
	s3.typeLine("third-session")
	s3.sees("heard third-session")
	if err := s2.exit(); err == nil || !strings.Contains(s2.out.String(), "ended") {
		t.Fatalf("the session whose console was taken: %v\n%s", err, s2.out.String())
	}
	_, _ = s3.in.Write([]byte{0x1d})
	if err := s3.exit(); err != nil {
		t.Fatalf("detach: %v\n%s", err, s3.out.String())
	}

	// --log -f follows the guest's counter until interrupted.
	f := attach(t, l, vm, "--log", "--bytes", "1", "-f")
	f.sees("guest " + vm + ": counter")
	if err := syscall.Kill(f.pid, syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	if err := f.exit(); err != nil {
		t.Fatalf("--log -f interrupted: %v\n%s", err, f.out.String())
	}

	// The web console's VM page streams the same log (herdctl ui in the lab's namespace).
	ui := l.NS.Command(l.Bin.Herdctl, "--endpoints", l.Endpoint, "ui", "--listen", "127.0.0.1:18480")
	if err := ui.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ui.Process.Kill(); _ = ui.Wait() })
	rig.Eventually(t, 30*time.Second, "the web console streams the serial console", func() error {
		out, _ := l.NS.Command("curl", "-s", "-N", "-m", "3", "http://127.0.0.1:18480/vms/"+vm+"/console").Output()
		if !strings.Contains(string(out), "guest "+vm+": counter") {
			return fmt.Errorf("got %q", out)
		}
		return nil
	})

	ev := l.MustHerdctl("events", "--object", "vm/"+vm)
	for _, want := range []string{"console-open", "anonymous attached to the serial console", "taking it over", "console-close", "bytes typed", "console-log"} {
		if !strings.Contains(ev, want) {
			t.Fatalf("events of vm/%s lack %q:\n%s", vm, want, ev)
		}
	}
}
