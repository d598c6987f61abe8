package logging

import (
	"net"
	"strings"
	"testing"
	"time"
)

func TestSyslogShipsRFC5424(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	var sink strings.Builder
	log, err := Options{Level: "info", Syslog: "udp://" + pc.LocalAddr().String()}.New("herd-agent", &sink)
	if err != nil {
		t.Fatal(err)
	}
	log.Warn("lease lost", "node", "52:54:00:00:00:01")
	log.Debug("not shipped below the level")
	buf := make([]byte, 2048)
	_ = pc.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, _, err := pc.ReadFrom(buf)
	if err != nil {
		t.Fatal(err)
	}
	msg := string(buf[:n])
	// <daemon*8+warning>1 TIMESTAMP HOST APP PID - - MSG
	if !strings.HasPrefix(msg, "<28>1 ") || !strings.Contains(msg, " herd-agent ") || !strings.Contains(msg, "lease lost: node=52:54:00:00:00:01") {
		t.Fatalf("syslog message %q", msg)
	}
	if !strings.Contains(sink.String(), "lease lost") {
		t.Fatal("local output lost")
	}
}
