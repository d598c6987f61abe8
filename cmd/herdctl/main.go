// Command herdctl operates a herd cluster. It is pure Go (CGO_ENABLED=0): an operator's laptop needs
// no libvirt or Ceph libraries.
package main

import (
	"os"

	"github.com/herdhq/herd/lib/ctl"
)

func main() { os.Exit(ctl.Main(os.Args[1:])) }
