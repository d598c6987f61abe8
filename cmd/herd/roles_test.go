//go:build !agentonly

package main

import (
	"reflect"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/pflag"

	"github.com/herdhq/herd/coordinator/fence"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/volume"
)

// TestDevRunsTheRolesWithTheirDefaults: `herd dev` builds its coordinators and agents with the
// same constructor as `herd coordinator` and `herd agent`, and from the same defaults; only what
// dev deliberately changes differs. A setting added to one path only fails here.
func TestDevRunsTheRolesWithTheirDefaults(t *testing.T) {
	dev := defaultDevOptions()
	log := hclog.NewNullLogger()
	space := keys.MustSpace(keys.DefaultPrefix)

	cc := coordinatorConns{space: space, log: log}
	rp := defaultCoordinatorParams()
	role, err := rp.config(cc)
	if err != nil {
		t.Fatal(err)
	}
	p := devCoordinatorParams(dev, 1)
	devc, err := p.config(cc)
	if err != nil {
		t.Fatal(err)
	}
	// Dev's deliberate changes: its replicas' names, and no fencing (a laptop has no BMCs).
	if devc.Name != "dev-1" || devc.Fencer != (fence.None{}) {
		t.Fatalf("dev coordinator: name %q fencer %#v", devc.Name, devc.Fencer)
	}
	devc.Name, devc.Fencer = role.Name, role.Fencer
	if !reflect.DeepEqual(role, devc) {
		t.Fatalf("dev's coordinator differs from herd coordinator's defaults:\n role %+v\n dev  %+v", role, devc)
	}

	ac := agentConns{space: space, hwid: "52:54:00:00:00:01", bootID: "b", volumes: volume.Dir{Root: "/v"}, log: log}
	rap := defaultAgentParams()
	roleA, err := rap.config(ac)
	if err != nil {
		t.Fatal(err)
	}
	ap := devAgentParams(dev, "/data")
	devA, err := ap.config(ac)
	if err != nil {
		t.Fatal(err)
	}
	// Dev's deliberate changes: boot files and seeds in its data directory, no console logs (so
	// only the disks' filesystem is watched for room), VLAN networks carried (bookkeeping only).
	if devA.BootDir != "/data/boot" || devA.ConsoleDir != "" || !reflect.DeepEqual(devA.DiskPaths, []string{"/v"}) ||
		devA.SeedDir != "/data/seeds" || devA.Uplink != "test" {
		t.Fatalf("dev agent: boot dir %q console dir %q disk paths %q seed dir %q uplink %q", devA.BootDir, devA.ConsoleDir, devA.DiskPaths, devA.SeedDir, devA.Uplink)
	}
	if !reflect.DeepEqual(roleA.DiskPaths, []string{"/var/log/herd/console", "/v"}) {
		t.Fatalf("herd agent watches %q for room", roleA.DiskPaths)
	}
	devA.BootDir, devA.ConsoleDir, devA.DiskPaths, devA.SeedDir, devA.Uplink = roleA.BootDir, roleA.ConsoleDir, roleA.DiskPaths, roleA.SeedDir, roleA.Uplink
	if !reflect.DeepEqual(roleA, devA) {
		t.Fatalf("dev's agent differs from herd agent's defaults:\n role %+v\n dev  %+v", roleA, devA)
	}
}

// TestRoleCommandsUseTheirParams: the role commands register exactly the params' flags, with the
// same defaults (the constructor's settings are the command's).
func TestRoleCommandsUseTheirParams(t *testing.T) {
	for _, c := range []struct {
		name  string
		flags func() map[string]string
		want  func() map[string]string
	}{
		{"coordinator", func() map[string]string { return defaults(coordinatorCmd().Flags()) }, func() map[string]string {
			var p coordinatorParams
			return paramFlags(p.addFlags)
		}},
		{"agent", func() map[string]string { return defaults(agentCmd().Flags()) }, func() map[string]string {
			var p agentParams
			return paramFlags(p.addFlags)
		}},
	} {
		got, want := c.flags(), c.want()
		for name, def := range want {
			if got[name] != def {
				t.Errorf("herd %s --%s: default %q, params say %q", c.name, name, got[name], def)
			}
		}
	}
}

func defaults(fs *pflag.FlagSet) map[string]string {
	out := map[string]string{}
	fs.VisitAll(func(f *pflag.Flag) { out[f.Name] = f.DefValue })
	return out
}

func paramFlags(add func(*pflag.FlagSet)) map[string]string {
	fs := pflag.NewFlagSet("p", pflag.ContinueOnError)
	add(fs)
	return defaults(fs)
}
