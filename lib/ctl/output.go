package ctl

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"
	"sigs.k8s.io/yaml"
)

// outputFlag is the -o flag every read verb has.
type outputFlag struct{ format string }

func (o *outputFlag) add(cmd *cobra.Command) {
	cmd.Flags().StringVarP(&o.format, "output", "o", "table", "output format: table, wide, json or yaml")
}

func (o *outputFlag) validate() error {
	switch o.format {
	case "table", "wide", "json", "yaml":
		return nil
	}
	return usagef("-o %q: want table, wide, json or yaml", o.format)
}

// table is a printer's result: a header and rows of cells; wide columns are only shown with -o wide.
type table struct {
	header []string
	wide   []bool
	rows   [][]string
}

// newTable makes a table of plain (not -o wide only) columns.
func newTable(cols ...string) *table {
	t := &table{}
	for _, c := range cols {
		t.col(c, false)
	}
	return t
}

func (t *table) col(name string, wide bool) {
	t.header = append(t.header, name)
	t.wide = append(t.wide, wide)
}

func (t *table) row(cells ...string) { t.rows = append(t.rows, cells) }

// print writes data as JSON or YAML, or t as a table.
func (o *outputFlag) print(w io.Writer, data any, t *table) error {
	switch o.format {
	case "json":
		b, err := json.MarshalIndent(data, "", "  ")
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(w, "%s\n", b)
		return err
	case "yaml":
		b, err := json.Marshal(data)
		if err != nil {
			return err
		}
		y, err := yaml.JSONToYAML(b)
		if err != nil {
			return err
		}
		_, err = w.Write(y)
		return err
	}
	wide := o.format == "wide"
	tw := tabwriter.NewWriter(w, 0, 4, 3, ' ', 0)
	line := func(cells []string) {
		var out []string
		for i, c := range cells {
			if i < len(t.wide) && t.wide[i] && !wide {
				continue
			}
			out = append(out, c)
		}
		fmt.Fprintln(tw, strings.Join(out, "\t"))
	}
	if len(t.header) > 0 {
		line(t.header)
	}
	for _, r := range t.rows {
		line(r)
	}
	return tw.Flush()
}

// age prints how long ago t was, the way kubectl does: 45s, 12m, 3h, 5d.
func age(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := time.Since(t)
	switch {
	case d < 0:
		return "0s"
	case d < 2*time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < 2*time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// labelsString prints k=v,k=v sorted.
func labelsString(m map[string]string) string {
	if len(m) == 0 {
		return "-"
	}
	parts := make([]string, 0, len(m))
	for k, v := range m {
		parts = append(parts, k+"="+v)
	}
	sortStrings(parts)
	return strings.Join(parts, ",")
}

// parseLabels reads repeated k=v flags.
func parseLabels(flag string, in []string) (map[string]string, error) {
	if len(in) == 0 {
		return nil, nil
	}
	out := map[string]string{}
	for _, kv := range in {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, usagef("--%s %q: want key=value", flag, kv)
		}
		out[k] = v
	}
	return out, nil
}

// newBar is herdctl's progress bar, on stderr and drawn only on a terminal: scripts and logs get
// just the one line per change that the commands print beside it. It writes to the terminal itself
// (its own escape codes); its description is made terminal-safe here.
func (e *env) newBar(max int, desc string) *progressbar.ProgressBar {
	return progressbar.NewOptions(max, progressbar.OptionSetWriter(e.rawErr), progressbar.OptionShowCount(),
		progressbar.OptionSetElapsedTime(true), progressbar.OptionSetPredictTime(false), progressbar.OptionSetWidth(30),
		progressbar.OptionSetDescription(desc), progressbar.OptionSetVisibility(e.errTTY()))
}

// clearLine begins a line printed while a bar may be drawn: it clears the bar's line first.
func (e *env) clearLine() {
	if e.errTTY() {
		fmt.Fprint(e.rawErr, "\r\033[K")
	}
}

// endBar ends the bar's line (on a terminal; elsewhere there is none).
func (e *env) endBar() {
	if e.errTTY() {
		fmt.Fprintln(e.rawErr)
	}
}

func (e *env) errTTY() bool {
	f, ok := e.rawErr.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}
