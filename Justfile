# herd's recipes. `just demo` runs the whole system on this machine; `just test` checks it.
set shell := ["bash", "-euo", "pipefail", "-c"]

export PATH := env_var("PATH") + ":/usr/local/go/bin"
version := `git describe --always --dirty 2>/dev/null || echo dev`
ldflags := "-X github.com/herdhq/herd/lib/version.Version=" + version

# list recipes
default:
    @just --list

# install missing apt packages and Go modules (idempotent)
deps:
    scripts/deps.sh

# build bin/herd (cgo: libvirt) and bin/herdctl (pure Go)
build: deps
    mkdir -p bin
    go build -ldflags '{{ldflags}}' -o bin/herd ./cmd/herd
    CGO_ENABLED=0 go build -ldflags '{{ldflags}}' -o bin/herdctl ./cmd/herdctl

# embedded etcd + 2 coordinators + 3 simulated nodes; Ctrl-C stops everything
demo *ARGS: build
    bin/herd dev {{ARGS}}

# vet, unit tests, then end-to-end tests (heavy rigs one package at a time)
test: deps
    @test -z "$(gofmt -l $(git ls-files '*.go'))" || { echo "gofmt needed: just fmt"; gofmt -l $(git ls-files '*.go'); exit 1; }
    go vet ./...
    go tool staticcheck ./...
    CGO_ENABLED=0 go build -o /dev/null ./cmd/herdctl
    go test -count=1 -timeout 15m $(go list ./... | grep -v /e2e)
    scripts/fuzz.sh 10s
    go test -count=1 -p 1 -timeout 35m $(go list ./e2e/... | grep -v bootbench)

# fuzz every hostile-input parser longer (default 5m each); --save grows the checked-in corpus
fuzz TIME="5m" *ARGS="": deps
    scripts/fuzz.sh {{TIME}} {{ARGS}}

# build the production netboot image into build/image (just image --lab VERSION: the small lab image)
image *ARGS: deps
    scripts/build-image.sh {{ if ARGS =~ "^--lab" { "--lab build/image " + trim_start_match(ARGS, "--lab") } else { "build/image " + ARGS } }}

# random kill -9, SIGSTOP and restarts of agents, coordinators and etcd members under VM create/
# delete/migrate load for DURATION, then the history checks (`just test` runs 45 s of it)
soak DURATION="30m": deps
    HERD_SOAK_DURATION={{DURATION}} go test -count=1 -v -timeout 4h -run '^TestSoak$' ./e2e/

# the console's screenshots in docs/ui/, taken by its browser test (TestConsoleInABrowser)
ui-screenshots: deps
    mkdir -p docs/ui
    HERD_UI_SCREENSHOTS=$PWD/docs/ui go test -count=1 -run '^TestConsoleInABrowser$' ./e2e/

# the scale rig (e2e/scale): NODES simulated nodes with VMS_PER_NODE VMs each (docs/performance.md)
scale NODES="1000" VMS_PER_NODE="10" MAX_PENDING="0": build
    HERD_SCALE_NODES={{NODES}} HERD_SCALE_VMS_PER_NODE={{VMS_PER_NODE}} HERD_SCALE_MAX_PENDING={{MAX_PENDING}} go test -count=1 -v -timeout 120m -run TestScale ./e2e/scale/

# benchmarks: ratios measured in one run (see docs/performance.md)
bench:
    scripts/deps.sh bench
    go test -run '^$' -bench . -benchtime 3x ./coordinator/scheduler/
    HERD_BENCH_NODES=3000 go test -run '^$' -bench 'SteadyRound|QuickRound' -benchtime 5x ./coordinator/decide/
    scripts/bench-boot.sh
    go test -run '^$' -bench 'PlacementThroughput|PlacementWithAddresses' -benchtime 1x ./coordinator/
    go test -run '^$' -bench ApplyAndList -benchtime 1x ./lib/ctl/
    go test -run '^$' -bench 'LeaderFailover|NodeLossRecovery' -benchtime 3x ./e2e/
    HERD_UI_FLEET=1 go test -count=1 -v -run '^TestConsoleAtFleetSize$' ./e2e/ | grep -E 'uifleet_test|^(---|ok|FAIL)'

# gofmt the tree
fmt:
    gofmt -w $(git ls-files '*.go')
