package ctl

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/herdhq/herd/lib/cli"
	"github.com/herdhq/herd/lib/etcdembed/etcdtest"
	"github.com/herdhq/herd/lib/keys"
)

func TestParseSpecDocs(t *testing.T) {
	docs, err := parseSpecDocs([]byte("name: a\nvcpus: 1\nmemory_mib: 64\nfuture: x\n---\n{\"name\":\"b\",\"vcpus\":2,\"memory_mib\":128}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if len(docs) != 2 || docs[0].name != "a" || docs[1].spec.VCPUs != 2 {
		t.Fatalf("%+v", docs)
	}
	if _, ok := docs[0].spec.Extra["future"]; !ok {
		t.Fatal("unknown member dropped")
	}
	if _, ok := docs[0].spec.Extra["name"]; ok {
		t.Fatal("name must not become a spec member")
	}
	for _, bad := range []string{"vcpus: 1\n", "name: A\n", "name: a\n---\nname: a\n", "name: a\nvcpus: two\n", "", "- 1\n"} {
		if _, err := parseSpecDocs([]byte(bad)); err == nil {
			t.Errorf("accepted %q", bad)
		}
	}
}

func TestGoStyleFlagsAndExitCodes(t *testing.T) {
	var out, errOut bytes.Buffer
	root := NewRoot(&out, &errOut)
	args := cli.NormalizeArgs(root, []string{"vm", "create", "x", "-memory=0", "-dry-run"})
	if args[3] != "--memory=0" || args[4] != "--dry-run" {
		t.Fatalf("normalized %v", args)
	}
	root.SetArgs(args)
	err := root.Execute()
	if ExitCode(err) != cli.ExitUsage || !strings.Contains(err.Error(), "memory_mib") {
		t.Fatalf("err %v code %d", err, ExitCode(err))
	}
	out.Reset()
	root = NewRoot(&out, &errOut)
	root.SetArgs([]string{"vm", "create", "web1", "--vcpus", "2", "--memory", "1GiB", "--disk", "10GiB", "--dry-run"})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(out.String()); got != `{"v":1,"vcpus":2,"memory_mib":1024,"disk":{"pool":"default","size_gib":10}}` {
		t.Fatalf("dry run printed %s", got)
	}
	// Disks: the first is the boot disk (root) and takes --image; the others are named.
	for args, want := range map[string]string{
		"--image deb --disk 20GiB --disk data=100GiB,pool=fast --pool default": `"disks":[{"name":"root","pool":"default","size_gib":20,"image":"deb"},{"name":"data","pool":"fast","size_gib":100}]`,
		"--disk sys=8GiB":              `"disks":[{"name":"sys","pool":"default","size_gib":8}]`,
		"--disk 8GiB --disk 2GiB":      "every disk but the first needs a name",
		"--image deb":                  "--image and --from need a --disk",
		"--disk 8GiB,iops=5":           `unknown option "iops=5"`,
		"--disk 8GiB --disk root=1GiB": `disks[1].name: "root" names two disks`,
	} {
		out.Reset()
		root = NewRoot(&out, &errOut)
		root.SetArgs(append([]string{"vm", "create", "d", "--dry-run"}, strings.Fields(args)...))
		err := root.Execute()
		got := out.String()
		if err != nil {
			got = err.Error()
		}
		if !strings.Contains(got, want) {
			t.Errorf("vm create %s: %s, want %s", args, got, want)
		}
	}
	root = NewRoot(&out, &errOut)
	root.SetArgs([]string{"vm", "get"})
	if err := root.Execute(); ExitCode(err) != cli.ExitUsage {
		t.Fatalf("missing argument: %v", err)
	}
}

// herdctl runs herdctl against endpoints and returns its output and error.
func herdctl(t testing.TB, endpoints string, args ...string) (string, string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	root := NewRoot(&out, &errOut)
	root.SetArgs(append([]string{"--endpoints", endpoints}, args...))
	err := root.Execute()
	return out.String(), errOut.String(), err
}

// TestSerialNumbersThatCannotIdentify: herdctl refuses to enrol by a placeholder serial number or
// by one another record already names, and approves a discovered machine by MAC without its
// placeholder serial.
func TestSerialNumbersThatCannotIdentify(t *testing.T) {
	srv := etcdtest.Start(t)
	ep := srv.Endpoints[0]
	for _, args := range [][]string{
		{"hw", "add", "0123456789"},
		{"hw", "add", "00000000"},
		{"hw", "add", "52:54:00:00:00:01", "--serial", "Default string"},
	} {
		if _, _, err := herdctl(t, ep, args...); ExitCode(err) != cli.ExitUsage || !strings.Contains(err.Error(), "placeholder") {
			t.Fatalf("%v: %v", args, err)
		}
	}
	if _, _, err := herdctl(t, ep, "hw", "add", "52:54:00:00:00:01", "--serial", "7XK2QF2"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := herdctl(t, ep, "hw", "add", "7XK2QF2"); err == nil || !strings.Contains(err.Error(), "already enrolled as 52:54:00:00:00:01") {
		t.Fatalf("second record of one serial: %v", err)
	}
	if _, _, err := herdctl(t, ep, "hw", "add", "52:54:00:00:00:01", "--label", "rack=r1"); err != nil {
		t.Fatalf("updating the record that holds the serial: %v", err)
	}

	c := etcdtest.NewClient(t, srv.Endpoints)
	sp := keys.MustSpace(keys.DefaultPrefix)
	d := keys.Discovered{MAC: "52:54:00:00:00:02", Serial: "To Be Filled By O.E.M.", FirstSeen: time.Now(), LastSeen: time.Now(), Attempts: 1}
	if _, err := c.Put(context.Background(), sp.Discovered(d.MAC), keys.MustEncode(&d)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := herdctl(t, ep, "hw", "approve", d.MAC, "--by-serial"); ExitCode(err) != cli.ExitUsage {
		t.Fatalf("approve by a placeholder serial: %v", err)
	}
	_, errOut, err := herdctl(t, ep, "hw", "approve", d.MAC)
	if err != nil || !strings.Contains(errOut, "serial number not recorded") {
		t.Fatalf("approve: %v %s", err, errOut)
	}
	resp, err := c.Get(context.Background(), sp.Hardware(d.MAC))
	if err != nil || len(resp.Kvs) != 1 || strings.Contains(string(resp.Kvs[0].Value), "serial") {
		t.Fatalf("enrolled record: %v %v", resp, err)
	}
}

// TestInvalidSpecSizesPrintAsDash: a spec written by hand with sizes no VM can have lists with "-"
// for them (it printed -5242880B), and its validation error as the problem.
func TestInvalidSpecSizesPrintAsDash(t *testing.T) {
	srv := etcdtest.Start(t)
	c := etcdtest.NewClient(t, srv.Endpoints)
	sp := keys.MustSpace(keys.DefaultPrefix)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Put(ctx, sp.VMSpec("bad"), `{"vcpus":-3,"memory_mib":-5}`); err != nil {
		t.Fatal(err)
	}
	out, _, err := herdctl(t, srv.Endpoints[0], "vm", "list")
	if err != nil {
		t.Fatal(err)
	}
	var row []string
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) > 0 && f[0] == "bad" {
			row = f
		}
	}
	// NAME NODE STATE VCPUS MEMORY ...
	if len(row) < 5 || row[3] != "-" || row[4] != "-" {
		t.Fatalf("invalid sizes listed as %v:\n%s", row, out)
	}
}
