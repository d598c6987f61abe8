package agent

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"syscall"

	"github.com/herdhq/herd/lib/units"
)

// DefaultDiskMinFree is the free space below which a watched filesystem keeps the node from
// taking VMs. The netboot image's filesystems are RAM: a console log that fills one takes
// memory from the guests as well.
const DefaultDiskMinFree = 64 << 20

// diskShort says which watched filesystems have less than min bytes free (the problem's text, ""
// when none, and the paths), and how many bytes each has free. A path that cannot be checked
// (not there yet) is skipped: it holds nothing that could fill a disk.
func diskShort(paths []string, min uint64) (string, []string, map[string]uint64) {
	free := map[string]uint64{}
	var short, which []string
	for _, p := range paths {
		var st syscall.Statfs_t
		if p == "" || syscall.Statfs(p, &st) != nil {
			continue
		}
		avail, size := st.Bavail*uint64(st.Bsize), st.Blocks*uint64(st.Bsize)
		free[p] = avail
		if avail < min {
			which = append(which, p)
			short = append(short, fmt.Sprintf("%s has %s free of %s", p, units.FormatBytes(int64(avail)), units.FormatBytes(int64(size))))
		}
	}
	if len(short) == 0 {
		return "", nil, free
	}
	sort.Strings(short)
	sort.Strings(which)
	return fmt.Sprintf("disk nearly full (under %s free): %s", units.FormatBytes(int64(min)), strings.Join(short, "; ")), which, free
}

// diskHealth checks the watched filesystems (at start and every resync): while one is nearly
// full the node registers the problem and the leader places nothing more here; its guests keep
// running. The problem goes once there is room again.
func (a *Agent) diskHealth(ctx context.Context) {
	if ctx.Err() != nil || len(a.cfg.DiskPaths) == 0 {
		return
	}
	now, which, free := diskShort(a.cfg.DiskPaths, a.cfg.DiskMinFree)
	for p, f := range free {
		a.metrics.diskFree.WithLabelValues(p).Set(float64(f))
	}
	var was string
	if p := a.diskProblem.Load(); p != nil {
		was = *p
	}
	// The text names the free space, which moves all the time: the node record is written again
	// only when which filesystems are short changes.
	key := strings.Join(which, "\x00")
	if key == a.diskShortPaths {
		// Unchanged; but a write of the last change may not have landed (the lease was not
		// confirmed alive, etcd did not answer): publishNode writes only if the record differs.
		a.publishNode(ctx)
		return
	}
	a.diskShortPaths = key
	switch {
	case now == "":
		a.diskProblem.Store(nil)
		a.log.Info("disk space is back: the node takes VMs again")
		a.events.Record("node/"+a.hwid, "disk-ok", "free space is back above %s", units.FormatBytes(int64(a.cfg.DiskMinFree)))
	default:
		a.diskProblem.Store(&now)
		if was == "" {
			a.log.Error("a disk is nearly full: the node takes no VMs until there is room; guests keep running", "problem", now)
			a.events.Record("node/"+a.hwid, "disk-full", "%s", now)
		}
	}
	a.publishNode(ctx)
}
