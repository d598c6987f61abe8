package ctl

import (
	"bytes"
	"strings"
	"testing"

	"github.com/herdhq/herd/lib/cli"
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
	root = NewRoot(&out, &errOut)
	root.SetArgs([]string{"vm", "get"})
	if err := root.Execute(); ExitCode(err) != cli.ExitUsage {
		t.Fatalf("missing argument: %v", err)
	}
}
