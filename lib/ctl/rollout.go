package ctl

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/keys"
)

func rolloutCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "rollout",
		Short: "Roll a hypervisor image across the fleet: drain, reboot into it, rejoin, next",
		Long: `A rollout moves nodes to an image version one small batch at a time: for each node the leader
checks the other nodes can take its VMs, cordons and drains it (live migration), pins it to the
image, asks its agent to reboot, waits for it to register again with a new boot and the image, and
uncordons it. At most --max-unavailable nodes are cordoned by the rollout or not ready at once. The
state is /herd/rollout in etcd: a coordinator failover continues where it stopped. Rolling back is
a rollout to the old version.`,
		Example: `  herdctl rollout start --image 2026.11.2 --max-unavailable 1
  herdctl rollout status --watch
  herdctl rollout pause
  herdctl rollout resume
  herdctl rollout abort`,
	}
	cmd.AddCommand(rolloutStartCmd(e), rolloutStatusCmd(e), rolloutStateCmd(e, "pause"), rolloutStateCmd(e, "resume"), rolloutStateCmd(e, "abort"))
	return cmd
}

// rolloutView is a rollout as herdctl shows it (and its -o json/yaml document): the operator's
// request and the leader's progress in one object. State is the leader's (the request's until the
// leader has taken it up); Requested is what the operator asked for.
type rolloutView struct {
	ID                 string                       `json:"id"`
	Image              string                       `json:"image"`
	MaxUnavailable     int                          `json:"max_unavailable"`
	Selector           string                       `json:"selector,omitempty"`
	NodeTimeoutSeconds int64                        `json:"node_timeout_seconds"`
	State              string                       `json:"state"`
	Requested          string                       `json:"requested"`
	Reason             string                       `json:"reason,omitempty"`
	Nodes              []string                     `json:"nodes"`
	Per                map[string]*keys.RolloutNode `json:"per_node,omitempty"`
	By                 string                       `json:"by,omitempty"`
	Started            time.Time                    `json:"started"`
	Updated            time.Time                    `json:"updated,omitzero"`
	Ended              time.Time                    `json:"ended,omitzero"`

	req    *keys.Rollout
	reqRev int64
}

// readRollout reads the request and the leader's progress in one transaction. It returns nil when
// there is no rollout, and the revision it read at.
func (e *env) readRollout(ctx context.Context) (*rolloutView, int64, error) {
	resp, err := e.client.Txn(ctx).Then(clientv3.OpGet(e.space.Rollout()), clientv3.OpGet(e.space.RolloutStatus())).Commit()
	if err != nil {
		return nil, 0, err
	}
	var req, st []byte
	var reqRev int64
	if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
		req, reqRev = kvs[0].Value, kvs[0].ModRevision
	}
	if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) > 0 {
		st = kvs[0].Value
	}
	v, err := e.rolloutOf(req, reqRev, st)
	return v, resp.Header.Revision, err
}

// rolloutOf builds the view of the rollout from its request (nil: none) and the leader's status
// (nil: none); nil when there is neither.
func (e *env) rolloutOf(reqVal []byte, reqRev int64, stVal []byte) (*rolloutView, error) {
	var req *keys.Rollout
	var st *keys.RolloutStatus
	var err error
	v := &rolloutView{}
	if reqVal != nil {
		if req, err = keys.Decode[keys.Rollout](reqVal); err != nil {
			return nil, fmt.Errorf("rollout request %s is unreadable (%v): fix or delete it with etcdctl", e.space.Rollout(), err)
		}
		v.reqRev = reqRev
	}
	if stVal != nil {
		if st, err = keys.Decode[keys.RolloutStatus](stVal); err != nil {
			return nil, fmt.Errorf("rollout status %s is unreadable (%v)", e.space.RolloutStatus(), err)
		}
	}
	switch {
	case req == nil && st == nil:
		return nil, nil
	case req != nil:
		v.req = req
		v.ID, v.Image, v.MaxUnavailable, v.Selector, v.NodeTimeoutSeconds = req.ID, req.Image, req.MaxUnavailable, req.Selector, req.NodeTimeoutSeconds
		v.State, v.Requested, v.Nodes, v.By, v.Started = req.State, req.State, req.Nodes, req.By, req.Started
	}
	if st != nil && (req == nil || st.ID == req.ID) {
		v.ID, v.State, v.Reason, v.Nodes, v.Per, v.Updated, v.Ended = st.ID, st.State, st.Reason, st.Nodes, st.Per, st.Updated, st.Ended
	}
	return v, nil
}

