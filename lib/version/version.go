// Package version names the build; the Justfile stamps it with -ldflags.
package version

// Version is "dev" unless stamped: go build -ldflags "-X github.com/herdhq/herd/lib/version.Version=v1.2.3".
var Version = "dev"
