package e2e

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/herdhq/herd/e2e/rig"
	"github.com/herdhq/herd/lib/keys"
)

// TestEtcdRestoredFromBackup is issue 18's scenario: a snapshot, then moves, creates and a delete,
// then etcd restored from the snapshot under running daemons. At no sample of any node's libvirt
// does a VM run twice; every VM that ran before the restore runs after it, exactly once (those
// created after the backup as orphans); the VM deleted after the backup is not started again; a
// VM created after the restore runs; the new history never assigns or reports one VM twice.
func TestEtcdRestoredFromBackup(t *testing.T) {
	r := newLossRig(t, 3)
	// binpack puts v00..v05 on node 1; the test driver cannot migrate live, so moves restart.
	var names []string
	for i := range 6 {
		names = append(names, fmt.Sprintf("v%02d", i))
		r.Herdctl("vm", "create", names[i], "--memory", "256MiB", "--migration-policy", "restart")
	}
	rig.Eventually(t, 30*time.Second, "VMs running", func() error { return allInState(r.Cluster, names, "running") })
	backup := r.SnapshotEtcd("backup")

	// After the backup: three VMs move, two are created, one is deleted.
	r.Herdctl("vm", "migrate", "v00", "--to", r.node(2))
	r.Herdctl("vm", "migrate", "v01", "--to", r.node(3))
	r.Herdctl("vm", "migrate", "v03", "--to", r.node(2))
	r.Herdctl("vm", "create", "v06", "--memory", "256MiB")
	r.Herdctl("vm", "create", "v07", "--memory", "256MiB")
	r.Herdctl("vm", "delete", "v02")
	kept := []string{"v00", "v01", "v03", "v04", "v05", "v06", "v07"}
	rig.Eventually(t, 60*time.Second, "moves, creates and the delete done", func() error {
		where := runningOn(t, r.Cluster)
		for _, n := range []string{"v00", "v03"} {
			if fmt.Sprint(where[n]) != fmt.Sprint([]string{r.node(2)}) {
				return fmt.Errorf("%s runs on %v", n, where[n])
			}
		}
		if fmt.Sprint(where["v01"]) != fmt.Sprint([]string{r.node(3)}) {
			return fmt.Errorf("v01 runs on %v", where["v01"])
		}
		if len(where["v02"]) != 0 {
			return fmt.Errorf("v02 runs on %v", where["v02"])
		}
		for _, n := range kept {
			if len(where[n]) != 1 {
				return fmt.Errorf("%s runs on %v", n, where[n])
			}
		}
		return nil
	})
	before := runningOn(t, r.Cluster)

	// Sample every node's libvirt from just before the restore until the end.
	samples := sampleLibvirt(t, r.Cluster, twiceAnywhere)
	r.RestoreEtcd(backup)
	back := time.Now() // etcd serves the restored keyspace
	var rec keys.Cluster
	recovered := func() error {
		out, _, code := r.Run("etcdctl", "--endpoints", r.Endpoint, "get", space.Cluster(), "--print-value-only")
		if code != 0 {
			return fmt.Errorf("etcdctl get: exit %d", code)
		}
		if err := json.Unmarshal([]byte(out), &rec); err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		if rec.Restore == nil || rec.Restore.Phase != keys.RestoreDone {
			return fmt.Errorf("restore %+v", rec.Restore)
		}
		return nil
	}
	// Not rig.Eventually: if recovery never comes, what the nodes did meanwhile is the finding.
	err := recovered()
	for deadline := time.Now().Add(90 * time.Second); err != nil && time.Now().Before(deadline); err = recovered() {
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		time.Sleep(5 * time.Second)
		if _, found := samples(); len(found) > 0 {
			t.Errorf("a VM ran on two nodes at once: %v", found)
		}
		t.Fatalf("restore recovery not done 90 s after etcd came back: %v", err)
	}
	t.Logf("restore recovery %d: reconciled %s after etcd served the restored keyspace (collecting took %s; %s)", rec.Restore.Generation,
		time.Since(back).Round(100*time.Millisecond), rec.Restore.Done.Sub(rec.Restore.Since).Round(time.Millisecond), rec.Restore.Why)

	// A VM created after the restore runs.
	created := time.Now()
	r.Herdctl("vm", "create", "v08", "--memory", "256MiB")
	rig.Eventually(t, 30*time.Second, "v08 runs", func() error {
		if w := runningOn(t, r.Cluster)["v08"]; len(w) != 1 {
			return fmt.Errorf("v08 on %v", w)
		}
		return nil
	})
	t.Logf("a VM created after the recovery ran %s after its create", time.Since(created).Round(100*time.Millisecond))
	time.Sleep(5 * time.Second) // resyncs (2 s) would have destroyed or started anything wrong by now
	after := runningOn(t, r.Cluster)
	for _, n := range kept {
		if fmt.Sprint(after[n]) != fmt.Sprint(before[n]) {
			t.Errorf("%s ran on %v before the restore, on %v after", n, before[n], after[n])
		}
	}
	if len(after["v02"]) != 0 {
		t.Errorf("v02, deleted after the backup, runs again on %v", after["v02"])
	}
	orphans := r.Herdctl("vm", "orphans")
	for _, n := range []string{"v06", "v07"} {
		if !strings.Contains(orphans, n) {
			t.Errorf("%s (created after the backup) is not listed as an orphan:\n%s", n, orphans)
		}
	}
	if vm := r.VMs()["v02"]; vm.Problem == nil || vm.Problem.Kind != keys.ProblemRestoreHold {
		t.Errorf("v02 is not held after the restore: %+v", vm)
	}
	n, found := samples()
	t.Logf("%d samples of every node's libvirt", n)
	if len(found) > 0 {
		t.Errorf("a VM ran on two nodes at once: %v", found)
	}

	// The operator releases the held VM: it runs once.
	r.Herdctl("vm", "release", "v02")
	rig.Eventually(t, 30*time.Second, "v02 released", func() error {
		if w := runningOn(t, r.Cluster)["v02"]; len(w) != 1 {
			return fmt.Errorf("v02 on %v", w)
		}
		return nil
	})
	// And forgets an orphan: its node destroys it.
	r.Herdctl("vm", "forget", "v07")
	rig.Eventually(t, 30*time.Second, "v07 forgotten", func() error {
		if w := runningOn(t, r.Cluster)["v07"]; len(w) != 0 {
			return fmt.Errorf("v07 on %v", w)
		}
		return nil
	})
	// And adopts the other: managed again where it runs, without a restart; then deleted like
	// any VM.
	r.Herdctl("vm", "adopt", "v06", "--memory", "256MiB", "--wait")
	if w := runningOn(t, r.Cluster)["v06"]; fmt.Sprint(w) != fmt.Sprint(before["v06"]) {
		t.Errorf("v06 ran on %v before, on %v once adopted", before["v06"], w)
	}
	if out := r.Herdctl("vm", "orphans", "-o", "json"); strings.Contains(out, `"v06"`) {
		t.Errorf("v06 still an orphan once adopted:\n%s", out)
	}
	ev := r.Herdctl("events", "--object", "vm/v06")
	if !strings.Contains(ev, "adopted") {
		t.Errorf("no adoption event:\n%s", ev)
	}
	if n := strings.Count(ev, " started "); n != 0 {
		// Its first start's event went with the history after the backup.
		t.Errorf("v06 started %d times since the restore (never, as it was adopted running):\n%s", n, ev)
	}
	r.Herdctl("vm", "delete", "v06")
	rig.Eventually(t, 30*time.Second, "adopted v06 deleted", func() error {
		if w := runningOn(t, r.Cluster)["v06"]; len(w) != 0 {
			return fmt.Errorf("v06 on %v", w)
		}
		return nil
	})
	assertOneRunnableAssignment(t, r.Cluster)
	assertNeverRunningTwice(t, r.Cluster)
}

