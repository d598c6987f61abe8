package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/herdhq/herd/lib/keys"
)

// TestNearlyFullDiskIsANodeProblem: a watched filesystem under its free-space floor (here: a
// floor above what the real filesystem has) becomes the node's problem in its record, which keeps
// the leader from placing VMs there; when the filesystem no longer needs watching (its path
// gone), the problem goes.
func TestNearlyFullDiskIsANodeProblem(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "console")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	_, _, free := diskShort([]string{dir}, 0)
	if free[dir] == 0 {
		t.Fatalf("statfs %s: %v", dir, free)
	}
	h := startWith(t, nil, func(c *Config) {
		c.DiskPaths = []string{dir}
		c.DiskMinFree = free[dir] + 1<<40
	})
	problem := func() string {
		resp, err := h.c.Get(context.Background(), space.Node(hwid))
		if err != nil || len(resp.Kvs) == 0 {
			return fmt.Sprintf("no node record: %v", err)
		}
		n, err := keys.Decode[keys.Node](resp.Kvs[0].Value)
		if err != nil {
			return err.Error()
		}
		return n.Problem
	}
	h.eventually("the node registers the full disk", func() error {
		if p := problem(); !strings.Contains(p, "disk nearly full") || !strings.Contains(p, dir) {
			return fmt.Errorf("problem %q", p)
		}
		return nil
	})
	if err := os.Remove(dir); err != nil {
		t.Fatal(err)
	}
	h.eventually("the problem goes", func() error {
		if p := problem(); p != "" {
			return fmt.Errorf("problem %q", p)
		}
		return nil
	})
}
