// Package logging sets up hclog the same way for every herd process: key/value lines on stderr, or
// JSON with -log-json, at the level -log-level names.
package logging

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/pflag"
)

// Options are the logging flags every binary shares.
type Options struct {
	Level string
	JSON  bool
	// Syslog, if set, also ships every line to this collector (udp://host:port).
	Syslog string
}

// AddFlags registers -log-level and -log-json.
func (o *Options) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.Level, "log-level", envOr("HERD_LOG_LEVEL", "info"), "log level: trace, debug, info, warn, error (env HERD_LOG_LEVEL)")
	fs.BoolVar(&o.JSON, "log-json", os.Getenv("HERD_LOG_JSON") == "1", "log JSON lines instead of key=value text (env HERD_LOG_JSON=1)")
	fs.StringVar(&o.Syslog, "syslog", os.Getenv("HERD_SYSLOG"), "also send logs to this syslog collector, RFC 5424 over UDP, e.g. udp://10.0.0.5:514 (env HERD_SYSLOG)")
}

// New builds the root logger for a process.
func (o Options) New(name string, w io.Writer) (hclog.Logger, error) {
	lvl := hclog.LevelFromString(o.Level)
	if lvl == hclog.NoLevel {
		return nil, fmt.Errorf("unknown -log-level %q (want trace, debug, info, warn or error)", o.Level)
	}
	if w == nil {
		w = os.Stderr
	}
	if o.Syslog != "" {
		sl, err := DialSyslog(o.Syslog, name)
		if err != nil {
			return nil, err
		}
		w = io.MultiWriter(w, sl)
	}
	return hclog.New(&hclog.LoggerOptions{
		Name:            name,
		Level:           lvl,
		JSONFormat:      o.JSON,
		Output:          w,
		IncludeLocation: false,
		TimeFormat:      "2006-01-02T15:04:05.000Z0700",
	}), nil
}

func envOr(k, def string) string {
	if v := strings.TrimSpace(os.Getenv(k)); v != "" {
		return v
	}
	return def
}