// TestEtcdRestoredWhileEveryDaemonWasDown: etcd is restored while every coordinator and agent is
// stopped, so no running daemon sees its revision go back; they notice from the revision files
// their earlier runs kept. The test driver's nodes lose their domains with their agents (as
// rebooted hypervisors would), so nothing that ran before runs after: every VM the backup knows
// is held for an operator, and above all the VM deleted after the backup is not started again
// from the restored assignment.
func TestEtcdRestoredWhileEveryDaemonWasDown(t *testing.T) {
	r := newLossRig(t, 2)
	names := []string{"v00", "v01", "v02"}
	for _, n := range names {
		r.Herdctl("vm", "create", n, "--memory", "256MiB")
	}
	rig.Eventually(t, 30*time.Second, "VMs running", func() error { return allInState(r.Cluster, names, "running") })
	backup := r.SnapshotEtcd("backup")
	r.Herdctl("vm", "delete", "v02")
	rig.Eventually(t, 30*time.Second, "v02 gone", func() error {
		if w := runningOn(t, r.Cluster)["v02"]; len(w) != 0 {
			return fmt.Errorf("v02 on %v", w)
		}
		return nil
	})
	// Later revisions than the backup's, seen by every daemon (they keep what they saw every few
	// seconds, and at a clean stop).
	r.Herdctl("vm", "create", "v03", "--memory", "256MiB")
	rig.Eventually(t, 30*time.Second, "v03 running", func() error { return allInState(r.Cluster, []string{"v03"}, "running") })
	for _, co := range r.Coords {
		co.Stop(10 * time.Second)
	}
	for _, hwid := range []string{r.node(1), r.node(2)} {
		r.Agents[hwid].Stop(10 * time.Second)
	}
	r.RestoreEtcd(backup)
	for n := 1; n <= 2; n++ {
		r.StartCoordinator("--revision-file", rig.CoordinatorRevisionFile(r.Dir, n))
	}
	for _, hwid := range []string{r.node(1), r.node(2)} {
		r.StartAgent(hwid, 16, 32768)
	}
	samples := sampleLibvirt(t, r.Cluster, func(where map[string][]string) []string {
		if w := where["v02"]; len(w) > 0 {
			return []string{fmt.Sprintf("v02 (deleted after the backup) runs on %v", w)}
		}
		return twiceAnywhere(where)
	})
	rig.Eventually(t, 60*time.Second, "restore recovery done", func() error {
		var rec keys.Cluster
		out := r.Etcdctl("get", space.Cluster(), "--print-value-only")
		if err := json.Unmarshal([]byte(out), &rec); err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		if rec.Restore == nil || rec.Restore.Phase != keys.RestoreDone {
			return fmt.Errorf("restore %+v", rec.Restore)
		}
		t.Logf("recovery %d: %s", rec.Restore.Generation, rec.Restore.Why)
		return nil
	})
	rig.Eventually(t, 30*time.Second, "the backup's VMs held", func() error {
		vms := r.VMs()
		for _, n := range names {
			if vm := vms[n]; vm.Problem == nil || vm.Problem.Kind != keys.ProblemRestoreHold {
				return fmt.Errorf("%s: %+v", n, vm)
			}
		}
		return nil
	})
	time.Sleep(5 * time.Second) // resyncs (2 s) would have started anything wrong by now
	n, found := samples()
	t.Logf("%d samples of every node's libvirt", n)
	if len(found) > 0 {
		t.Errorf("after the restore: %v", found)
	}
	// The operator starts the VMs that should run; v02 stays deleted.
	r.Herdctl("vm", "release", "v00")
	r.Herdctl("vm", "delete", "v02")
	rig.Eventually(t, 30*time.Second, "v00 released", func() error { return allInState(r.Cluster, []string{"v00"}, "running") })
	assertOneRunnableAssignment(t, r.Cluster)
}

