package termsafe

import (
	"bytes"
	"encoding/json"
	"testing"
)

func TestString(t *testing.T) {
	for in, want := range map[string]string{
		"web1":                    "web1",
		"tab\there\nnewline":      "tab\there\nnewline",
		"\x1b[2J\x1b]0;owned\x07": `\u001b[2J\u001b]0;owned\u0007`,
		"csi\u009b31m":            `csi\u009b31m`,
		"del\x7f":                 `del\u007f`,
		"raw\x9bbyte":             `raw\x9bbyte`,
		"bell\a":                  `bell\u0007`,
		"grüße ✓":                 "grüße ✓",
	} {
		if got := String(in); got != want {
			t.Errorf("String(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestWriterSplitsAndJSON: a C1 control split across two writes is still caught, and the escaped
// form of JSON output stays valid JSON with the same strings.
func TestWriterSplitsAndJSON(t *testing.T) {
	var out bytes.Buffer
	w := NewWriter(&out)
	b, _ := json.Marshal(map[string]string{"m": "a\x1b[31mb\u009bc\x7fd"})
	half := bytes.IndexByte(b, 0xc2) + 1 // between the two bytes of U+009B
	w.Write(b[:half])
	w.Write(b[half:])
	if bytes.ContainsAny(out.Bytes(), "\x1b\x7f") || bytes.Contains(out.Bytes(), []byte("\u009b")) {
		t.Fatalf("control characters got through: %q", out.Bytes())
	}
	var back map[string]string
	if err := json.Unmarshal(out.Bytes(), &back); err != nil {
		t.Fatalf("escaped JSON does not parse: %v: %s", err, out.Bytes())
	}
	if back["m"] != "a\x1b[31mb\u009bc\x7fd" {
		t.Fatalf("JSON value changed: %q", back["m"])
	}
}
