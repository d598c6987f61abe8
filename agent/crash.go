package agent

import (
	"time"

	"github.com/herdhq/herd/agent/hypervisor"
)

// A guest whose domain stops although the agent did not stop it has crashed (QEMU died, or the
// guest panicked and libvirt destroyed it). It is started again on this node, which still holds
// its assignment, with exponential backoff, so that a guest that dies at boot does not spin
// QEMU at full speed; each crash is an event, and a crash loop is reported for the leader to turn
// into a problem record (`herdctl vm get` shows it).
const (
	// crashWindow is how far back crashes count.
	crashWindow = 10 * time.Minute
	// crashLoop crashes within crashWindow are a crash loop.
	crashLoop = 5
	// maxCrashBackoff bounds the wait before a restart.
	maxCrashBackoff = 5 * time.Minute
)

// crashBackoff is the wait before restarting a guest after its nth crash in the window: first,
// twice that, four times, ... up to maxCrashBackoff.
func crashBackoff(first time.Duration, n int) time.Duration {
	if n < 1 {
		return 0
	}
	if n > 20 {
		return maxCrashBackoff
	}
	return min(first<<(n-1), maxCrashBackoff)
}

// ranAs is the domain a guest was seen running as: a crash is that very domain found stopped (a
// re-created VM, or one moved away and back, is another uid or epoch, not a crash).
type ranAs struct{ uid, epoch int64 }

// sawRunning records that the guest runs as its assignment wants: if the same domain stops later
// without the agent stopping it, it crashed.
func (a *Agent) sawRunning(name string, uid, epoch int64) {
	a.mu.Lock()
	a.ran[name] = ranAs{uid, epoch}
	a.mu.Unlock()
}

// stoppedOnPurpose forgets that the guest ran: the agent stopped it (or it left), no crash.
func (a *Agent) stoppedOnPurpose(name string) {
	a.mu.Lock()
	delete(a.ran, name)
	a.mu.Unlock()
}

// crashGate is asked before starting a guest that should run. A guest this agent saw running has
// crashed: the crash is counted (and recorded once). It returns how long the start must still
// wait and how many crashes the window holds.
func (a *Agent) crashGate(name string, dom *hypervisor.Domain, now time.Time) (wait time.Duration, crashes int) {
	a.mu.Lock()
	seen, ok := a.ran[name]
	crashed := ok && dom != nil && seen == ranAs{dom.UID, dom.Epoch}
	delete(a.ran, name)
	recent := a.crashes[name][:0]
	for _, t := range a.crashes[name] {
		if now.Sub(t) < crashWindow {
			recent = append(recent, t)
		}
	}
	if crashed {
		recent = append(recent, now)
		a.notBefore[name] = now.Add(crashBackoff(a.cfg.CrashBackoff, len(recent)))
	}
	a.crashes[name] = recent
	if len(recent) == 0 {
		delete(a.crashes, name)
	}
	nb := a.notBefore[name]
	a.mu.Unlock()
	if crashed {
		a.log.Warn("the guest stopped although nothing stopped it: crashed; starting it again", "vm", name, "crashes", len(recent), "window", crashWindow, "backoff", crashBackoff(a.cfg.CrashBackoff, len(recent)))
		a.events.Record("vm/"+name, "crashed", "on %s (%d in %s); starting again in %s", a.hwid, len(recent), crashWindow, crashBackoff(a.cfg.CrashBackoff, len(recent)))
	}
	if now.Before(nb) {
		return nb.Sub(now), len(recent)
	}
	return 0, len(recent)
}
