package main

import (
	"bytes"
	"strings"
	"testing"
)

// Every subcommand builds its flag set without conflicts and prints help with an example.
func TestEverySubcommandHasHelp(t *testing.T) {
	for _, sub := range newRoot().Commands() {
		if sub.Hidden || sub.Name() == "help" || sub.Name() == "completion" {
			continue
		}
		root := newRoot()
		var out bytes.Buffer
		root.SetOut(&out)
		root.SetArgs([]string{sub.Name(), "--help"})
		if err := root.Execute(); err != nil {
			t.Fatalf("%s --help: %v", sub.Name(), err)
		}
		if !strings.Contains(out.String(), "Examples:") {
			t.Errorf("%s --help has no examples", sub.Name())
		}
	}
}
