// Package fence makes sure a lost node can no longer touch its VMs' disks before they run
// elsewhere. A Fencer is asked to fence one boot of one node; it returns only when that boot is
// fenced (or fails). Fencers are idempotent: a new leader may run one again for the same boot.
package fence

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/herdhq/herd/lib/keys"
)

// Target is the boot to fence and what is known of the node.
type Target struct {
	HWID      string
	BootID    string
	Addresses keys.Addresses
	StorageIP string
	Labels    map[string]string
	VMs       []string
	// Disks are the node's VMs' shared-storage disks, pool/image.
	Disks []string
}

// Fencer fences one boot of one node.
type Fencer interface {
	// Name is recorded in the fence record (exec, ceph, none, or a combination).
	Name() string
	// Fence returns details to record (what was done) or an error (nothing may move).
	Fence(ctx context.Context, t Target) (map[string]string, error)
}

// Exec runs an operator's command, e.g. a fence agent that powers the node off through its BMC.
// The command runs through /bin/sh -c with the target in the environment: HERD_HWID, HERD_BOOT_ID,
// HERD_MGMT_ADDR, HERD_STORAGE_IP, HERD_LABELS (k=v,...), HERD_LABEL_<KEY> per label. Exit status 0
// means fenced.
type Exec struct {
	Command string
	Timeout time.Duration
}

// Name implements Fencer.
func (e Exec) Name() string { return "exec" }

// Fence implements Fencer.
func (e Exec) Fence(ctx context.Context, t Target) (map[string]string, error) {
	if e.Command == "" {
		return nil, errors.New("fence exec: no command configured")
	}
	to := e.Timeout
	if to == 0 {
		to = time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, to)
	defer cancel()
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", e.Command)
	// A timed-out fence agent dies with everything it started, and its output pipe cannot keep
	// the coordinator waiting.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	cmd.Env = append(os.Environ(),
		"HERD_HWID="+t.HWID,
		"HERD_BOOT_ID="+t.BootID,
		"HERD_MGMT_ADDR="+t.Addresses.Management,
		"HERD_STORAGE_IP="+t.StorageIP,
	)
	names := make([]string, 0, len(t.Labels))
	for k := range t.Labels {
		names = append(names, k)
	}
	sort.Strings(names)
	var pairs []string
	for _, k := range names {
		pairs = append(pairs, k+"="+t.Labels[k])
		cmd.Env = append(cmd.Env, "HERD_LABEL_"+envName(k)+"="+t.Labels[k])
	}
	cmd.Env = append(cmd.Env, "HERD_LABELS="+strings.Join(pairs, ","))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	msg := strings.TrimSpace(out.String())
	if len(msg) > 500 {
		msg = msg[len(msg)-500:]
	}
	if ctx.Err() == context.DeadlineExceeded {
		return nil, fmt.Errorf("fence command timed out after %s: %s", to, msg)
	}
	if err != nil {
		return nil, fmt.Errorf("fence command failed (%v): %s", err, msg)
	}
	return map[string]string{"exec": msg}, nil
}

func envName(k string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z':
			return r - 'a' + 'A'
		case r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
			return r
		}
		return '_'
	}, k)
}

// None fences nothing. It is only for labs (`herd dev`) and only behind --unsafe-no-fencing: a node
// that is merely cut off may still be running its VMs when they start elsewhere.
type None struct{}

// Name implements Fencer.
func (None) Name() string { return "none" }

// Fence implements Fencer.
func (None) Fence(context.Context, Target) (map[string]string, error) {
	return map[string]string{"none": "not fenced: --unsafe-no-fencing"}, nil
}

// All runs every fencer in order and succeeds only if each does (power off AND blocklist).
type All []Fencer

// Name implements Fencer.
func (a All) Name() string {
	names := make([]string, len(a))
	for i, f := range a {
		names[i] = f.Name()
	}
	return strings.Join(names, "+")
}

// Fence implements Fencer.
func (a All) Fence(ctx context.Context, t Target) (map[string]string, error) {
	if len(a) == 0 {
		return nil, errors.New("no fencer configured: configure --fence-exec (or --unsafe-no-fencing in a lab)")
	}
	out := map[string]string{}
	for _, f := range a {
		d, err := f.Fence(ctx, t)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", f.Name(), err)
		}
		for k, v := range d {
			out[k] = v
		}
	}
	return out, nil
}
