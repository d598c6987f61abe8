// Command jsongen regenerates lib/keys/zz_json.go: `go generate ./lib/keys`.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/herdhq/herd/lib/keys/internal/jsongen"
)

func main() {
	dir := "."
	if len(os.Args) > 1 {
		dir = os.Args[1]
	}
	src, err := jsongen.Generate(dir)
	if err == nil {
		err = os.WriteFile(filepath.Join(dir, jsongen.Output), src, 0o644)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "jsongen:", err)
		os.Exit(1)
	}
}
