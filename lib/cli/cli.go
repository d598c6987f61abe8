// Package cli holds what herd's two binaries share at their edges: Go-style single-dash long flags,
// exit codes, and the signal context.
package cli

import (
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// Exit codes, documented in docs/herdctl.md.
const (
	ExitOK       = 0
	ExitError    = 1 // the operation failed; the message says why
	ExitUsage    = 2 // bad flags or arguments
	ExitNotFound = 3 // the named object does not exist
)

// NormalizeArgs lets operators write Go-style flags (-log-json, -endpoints=x) as well as
// --log-json: a single-dash argument longer than one letter that names a long flag of cmd or any
// subcommand gets its second dash.
func NormalizeArgs(root *cobra.Command, args []string) []string {
	long := map[string]bool{}
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		add := func(f *pflag.Flag) { long[f.Name] = true }
		c.Flags().VisitAll(add)
		c.PersistentFlags().VisitAll(add)
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(root)
	out := make([]string, 0, len(args))
	for i, a := range args {
		if a == "--" {
			return append(out, args[i:]...)
		}
		if len(a) > 2 && a[0] == '-' && a[1] != '-' {
			name, _, _ := strings.Cut(a[1:], "=")
			if long[name] {
				a = "-" + a
			}
		}
		out = append(out, a)
	}
	return out
}