// active says whether a rollout is under way (or asked for and not yet taken up).
func active(ro *rolloutView) bool {
	return ro != nil && ro.req != nil && ro.Ended.IsZero()
}

func rolloutStartCmd(e *env) *cobra.Command {
	var (
		image    string
		maxUnav  int
		selector string
		timeout  time.Duration
		watch    bool
	)
	cmd := &cobra.Command{
		Use:   "start --image VERSION",
		Short: "Start rolling an image version across the nodes",
		Example: `  herdctl rollout start --image 2026.11.2
  herdctl rollout start --image 2026.11.2 --max-unavailable 2 --nodes rack=r1
  herdctl rollout start --image 2026.11.1 --nodes 52:54:00:00:00:01,52:54:00:00:00:02 --watch`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := keys.ValidateImageVersion(image); err != nil {
				return usagef("--image: %v", err)
			}
			if maxUnav < 1 {
				return usagef("--max-unavailable must be at least 1")
			}
			if _, err := keys.ParseNodeSelector(selector); err != nil {
				return usagef("--nodes: %v", err)
			}
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			im, err := e.client.Get(ctx, e.space.Image(image), clientv3.WithCountOnly())
			if err != nil {
				return err
			}
			if im.Count == 0 {
				return fmt.Errorf("image %s: %w (add it: herdctl image add; see herdctl image list)", image, ErrNotFound)
			}
			nodes, err := e.selectNodes(ctx, selector)
			if err != nil {
				return err
			}
			old, _, err := e.readRollout(ctx)
			if err != nil {
				return err
			}
			if active(old) {
				return fmt.Errorf("rollout %s to %s is %s: wait for it, or 'herdctl rollout abort' first", old.ID, old.Image, old.State)
			}
			var rev int64
			if old != nil {
				rev = old.reqRev
			}
			var b [3]byte
			_, _ = rand.Read(b[:])
			now := time.Now().UTC()
			ro := &keys.Rollout{ID: now.Format("20060102") + "-" + hex.EncodeToString(b[:]), Image: image, MaxUnavailable: maxUnav,
				Nodes: nodes, Selector: selector, NodeTimeoutSeconds: int64(timeout / time.Second), State: keys.RolloutRunning,
				By: actor(), Started: now}
			if err := ro.Validate(); err != nil {
				return err
			}
			tx, err := e.client.Txn(ctx).If(etcdutil.ModRev(e.space.Rollout(), rev)).
				Then(clientv3.OpPut(e.space.Rollout(), keys.MustEncode(ro))).Commit()
			if err != nil {
				return err
			}
			if !tx.Succeeded {
				return errors.New("another rollout was started at the same moment; see 'herdctl rollout status'")
			}
			_ = e.record(ctx, "rollout/"+ro.ID, "started",
				fmt.Sprintf("%d nodes to %s, at most %d unavailable", len(nodes), image, maxUnav))
			fmt.Fprintf(e.out, "rollout %s started: %d nodes to %s, at most %d unavailable at once\n", ro.ID, len(nodes), image, maxUnav)
			if !watch {
				fmt.Fprintln(e.out, "follow it: herdctl rollout status --watch")
				return nil
			}
			return e.watchRollout(cmd.Context())
		},
	}
	f := cmd.Flags()
	f.StringVar(&image, "image", "", "image version to roll out (herdctl image list)")
	f.IntVar(&maxUnav, "max-unavailable", 1, "nodes that may be cordoned by the rollout or not ready at once")
	f.StringVar(&selector, "nodes", "", "which nodes: label pairs (rack=r1,zone=a) or hardware ids (id1,id2); default all enrolled.\nWith pairs or the default, hardware enrolled during the rollout joins it")
	f.DurationVar(&timeout, "node-timeout", 15*time.Minute, "pause the rollout when a node has not come back on the image this long after it started")
	f.BoolVar(&watch, "watch", false, "follow the rollout until it ends (like rollout status --watch)")
	_ = cmd.MarkFlagRequired("image")
	return cmd
}

