package rig

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// BuildRelease compiles herd as it was at commit (an earlier release, for the version-skew tests)
// from this repository's own history into a temporary directory of the test, and returns the
// binary's path. A clone without that commit (a shallow one) fails the test and says how to fix it.
func BuildRelease(t testing.TB, commit string) string {
	t.Helper()
	root := repoRoot()
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	var tarball bytes.Buffer
	archive := exec.Command("git", "-C", root, "archive", "--format=tar", commit)
	archive.Stdout = &tarball
	var stderr bytes.Buffer
	archive.Stderr = &stderr
	if err := archive.Run(); err != nil {
		t.Fatalf("release %s is not in this clone (%v: %s): fetch the whole history (git fetch --unshallow)", commit, err, strings.TrimSpace(stderr.String()))
	}
	untar := exec.Command("tar", "-x", "-C", src)
	untar.Stdin = &tarball
	if out, err := untar.CombinedOutput(); err != nil {
		t.Fatalf("unpack release %s: %v\n%s", commit, err, out)
	}
	bin := filepath.Join(dir, "herd")
	build := exec.Command("go", "build", "-o", bin, "-ldflags", "-X github.com/herdhq/herd/lib/version.Version="+commit[:min(len(commit), 12)], "./cmd/herd")
	build.Dir = src
	build.Env = append(os.Environ(), "CGO_ENABLED=1")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build release %s: %v\n%s", commit, err, out)
	}
	return bin
}

var flagsSeen sync.Map // "bin sub" -> help text

// HasFlag says whether the herd binary's subcommand takes flag: the rig passes newer flags only to
// binaries that know them.
func HasFlag(bin, sub, flag string) bool {
	key := bin + " " + sub
	help, ok := flagsSeen.Load(key)
	if !ok {
		out, err := exec.Command(bin, sub, "--help").CombinedOutput()
		if err != nil {
			panic(fmt.Sprintf("%s %s --help: %v\n%s", bin, sub, err, out))
		}
		help, _ = flagsSeen.LoadOrStore(key, string(out))
	}
	return strings.Contains(help.(string), flag+" ")
}
