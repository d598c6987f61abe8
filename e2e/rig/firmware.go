package rig

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// Firmware plays the machines' firmware for rollouts. An agent started with --reboot-command
// Firmware.Command(hwid) touches a marker when it executes a reboot; the firmware then calls the
// test's reboot function, which stops that agent and starts it again as a new boot of the image
// the node is pinned to, the way a netboot would. A node marked lost never comes back.
type Firmware struct {
	dir    string
	reboot func(hwid string)

	mu      sync.Mutex
	lost    map[string]bool
	reboots map[string]int
}

// StartFirmware watches for reboot markers until the test ends.
func StartFirmware(t testing.TB, reboot func(hwid string)) *Firmware {
	f := &Firmware{dir: t.TempDir(), reboot: reboot, lost: map[string]bool{}, reboots: map[string]int{}}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(200 * time.Millisecond):
			}
			marks, _ := filepath.Glob(filepath.Join(f.dir, "reboot-*"))
			for _, m := range marks {
				_ = os.Remove(m)
				hwid := strings.TrimPrefix(filepath.Base(m), "reboot-")
				hwid = strings.ReplaceAll(hwid, "_", ":")
				f.mu.Lock()
				f.reboots[hwid]++
				lost := f.lost[hwid]
				f.mu.Unlock()
				if lost {
					t.Logf("firmware: %s rebooted and never comes back", hwid)
					go f.reboot("!" + hwid) // the test stops the agent only
					continue
				}
				t.Logf("firmware: rebooting %s", hwid)
				go f.reboot(hwid)
			}
		}
	}()
	t.Cleanup(func() { close(stop); <-done })
	return f
}

// Command is the --reboot-command for hwid's agent.
func (f *Firmware) Command(hwid string) string {
	return "touch " + filepath.Join(f.dir, "reboot-"+strings.ReplaceAll(hwid, ":", "_"))
}

// Lose makes hwid's next reboot its last: the reboot function is called with "!"+hwid.
func (f *Firmware) Lose(hwid string, lost bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.lost[hwid] = lost
}

// Reboots counts hwid's reboots.
func (f *Firmware) Reboots(hwid string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.reboots[hwid]
}

// PinnedImage is the image a node boots next: its pin, else the current image (what the
// bootserver serves). herdctl is run by the caller's function (a Cluster's or a Lab's).
func PinnedImage(t testing.TB, herdctl func(args ...string) string, hwid string) string {
	var v struct {
		State *struct {
			Image string `json:"image"`
		} `json:"state"`
	}
	if err := json.Unmarshal([]byte(herdctl("node", "get", hwid, "-o", "json")), &v); err != nil {
		t.Errorf("node get %s: %v", hwid, err)
		return ""
	}
	if v.State != nil && v.State.Image != "" {
		return v.State.Image
	}
	var cur []struct {
		Version string `json:"version"`
		Current bool   `json:"current"`
	}
	_ = json.Unmarshal([]byte(herdctl("image", "list", "-o", "json")), &cur)
	for _, c := range cur {
		if c.Current {
			return c.Version
		}
	}
	return ""
}
