package rig

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
)

// lane is one client's own way into a multi-member etcd: a client URL on every member.
type lane struct {
	urls  []string
	ports []int
}

// Lane returns the endpoints of lane i (NewCluster3Lanes), for one agent's --endpoints.
func (c *Cluster) Lane(i int) string {
	return strings.Join(c.lanes[i].urls, ",")
}

var cutSeq struct {
	sync.Mutex
	n int
}

// CutLane cuts lane i off from etcd, as a network partition would: an nftables table of the
// test's own drops every packet to and from the lane's ports on every member (connections
// hang, nothing is refused). heal removes the table; the test's cleanup removes it too. It needs
// root and nft, and fails the test without them.
func (c *Cluster) CutLane(i int) (heal func()) {
	c.T.Helper()
	cutSeq.Lock()
	cutSeq.n++
	table := fmt.Sprintf("herd_rig_%d_%d", os.Getpid(), cutSeq.n)
	cutSeq.Unlock()
	ports := make([]string, len(c.lanes[i].ports))
	for n, p := range c.lanes[i].ports {
		ports[n] = fmt.Sprint(p)
	}
	set := "{ " + strings.Join(ports, ", ") + " }"
	script := fmt.Sprintf(`add table inet %[1]s
add chain inet %[1]s out { type filter hook output priority 0; }
add rule inet %[1]s out tcp dport %[2]s drop
add rule inet %[1]s out tcp sport %[2]s drop
`, table, set)
	cmd := exec.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		c.T.Fatalf("cut lane %d with nftables (needs root and nft): %v\n%s", i, err, out)
	}
	var once sync.Once
	heal = func() {
		once.Do(func() {
			if out, err := exec.Command("nft", "delete", "table", "inet", table).CombinedOutput(); err != nil {
				c.T.Errorf("heal lane %d: %v\n%s", i, err, out)
			}
		})
	}
	c.T.Cleanup(heal)
	return heal
}
