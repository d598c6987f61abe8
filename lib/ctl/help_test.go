package ctl

import (
	"bytes"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

// Every herdctl verb parses its flags and shows help; leaf verbs show an example.
func TestEveryVerbHasHelp(t *testing.T) {
	var walk func(c *cobra.Command, path []string)
	walk = func(c *cobra.Command, path []string) {
		for _, sub := range c.Commands() {
			if sub.Name() == "help" || sub.Name() == "completion" {
				continue
			}
			p := append(append([]string{}, path...), sub.Name())
			var out bytes.Buffer
			root := NewRoot(&out, &out)
			root.SetArgs(append(p, "--help"))
			if err := root.Execute(); err != nil {
				t.Fatalf("%v --help: %v", p, err)
			}
			if !sub.HasSubCommands() && sub.Example == "" {
				t.Errorf("herdctl %s has no example", strings.Join(p, " "))
			}
			walk(sub, p)
		}
	}
	walk(NewRoot(&bytes.Buffer{}, &bytes.Buffer{}), nil)
}
