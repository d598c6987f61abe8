package ctl

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"sigs.k8s.io/yaml"

	"github.com/herdhq/herd/lib/keys"
)

type specDoc struct {
	name string
	spec *keys.VMSpec
}

// parseSpecDocs reads YAML or JSON documents, separated by lines of '---', each a VM spec plus its
// name.
func parseSpecDocs(data []byte) ([]specDoc, error) {
	var docs []specDoc
	seen := map[string]bool{}
	for i, raw := range splitYAML(data) {
		if len(bytes.TrimSpace(raw)) == 0 {
			continue
		}
		j, err := yaml.YAMLToJSON(raw)
		if err != nil {
			return nil, fmt.Errorf("document %d: %v", i+1, err)
		}
		var m map[string]json.RawMessage
		if err := json.Unmarshal(j, &m); err != nil || m == nil {
			return nil, fmt.Errorf("document %d: want a mapping with name and the spec's fields", i+1)
		}
		var name string
		if err := json.Unmarshal(m["name"], &name); err != nil || name == "" {
			return nil, fmt.Errorf("document %d: a string \"name\" is required", i+1)
		}
		if err := keys.ValidateName(name); err != nil {
			return nil, fmt.Errorf("document %d: %v", i+1, err)
		}
		if seen[name] {
			return nil, fmt.Errorf("document %d: vm %s appears twice", i+1, name)
		}
		seen[name] = true
		delete(m, "name")
		rest, _ := json.Marshal(m)
		spec, err := keys.Decode[keys.VMSpec](rest)
		if err != nil {
			return nil, fmt.Errorf("vm %s: %v", name, err)
		}
		docs = append(docs, specDoc{name: name, spec: spec})
	}
	if len(docs) == 0 {
		return nil, fmt.Errorf("no VM specs found")
	}
	return docs, nil
}

func splitYAML(data []byte) [][]byte {
	var docs [][]byte
	var cur bytes.Buffer
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.TrimRight(line, " \t") == "---" {
			docs = append(docs, append([]byte(nil), cur.Bytes()...))
			cur.Reset()
			continue
		}
		cur.WriteString(line)
		cur.WriteByte('\n')
	}
	return append(docs, cur.Bytes())
}

func readAll(r io.Reader) ([]byte, error) { return io.ReadAll(io.LimitReader(r, 64<<20)) }
