package keys

import (
	"fmt"
	"sort"
	"strings"
)

// NodeSelector is how a rollout chooses its nodes (its `selector` field, herdctl's --nodes):
//
//	""                  every enrolled node
//	"rack=r1,zone=a"    every enrolled node whose hardware labels match all the pairs
//	"id1,id2"           exactly these hardware ids
//
// The first two follow enrolment: hardware added while the rollout runs joins it, hardware
// removed before its turn leaves it. A list of ids is fixed.
type NodeSelector struct {
	Labels map[string]string
	IDs    []string // normalised, sorted; nil unless the selector is a list of ids
}

// ParseNodeSelector parses a selector; a mix of pairs and ids is refused.
func ParseNodeSelector(s string) (NodeSelector, error) {
	var sel NodeSelector
	s = strings.TrimSpace(s)
	if s == "" {
		return sel, nil
	}
	parts := strings.Split(s, ",")
	if strings.Contains(s, "=") {
		sel.Labels = map[string]string{}
		for _, p := range parts {
			k, v, ok := strings.Cut(strings.TrimSpace(p), "=")
			if !ok || k == "" {
				return NodeSelector{}, fmt.Errorf("%q: want label pairs (key=value,...) or hardware ids (id1,id2), not both", p)
			}
			sel.Labels[k] = v
		}
		return sel, nil
	}
	seen := map[string]bool{}
	for _, p := range parts {
		id, err := NormalizeHWID(strings.TrimSpace(p))
		if err != nil {
			return NodeSelector{}, err
		}
		if !seen[id] {
			seen[id] = true
			sel.IDs = append(sel.IDs, id)
		}
	}
	sort.Strings(sel.IDs)
	return sel, nil
}

// Fixed says whether the selector names its nodes (and so does not follow enrolment).
func (s NodeSelector) Fixed() bool { return s.IDs != nil }

// Matches says whether the enrolled hardware hwid (record h) is selected.
func (s NodeSelector) Matches(hwid string, h *Hardware) bool {
	if s.Fixed() {
		i := sort.SearchStrings(s.IDs, hwid)
		return i < len(s.IDs) && s.IDs[i] == hwid
	}
	for k, v := range s.Labels {
		if h == nil || h.Labels[k] != v {
			return false
		}
	}
	return true
}
