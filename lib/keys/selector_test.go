package keys

import (
	"slices"
	"testing"
)

func TestNodeSelector(t *testing.T) {
	rack1 := &Hardware{Labels: map[string]string{"rack": "r1", "zone": "a"}}
	rack2 := &Hardware{Labels: map[string]string{"rack": "r2", "zone": "a"}}
	for _, tc := range []struct {
		in         string
		fixed      bool
		ids        []string
		r1, r2, nl bool // matches rack1, rack2, a record without labels (all under id 52:54:00:00:00:01)
	}{
		{in: "", r1: true, r2: true, nl: true},
		{in: "rack=r1", r1: true},
		{in: "zone=a, rack=r2", r2: true},
		{in: "zone=a", r1: true, r2: true},
		{in: "52-54-00-00-00-02,52:54:00:00:00:01, 52:54:00:00:00:01", fixed: true,
			ids: []string{"52:54:00:00:00:01", "52:54:00:00:00:02"}, r1: true, r2: true, nl: true},
		{in: "52:54:00:00:00:09", fixed: true, ids: []string{"52:54:00:00:00:09"}},
	} {
		sel, err := ParseNodeSelector(tc.in)
		if err != nil {
			t.Fatalf("%q: %v", tc.in, err)
		}
		if sel.Fixed() != tc.fixed || !slices.Equal(sel.IDs, tc.ids) {
			t.Errorf("%q: fixed %v ids %v", tc.in, sel.Fixed(), sel.IDs)
		}
		const id = "52:54:00:00:00:01"
		if got := [3]bool{sel.Matches(id, rack1), sel.Matches(id, rack2), sel.Matches(id, &Hardware{})}; got != [3]bool{tc.r1, tc.r2, tc.nl} {
			t.Errorf("%q: matches %v, want %v", tc.in, got, [3]bool{tc.r1, tc.r2, tc.nl})
		}
	}
	for _, bad := range []string{"rack=r1,52:54:00:00:00:01", "=x", "not-a-mac!"} {
		if _, err := ParseNodeSelector(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestBootImage(t *testing.T) {
	cur := &ImageCurrent{Version: "v1"}
	for _, tc := range []struct {
		ns   *NodeState
		cur  *ImageCurrent
		want string
	}{
		{nil, nil, ""},
		{nil, cur, "v1"},
		{&NodeState{}, cur, "v1"},
		{&NodeState{Image: "v2"}, cur, "v2"},
		{&NodeState{Image: "v2"}, nil, "v2"},
	} {
		if got := BootImage(tc.ns, tc.cur); got != tc.want {
			t.Errorf("BootImage(%+v, %+v) = %q, want %q", tc.ns, tc.cur, got, tc.want)
		}
	}
}
