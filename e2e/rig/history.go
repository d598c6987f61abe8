package rig

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"sort"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/keys"
)

// MostUnavailable replays every write to the node keys and node states from revision 1 and
// returns the most nodes of ids that were, at any one revision after all of them first registered,
// cordoned by a rollout or not registered.
func MostUnavailable(evs []*clientv3.Event, space keys.Space, ids []string) (int, string) {
	want := map[string]bool{}
	for _, id := range ids {
		want[id] = true
	}
	alive, rolloutCordon := map[string]bool{}, map[string]bool{}
	seen := map[string]bool{}
	worst, when := 0, ""
	sort.SliceStable(evs, func(i, j int) bool { return evs[i].Kv.ModRevision < evs[j].Kv.ModRevision })
	for i, ev := range evs {
		key := string(ev.Kv.Key)
		if id, ok := keys.ParseLeaf(space.NodePrefix(), key); ok && want[id] {
			alive[id] = ev.Type == clientv3.EventTypePut
			seen[id] = true
		}
		if id, ok := keys.ParseLeaf(space.NodeStatePrefix(), key); ok && want[id] {
			ns, err := keys.Decode[keys.NodeState](ev.Kv.Value)
			rolloutCordon[id] = ev.Type == clientv3.EventTypePut && err == nil && ns.Rollout != ""
		}
		if len(seen) < len(ids) || (i+1 < len(evs) && evs[i+1].Kv.ModRevision == ev.Kv.ModRevision) {
			continue // judge whole transactions, once every node has registered
		}
		n, who := 0, []string{}
		for _, id := range ids {
			if !alive[id] || rolloutCordon[id] {
				n++
				who = append(who, id)
			}
		}
		if n > worst {
			worst, when = n, fmt.Sprintf("revision %d: %v", ev.Kv.ModRevision, who)
		}
	}
	return worst, when
}

// History returns every event under prefix from revision 1, read with etcdctl inside the lab's
// namespace (its etcd is not reachable from outside): `etcdctl watch --rev 1` replays the history
// and is stopped after a few seconds, when the replay has long been written out.
func (l *Lab) History(prefix string) []*clientv3.Event {
	l.T.Helper()
	cmd := l.NS.Command("timeout", "10", "etcdctl", "--endpoints", l.Endpoint, "watch", "--prefix", prefix, "--rev", "1", "-w", "json")
	out, _ := cmd.Output() // timeout's exit status is expected
	var evs []*clientv3.Event
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		var resp struct {
			Events []*clientv3.Event `json:"Events"`
		}
		if err := json.Unmarshal(sc.Bytes(), &resp); err != nil {
			continue
		}
		evs = append(evs, resp.Events...)
	}
	if len(evs) == 0 {
		l.T.Fatalf("no history of %s from etcdctl watch: %s", prefix, out)
	}
	return evs
}

// ReplayPlacements replays every write to the placements (events from History) and returns how
// many placements were made (one per VM incarnation), or an error naming the first placement that
// changed node without a new epoch.
func ReplayPlacements(evs []*clientv3.Event, space keys.Space) (placements int, err error) {
	type where struct {
		node  string
		epoch int64
	}
	last := map[string]where{} // vm/uid -> its placement
	for _, ev := range evs {
		name, ok := keys.ParseVMName(space.PlacementPrefix(), string(ev.Kv.Key))
		if !ok || ev.Type != clientv3.EventTypePut {
			continue
		}
		pl, err := keys.Decode[keys.Placement](ev.Kv.Value)
		if err != nil {
			return placements, fmt.Errorf("placement of %s at revision %d: %w", name, ev.Kv.ModRevision, err)
		}
		k := fmt.Sprintf("%s/%d", name, pl.UID)
		prev, seen := last[k]
		if !seen {
			placements++
		} else if prev.node != pl.Node && pl.Epoch <= prev.epoch {
			return placements, fmt.Errorf("vm %s uid %d moved %s -> %s without a new epoch (%d -> %d)", name, pl.UID, prev.node, pl.Node, prev.epoch, pl.Epoch)
		}
		last[k] = where{pl.Node, pl.Epoch}
	}
	return placements, nil
}

// ReplayAddresses replays the placements and address claims together (events from History of
// both prefixes), judging whole transactions: at no revision may two VMs' placements list one
// address, nor a placement list an address whose claim is not its VM's. It returns how many
// addresses the placements listed at the end.
func ReplayAddresses(evs []*clientv3.Event, space keys.Space) (held int, err error) {
	sort.SliceStable(evs, func(i, j int) bool { return evs[i].Kv.ModRevision < evs[j].Kv.ModRevision })
	listed := map[string][]string{} // vm -> "net/ip" its placement lists
	claims := map[string]string{}   // "net/ip" -> vm/uid of its claim
	uids := map[string]int64{}
	for i, ev := range evs {
		key := string(ev.Kv.Key)
		if name, ok := keys.ParseVMName(space.PlacementPrefix(), key); ok {
			delete(listed, name)
			if ev.Type == clientv3.EventTypePut {
				pl, err := keys.Decode[keys.Placement](ev.Kv.Value)
				if err != nil {
					return 0, fmt.Errorf("placement of %s at revision %d: %w", name, ev.Kv.ModRevision, err)
				}
				uids[name] = pl.UID
				for _, nic := range pl.NICs {
					if nic != nil {
						listed[name] = append(listed[name], nic.Network+"/"+nic.IP())
					}
				}
			}
		} else if rest, ok := strings.CutPrefix(key, space.AddressRoot()); ok {
			delete(claims, rest)
			if ev.Type == clientv3.EventTypePut {
				cl, err := keys.Decode[keys.AddressClaim](ev.Kv.Value)
				if err != nil {
					return 0, fmt.Errorf("claim %s at revision %d: %w", rest, ev.Kv.ModRevision, err)
				}
				claims[rest] = fmt.Sprintf("%s/%d", cl.VM, cl.UID)
			}
		}
		if i+1 < len(evs) && evs[i+1].Kv.ModRevision == ev.Kv.ModRevision {
			continue
		}
		by := map[string]string{}
		held = 0
		for name, addrs := range listed {
			for _, a := range addrs {
				if other, dup := by[a]; dup {
					return 0, fmt.Errorf("revision %d: address %s listed by the placements of both %s and %s", ev.Kv.ModRevision, a, other, name)
				}
				by[a] = name
				held++
				if want := fmt.Sprintf("%s/%d", name, uids[name]); claims[a] != want {
					return 0, fmt.Errorf("revision %d: %s's placement lists %s, whose claim is %q", ev.Kv.ModRevision, name, a, claims[a])
				}
			}
		}
	}
	return held, nil
}