// selectNodes resolves --nodes against the enrolled hardware, in a stable order.
func (e *env) selectNodes(ctx context.Context, selector string) ([]string, error) {
	resp, err := e.client.Get(ctx, e.space.HardwarePrefix(), clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	hw := map[string]*keys.Hardware{}
	for _, kv := range resp.Kvs {
		id, ok := keys.ParseLeaf(e.space.HardwarePrefix(), string(kv.Key))
		if !ok {
			continue
		}
		h, err := keys.Decode[keys.Hardware](kv.Value)
		if err != nil {
			continue
		}
		hw[id] = h
	}
	sel, err := keys.ParseNodeSelector(selector)
	if err != nil {
		return nil, usagef("--nodes: %v", err)
	}
	for _, id := range sel.IDs {
		if hw[id] == nil {
			return nil, fmt.Errorf("--nodes: %s: %w (herdctl hw list)", id, ErrNotFound)
		}
	}
	var out []string
	for id, h := range hw {
		if sel.Matches(id, h) {
			out = append(out, id)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("--nodes %q selects no enrolled node", selector)
	}
	sort.Strings(out)
	return out, nil
}

func rolloutStateCmd(e *env, verb string) *cobra.Command {
	short := map[string]string{
		"pause":  "Start no further nodes (nodes under way finish)",
		"resume": "Continue a paused rollout (a node that failed or timed out is retried)",
		"abort":  "Stop: nodes not yet rebooted get their image pin and cordon state back",
	}[verb]
	return &cobra.Command{
		Use:     verb,
		Short:   short,
		Example: "  herdctl rollout " + verb,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			for attempt := 0; attempt < 10; attempt++ {
				ro, _, err := e.readRollout(ctx)
				if err != nil {
					return err
				}
				if !active(ro) {
					return fmt.Errorf("no rollout under way: %w", ErrNotFound)
				}
				req := ro.req
				switch {
				case verb == "pause" && req.State == keys.RolloutRunning:
					req.State = keys.RolloutPaused
				case verb == "resume" && (req.State == keys.RolloutPaused || ro.State == keys.RolloutPaused):
					// Resuming also retries a node the leader paused the rollout on.
					req.State = keys.RolloutRunning
					req.Resumes++
				case verb == "abort" && req.State != keys.RolloutAborting:
					req.State = keys.RolloutAborting
				default:
					fmt.Fprintf(e.out, "rollout %s is already %s\n", ro.ID, ro.State)
					return nil
				}
				req.By = actor()
				tx, err := e.client.Txn(ctx).If(etcdutil.ModRev(e.space.Rollout(), ro.reqRev)).
					Then(clientv3.OpPut(e.space.Rollout(), keys.MustEncode(req))).Commit()
				if err != nil {
					return err
				}
				if tx.Succeeded {
					_ = e.record(ctx, "rollout/"+ro.ID, verb+"-requested", "")
					fmt.Fprintf(e.out, "rollout %s: %s requested\n", ro.ID, verb)
					return nil
				}
			}
			return errors.New("the rollout request kept changing under us; try again")
		},
	}
}

func rolloutStatusCmd(e *env) *cobra.Command {
	var (
		o     outputFlag
		watch bool
	)
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the rollout: each node's phase, progress and an ETA",
		Example: `  herdctl rollout status
  herdctl rollout status --watch
  herdctl rollout status -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := o.validate(); err != nil {
				return err
			}
			if err := e.connect(); err != nil {
				return err
			}
			if watch {
				return e.watchRollout(cmd.Context())
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			ro, _, err := e.readRollout(ctx)
			if err != nil {
				return err
			}
			if ro == nil {
				return fmt.Errorf("no rollout: %w (start one: herdctl rollout start --image VERSION)", ErrNotFound)
			}
			if o.format == "json" || o.format == "yaml" {
				return o.print(e.out, ro, nil)
			}
			running, err := e.nodeImages(ctx)
			if err != nil {
				return err
			}
			waits, err := e.drainWaits(ctx, ro)
			if err != nil {
				return err
			}
			fmt.Fprint(e.out, rolloutSummary(ro, time.Now()))
			t := newTable("NODE", "PHASE", "RUNNING", "FOR", "NOTE")
			for _, id := range ro.Nodes {
				p := ro.Per[id]
				if p == nil {
					p = &keys.RolloutNode{Phase: keys.PhasePending}
				}
				since := "-"
				switch {
				case !p.Finished.IsZero() && !p.Began.IsZero():
					since = p.Finished.Sub(p.Began).Round(time.Second).String()
				case !p.Since.IsZero():
					since = time.Since(p.Since).Round(time.Second).String()
				}
				t.row(id, p.Phase, orDash(running[id]), since, orDash(cmp.Or(p.Error, waits[id])))
			}
			return o.print(e.out, nil, t)
		},
	}
	o.add(cmd)
	cmd.Flags().BoolVar(&watch, "watch", false, "follow with a progress bar until the rollout ends")
	return cmd
}

// drainWaits reads, for the rollout's draining nodes, why each is not drained yet (the leader's
// NodeState.Waiting): the VM that cannot leave, in its problem's words.
func (e *env) drainWaits(ctx context.Context, ro *rolloutView) (map[string]string, error) {
	var ids []string
	var gets []clientv3.Op
	for _, id := range ro.Nodes {
		if p := ro.Per[id]; p != nil && p.Phase == keys.PhaseDraining {
			ids = append(ids, id)
			gets = append(gets, clientv3.OpGet(e.space.NodeState(id)))
		}
	}
	out := map[string]string{}
	for len(gets) > 0 {
		n := min(len(gets), 64) // etcd's limit of operations per transaction is 128
		resp, err := e.client.Txn(ctx).Then(gets[:n]...).Commit()
		if err != nil {
			return nil, fmt.Errorf("read node states: %w", err)
		}
		for i, r := range resp.Responses {
			if kvs := r.GetResponseRange().Kvs; len(kvs) > 0 {
				if ns, err := keys.Decode[keys.NodeState](kvs[0].Value); err == nil && ns.Waiting != "" {
					out[ids[i]] = "waits: " + ns.Waiting
				}
			}
		}
		ids, gets = ids[n:], gets[n:]
	}
	return out, nil
}

// nodeImages maps live nodes to the image they booted ("down" for enrolled nodes without a key).
func (e *env) nodeImages(ctx context.Context) (map[string]string, error) {
	resp, err := e.client.Get(ctx, e.space.NodePrefix(), clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, kv := range resp.Kvs {
		id, ok := keys.ParseLeaf(e.space.NodePrefix(), string(kv.Key))
		if !ok {
			continue
		}
		if n, err := keys.Decode[keys.Node](kv.Value); err == nil {
			out[id] = orDash(n.Image)
		}
	}
	return out, nil
}

// progress counts finished nodes and estimates the time left from the nodes done so far.
func progress(ro *rolloutView, now time.Time) (done int, eta time.Duration) {
	var took time.Duration
	upgraded := 0
	for _, id := range ro.Nodes {
		p := ro.Per[id]
		if p == nil {
			continue
		}
		if p.Over() {
			done++
		}
		if p.Phase == keys.PhaseDone {
			upgraded++
			took += p.Finished.Sub(p.Began)
		}
	}
	if upgraded == 0 || done == len(ro.Nodes) {
		return done, 0
	}
	per := took / time.Duration(upgraded)
	batches := (len(ro.Nodes) - done + max(ro.MaxUnavailable, 1) - 1) / max(ro.MaxUnavailable, 1)
	return done, per * time.Duration(batches)
}

func rolloutSummary(ro *rolloutView, now time.Time) string {
	done, eta := progress(ro, now)
	end := now
	if !ro.Ended.IsZero() {
		end = ro.Ended
	}
	s := fmt.Sprintf("rollout %s to %s: %s, %d/%d nodes, max %d unavailable, %s elapsed", ro.ID, ro.Image, ro.State,
		done, len(ro.Nodes), ro.MaxUnavailable, end.Sub(ro.Started).Round(time.Second))
	if eta > 0 && ro.State == keys.RolloutRunning {
		s += fmt.Sprintf(", about %s left", eta.Round(time.Second))
	}
	s += "\n"
	if ro.Reason != "" {
		s += "  " + ro.Reason + "\n"
	}
	return s
}

// watchRollout follows the record until the rollout ends: a progress bar on stderr, one line per
// node phase change on stdout.
func (e *env) watchRollout(ctx context.Context) error {
	seen := map[string]string{}
	var bar *progressbar.ProgressBar
	lastReason := ""
	for {
		rctx, cancel := e.ctx(ctx)
		ro, rev, err := e.readRollout(rctx)
		cancel()
		if err != nil {
			return err
		}
		if ro == nil {
			return fmt.Errorf("no rollout: %w", ErrNotFound)
		}
		if bar == nil {
			bar = e.newBar(len(ro.Nodes), "")
		}
		bar.ChangeMax(len(ro.Nodes)) // hardware enrolled meanwhile joins the rollout
		rctx, cancel = e.ctx(ctx)
		waits, err := e.drainWaits(rctx, ro)
		cancel()
		if err != nil {
			return err
		}
		for _, id := range ro.Nodes {
			p := ro.Per[id]
			if p == nil {
				continue
			}
			// A line per change of phase, and per change of what a draining node waits for.
			if now := p.Phase + "\x00" + cmp.Or(p.Error, waits[id]); seen[id] != now {
				seen[id] = now
				note := ""
				if n := cmp.Or(p.Error, waits[id]); n != "" {
					note = ": " + n
				}
				e.clearLine()
				fmt.Fprintf(e.errOut, "%s  %s %s%s\n", time.Now().Format("15:04:05"), id, p.Phase, note)
			}
		}
		if ro.Reason != lastReason && ro.Reason != "" {
			e.clearLine()
			fmt.Fprintf(e.errOut, "%s  %s\n", time.Now().Format("15:04:05"), ro.Reason)
		}
		lastReason = ro.Reason
		done, eta := progress(ro, time.Now())
		desc := fmt.Sprintf("%s to %s (%s)", ro.ID, ro.Image, ro.State)
		if eta > 0 {
			desc += fmt.Sprintf(", ~%s left", eta.Round(time.Second))
		}
		bar.Describe(desc)
		_ = bar.Set(done)
		if ro.State == keys.RolloutDone || ro.State == keys.RolloutAborted {
			_ = bar.Finish()
			e.endBar()
			fmt.Fprint(e.out, rolloutSummary(ro, time.Now()))
			if ro.State == keys.RolloutAborted {
				return errors.New("rollout aborted")
			}
			return nil
		}
		// Wake on the next change of the record, or after a while to refresh the clock.
		wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
		// Both keys: the request and the leader's progress (a prefix of one is the other's).
		wch := e.client.Watch(clientv3.WithRequireLeader(wctx), e.space.Rollout(), clientv3.WithPrefix(), clientv3.WithRev(rev+1))
		select {
		case <-wch:
		case <-wctx.Done():
		}
		wcancel()
		if ctx.Err() != nil {
			e.endBar()
			return ctx.Err()
		}
	}
}
