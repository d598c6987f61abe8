// Package leaktest checks that a test binary's goroutines are all gone when its tests end: every
// package of herd that starts goroutines runs its tests under it, so a loop that outlives its
// context, a watch never cancelled or a worker never joined fails the package that leaked it.
package leaktest

import (
	"fmt"
	"os"
	"testing"

	"go.uber.org/goleak"
)

// ignored are goroutines libraries start once per process and never stop, on purpose.
var ignored = []goleak.Option{
	// etcd's embedded server (etcdtest) and gRPC.
	goleak.IgnoreTopFunction("go.opencensus.io/stats/view.(*worker).start"),
	goleak.IgnoreAnyFunction("google.golang.org/grpc/internal/grpcsync.(*CallbackSerializer).run"),
	goleak.IgnoreAnyFunction("go.etcd.io/etcd/pkg/v3/schedule.(*fifo).run"),
	// klog's flush daemon, started by a dependency's init.
	goleak.IgnoreTopFunction("k8s.io/klog/v2.(*flushDaemon).run.func1"),
}

// Main runs the tests, then fails the binary if any goroutine is left.
func Main(m *testing.M) { os.Exit(Check(m.Run())) }

// Check is for a TestMain with its own set-up and tear-down: code is m.Run's result; call it after
// the tear-down. It returns the code to exit with.
func Check(code int) int {
	if code != 0 {
		return code
	}
	if err := goleak.Find(ignored...); err != nil {
		fmt.Fprintln(os.Stderr, "goroutines left after the tests:", err)
		return 1
	}
	return 0
}
