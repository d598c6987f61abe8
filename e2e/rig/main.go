package rig

import (
	"fmt"
	"os"
	"testing"

	"github.com/herdhq/herd/lib/leaktest"
)

// Main is an e2e package's TestMain: it builds herd and herdctl into a temporary directory named
// after prefix, sets *bin, runs the tests, removes the binaries and exits, failing on leaked
// goroutines.
func Main(m *testing.M, prefix string, bin *Binaries) {
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if *bin, err = Build(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(leaktest.Check(code))
}
