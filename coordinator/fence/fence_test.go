package fence

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/herdhq/herd/lib/keys"
)

func TestExecPassesTargetAndReadsExitStatus(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(dir, "calls")
	f := Exec{Command: `echo "$HERD_HWID $HERD_BOOT_ID $HERD_MGMT_ADDR $HERD_LABEL_BMC_IP $HERD_LABELS" >> ` + log + `; echo powered off`}
	tgt := Target{HWID: "52:54:00:00:00:01", BootID: "b1", Addresses: keys.Addresses{Management: "10.0.0.1"}, Labels: map[string]string{"bmc-ip": "10.9.0.1", "rack": "r1"}}
	d, err := f.Fence(context.Background(), tgt)
	if err != nil || d["exec"] != "powered off" {
		t.Fatalf("%v %v", d, err)
	}
	b, _ := os.ReadFile(log)
	if got := strings.TrimSpace(string(b)); got != "52:54:00:00:00:01 b1 10.0.0.1 10.9.0.1 bmc-ip=10.9.0.1,rack=r1" {
		t.Fatalf("command saw %q", got)
	}
	if _, err := (Exec{Command: "echo no BMC; exit 3"}).Fence(context.Background(), tgt); err == nil || !strings.Contains(err.Error(), "no BMC") {
		t.Fatalf("failure not reported with its output: %v", err)
	}
	if _, err := (Exec{Command: "sleep 5", Timeout: 200 * time.Millisecond}).Fence(context.Background(), tgt); err == nil || !strings.Contains(err.Error(), "timed out") {
		t.Fatalf("timeout: %v", err)
	}
	if _, err := (All{}).Fence(context.Background(), tgt); err == nil {
		t.Fatal("no fencer must fail, never pass")
	}
	both := All{Exec{Command: "true"}, Exec{Command: "exit 1"}}
	if _, err := both.Fence(context.Background(), tgt); err == nil || both.Name() != "exec+exec" {
		t.Fatalf("combined fencers must all succeed: %v", err)
	}
}
