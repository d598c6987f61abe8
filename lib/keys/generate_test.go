package keys

import (
	"bytes"
	"os"
	"testing"

	"github.com/herdhq/herd/lib/keys/internal/jsongen"
)

// TestGeneratedJSONIsCurrent: every type that embeds Extra has its JSON methods generated, and the
// checked-in file is what the generator writes today.
func TestGeneratedJSONIsCurrent(t *testing.T) {
	want, err := jsongen.Generate(".")
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(jsongen.Output)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s is out of date: run 'go generate ./lib/keys'", jsongen.Output)
	}
}
