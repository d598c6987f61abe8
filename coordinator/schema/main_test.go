package schema

import (
	"testing"

	"github.com/herdhq/herd/lib/leaktest"
)

func TestMain(m *testing.M) { leaktest.Main(m) }
