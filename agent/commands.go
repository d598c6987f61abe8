package agent

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

// Node commands (/herd/nodecmd/<hwid>/<id>) run at most once: the agent claims a command by writing
// its result "started" with a compare-and-swap before acting, and a command names the boot it
// applies to, so the reboot it asks for ends its own validity.

// onCommand is the informer hook of this node's commands.
func (a *Agent) onCommand(key string, _, cur *etcdutil.KV) {
	if cur == nil {
		return
	}
	if cur.Err != nil {
		a.log.Warn("unreadable node command; ignoring it", "key", key, "error", cur.Err)
		return
	}
	r := etcdutil.Record[keys.NodeCommand](cur)
	if cmd := r.Value; cmd == nil || cmd.Result != nil || cmd.IfBootID != a.cfg.BootID {
		return // done already, or meant for another boot of this machine
	}
	a.cmds <- r
}

// runCommands executes claimed commands one at a time, off the informer's goroutine.
func (a *Agent) runCommands(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case kv := <-a.cmds:
			a.execute(ctx, kv)
		}
	}
}

func (a *Agent) execute(ctx context.Context, kv *cmdRec) {
	cmd := *kv.Value
	claimed := cmd
	claimed.Result = &keys.CmdResult{State: keys.CmdStarted, At: time.Now().UTC()}
	cctx, cancel := etcdutil.WithTimeout(ctx)
	resp, err := a.cfg.Client.Txn(cctx).If(etcdutil.ModRev(kv.Key, kv.ModRevision)).
		Then(clientv3.OpPut(kv.Key, keys.MustEncode(&claimed))).Commit()
	cancel()
	if err != nil || !resp.Succeeded {
		a.log.Warn("could not claim node command; it will be seen again if still pending", "key", kv.Key, "error", err)
		return
	}
	var runErr error
	switch cmd.Command {
	case keys.CmdReboot:
		how, reboot := a.cfg.RebootCommand, func(ctx context.Context) error { return a.shell(ctx, a.cfg.RebootCommand) }
		if a.cfg.Reboot != nil {
			how, reboot = "simulated reboot", a.cfg.Reboot
		}
		a.log.Warn("rebooting on command", "by", cmd.By, "command", how)
		a.events.Record("node/"+a.hwid, "rebooting", "on command of %s: %s", cmd.By, how)
		a.events.Flush(ctx, 2*time.Second) // the reboot may not leave time to write it later
		runErr = reboot(ctx)
	default:
		runErr = fmt.Errorf("unknown command %q", cmd.Command)
	}
	res := &keys.CmdResult{State: keys.CmdDone, At: time.Now().UTC()}
	if runErr != nil {
		res.State, res.Error = keys.CmdFailed, runErr.Error()
		a.log.Error("node command failed", "command", cmd.Command, "error", runErr)
	}
	claimed.Result = res
	// Written with the key's current revision unknown: our claim is the last writer by design.
	cctx, cancel = etcdutil.WithTimeout(ctx)
	defer cancel()
	if _, err := a.cfg.Client.Put(cctx, kv.Key, keys.MustEncode(&claimed)); err != nil && ctx.Err() == nil {
		a.log.Warn("could not record node command result", "key", kv.Key, "error", err)
	}
}

// shell runs a configured command line with a bound; its output goes to the log.
func (a *Agent) shell(ctx context.Context, line string) error {
	if strings.TrimSpace(line) == "" {
		return fmt.Errorf("no command configured")
	}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(cctx, "sh", "-c", line).CombinedOutput()
	if len(out) > 0 {
		a.log.Info("command output", "command", line, "output", strings.TrimSpace(string(out)))
	}
	if err != nil {
		// The shell's own words say what went wrong ("reboot: not found"): keep them.
		if msg := strings.TrimSpace(string(out)); msg != "" {
			return fmt.Errorf("%s: %w: %s", line, err, lastLine(msg))
		}
		return fmt.Errorf("%s: %w", line, err)
	}
	return nil
}

func lastLine(s string) string {
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}