// sampleLibvirt samples every node's libvirt every 100 ms until the test ends, and hands each
// sample to check, which names what is wrong in it. The returned function says how many samples
// were taken and the first findings (up to 10).
func sampleLibvirt(t *testing.T, c *rig.Cluster, check func(running map[string][]string) []string) func() (int, []string) {
	var mu sync.Mutex
	var found []string
	samples := 0
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			where, ok := sampleRunning(c)
			if !ok {
				continue
			}
			bad := check(where)
			mu.Lock()
			samples++
			found = append(found, bad[:min(len(bad), 10-min(10, len(found)))]...)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() { close(stop); wg.Wait() })
	return func() (int, []string) {
		mu.Lock()
		defer mu.Unlock()
		return samples, append([]string(nil), found...)
	}
}

// twiceAnywhere names every VM running on more than one node.
func twiceAnywhere(where map[string][]string) []string {
	var out []string
	for n, nodes := range where {
		if len(nodes) > 1 {
			out = append(out, fmt.Sprintf("%s on %v", n, nodes))
		}
	}
	return out
}

// sampleRunning is every herd domain running on any agent, by VM name; false if an agent did not
// answer.
func sampleRunning(c *rig.Cluster) (map[string][]string, bool) {
	out := map[string][]string{}
	for hwid, a := range c.Agents {
		doms, err := a.Domains()
		if err != nil {
			return nil, false
		}
		for _, d := range doms {
			if d.Managed && d.State == "running" {
				out[d.Name] = append(out[d.Name], hwid)
			}
		}
	}
	for _, nodes := range out {
		sort.Strings(nodes)
	}
	return out, true
}

func runningOn(t *testing.T, c *rig.Cluster) map[string][]string {
	t.Helper()
	var out map[string][]string
	rig.Eventually(t, 10*time.Second, "every agent answers", func() error {
		var ok bool
		if out, ok = sampleRunning(c); !ok {
			return fmt.Errorf("an agent did not answer")
		}
		return nil
	})
	return out
}
