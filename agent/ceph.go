package agent

import (
	"bufio"
	"fmt"
	"os"
	"strings"
)

// ReadCephKey finds the key of client.<user> in a Ceph keyring file (ini-style: a [client.user]
// section with "key = ..."). The key reaches libvirt as a secret; it never goes to etcd.
func ReadCephKey(path, user string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("ceph keyring: %w", err)
	}
	defer f.Close()
	want := "[client." + user + "]"
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(line, "[") {
			in = line == want
			continue
		}
		if k, v, ok := strings.Cut(line, "="); in && ok && strings.TrimSpace(k) == "key" {
			return strings.TrimSpace(v), nil
		}
	}
	return "", fmt.Errorf("ceph keyring %s has no key for client.%s", path, user)
}
