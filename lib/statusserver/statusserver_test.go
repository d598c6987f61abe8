package statusserver

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/herdhq/herd/lib/leaktest"
)

func TestMain(m *testing.M) { leaktest.Main(m) }

// TestServeAndStop: the endpoints answer, and the server is gone (no goroutine, no listener) once
// its context ends.
func TestServeAndStop(t *testing.T) {
	s, err := Listen("127.0.0.1:0", NewRegistry(), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	for path, want := range map[string]string{"/healthz": "ok", "/metrics": "go_goroutines"} {
		resp, err := http.Get(s.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || !strings.Contains(string(b), want) {
			t.Fatalf("%s: %d %.80s", path, resp.StatusCode, b)
		}
	}
	http.DefaultClient.CloseIdleConnections()
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, err := http.Get(s.URL + "/healthz"); err == nil {
		t.Fatal("still serving after its context ended")
	}
}

// TestProfilesOnlyWhenAsked: /debug/pprof/ is served only on a mux given Profiles.
func TestProfilesOnlyWhenAsked(t *testing.T) {
	for _, on := range []bool{false, true} {
		mux := http.NewServeMux()
		if on {
			Profiles(mux)
		}
		s, err := Listen("127.0.0.1:0", NewRegistry(), mux)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- s.Serve(ctx) }()
		resp, err := http.Get(s.URL + "/debug/pprof/goroutine?debug=1")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if served := resp.StatusCode == 200 && strings.Contains(string(b), "goroutine profile"); served != on {
			t.Fatalf("profiles asked %v: %d %.80s", on, resp.StatusCode, b)
		}
		http.DefaultClient.CloseIdleConnections()
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
}
