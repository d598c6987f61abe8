package decide

import (
	"strings"
	"testing"

	"github.com/herdhq/herd/lib/keys"
)

func TestCrashLoopIsAProblem(t *testing.T) {
	w := newWorld(t)
	w.node("n1", 4, 8)
	w.vm("a", 1, 512)
	w.settle()
	w.report("n1", "a", keys.StateCrashLoop, func(st *keys.VMStatus) { st.Message = "crashed 5 times in 10m0s; starting again at 12:00:16" })
	w.settle()
	if p := w.problem("a"); !strings.HasPrefix(p, keys.ProblemCrashLoop+": on n1: crashed 5 times") {
		t.Fatalf("problem %q", p)
	}
	if w.placedOn("a") != "n1" {
		t.Fatal("a crash loop moved the VM: it stays where its node restarts it")
	}
	w.report("n1", "a", keys.StateRunning)
	w.settle()
	if p := w.problem("a"); p != "" {
		t.Fatalf("problem %q after the guest runs again", p)
	}
}
