package ctl

import (
	"context"
	"strings"
	"testing"

	"github.com/herdhq/herd/lib/cli"
	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
	"github.com/herdhq/herd/lib/keys"
)

// TestNetworkCommands: net create is idempotent and refuses to change a network silently, bad
// settings are usage errors that name the field, list and get show the addresses held (as the
// leader claims them), and delete refuses while an address is held, naming the VM.
func TestNetworkCommands(t *testing.T) {
	srv := etcdtest.Start(t)
	ep := srv.Endpoints[0]
	create := []string{"net", "create", "prod", "--vlan", "120", "--cidr", "10.20.0.0/22", "--gateway", "10.20.0.1", "--dns", "10.20.0.2"}
	for _, want := range []string{"network/prod created", "network/prod unchanged"} {
		if out, _, err := herdctl(t, ep, create...); err != nil || !strings.Contains(out, want) {
			t.Fatalf("%v: %q %v, want %q", create, out, err, want)
		}
	}
	if _, _, err := herdctl(t, ep, "net", "create", "prod", "--cidr", "10.21.0.0/24"); err == nil || !strings.Contains(err.Error(), "exists with other settings (10.20.0.0/22, vlan 120") {
		t.Fatalf("changing a network by create: %v", err)
	}
	for args, want := range map[string]string{
		"--cidr 10.20.0.5/22":                     "did you mean 10.20.0.0/22",
		"--cidr 10.20.0.0/24 --gateway 10.30.0.1": "gateway: 10.30.0.1 is not a host address of 10.20.0.0/24",
		"--cidr 10.20.0.0/24 --vlan 5000":         "vlan: must be between 1 and 4094",
		"--cidr 10.20.0.0/24 --range 10.20.0.9":   "want FIRST-LAST",
		"--cidr fd00::/64":                        "only IPv4",
	} {
		_, _, err := herdctl(t, ep, append([]string{"net", "create", "bad"}, strings.Fields(args)...)...)
		if ExitCode(err) != cli.ExitUsage || !strings.Contains(err.Error(), want) {
			t.Fatalf("net create bad %s: %v, want a usage error with %q", args, err, want)
		}
	}

	c := etcdtest.NewClient(t, srv.Endpoints)
	sp := keys.MustSpace(keys.DefaultPrefix)
	if _, err := c.Put(context.Background(), sp.Address("prod", "10.20.0.17"), keys.MustEncode(&keys.AddressClaim{VM: "web1", UID: 7})); err != nil {
		t.Fatal(err)
	}
	if out, _, err := herdctl(t, ep, "net", "list"); err != nil || !strings.Contains(out, "10.20.0.2-10.20.3.254") || !strings.Contains(out, "1\n") {
		t.Fatalf("net list: %q %v", out, err)
	}
	if out, _, err := herdctl(t, ep, "net", "get", "prod"); err != nil || !strings.Contains(out, "10.20.0.17") || !strings.Contains(out, "web1") {
		t.Fatalf("net get: %q %v", out, err)
	}
	if _, _, err := herdctl(t, ep, "net", "get", "nowhere"); ExitCode(err) != cli.ExitNotFound {
		t.Fatalf("net get of a missing network: %v", err)
	}
	if _, _, err := herdctl(t, ep, "net", "delete", "prod"); err == nil || !strings.Contains(err.Error(), "in use: addresses are held by vm web1") {
		t.Fatalf("deleting a network in use: %v", err)
	}
	if _, err := c.Delete(context.Background(), sp.Address("prod", "10.20.0.17")); err != nil {
		t.Fatal(err)
	}
	if out, _, err := herdctl(t, ep, "net", "delete", "prod"); err != nil || !strings.Contains(out, "deleted") {
		t.Fatalf("net delete: %q %v", out, err)
	}
	if _, _, err := herdctl(t, ep, "net", "delete", "prod"); ExitCode(err) != cli.ExitNotFound {
		t.Fatalf("deleting it again: %v", err)
	}
}
