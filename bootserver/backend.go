package bootserver

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/bootserver/httpboot"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/images"
	"github.com/herdhq/herd/lib/join"
	"github.com/herdhq/herd/lib/keys"
)

// discoveredTTL is how long an unknown machine stays listed after its last attempt (about).
const discoveredTTL = 24 * time.Hour

// backend answers boot questions from watch-fed caches of etcd; only recording an unknown machine
// writes.
type backend struct {
	client *clientv3.Client
	space  keys.Space
	name   string
	store  *images.Store
	log    hclog.Logger
	// tokenTTL is how long a minted join token stays valid.
	tokenTTL time.Duration

	hw     *etcdutil.Typed[keys.Hardware]
	states *etcdutil.Typed[keys.NodeState]
	imgs   *etcdutil.Informer // the catalogue and the current pointer: two types

	mu        sync.Mutex
	discLease clientv3.LeaseID
	discAt    time.Time
	changed   chan struct{}
}

func newBackend(c *clientv3.Client, s keys.Space, name string, store *images.Store, log hclog.Logger, tokenTTL time.Duration) *backend {
	if tokenTTL == 0 {
		tokenTTL = join.DefaultTokenTTL
	}
	b := &backend{client: c, space: s, name: name, store: store, log: log, tokenTTL: tokenTTL, changed: make(chan struct{}, 1)}
	poke := func(string, *etcdutil.KV, *etcdutil.KV) {
		select {
		case b.changed <- struct{}{}:
		default:
		}
	}
	b.hw = etcdutil.NewTyped[keys.Hardware](c, s.HardwarePrefix(), nil, log)
	b.states = etcdutil.NewTyped[keys.NodeState](c, s.NodeStatePrefix(), nil, log)
	b.imgs = etcdutil.NewInformer(c, s.ImagePrefix(), func(key string, v []byte) (any, error) {
		if key == s.ImageCurrent() {
			return keys.Decode[keys.ImageCurrent](v)
		}
		im, err := keys.Decode[keys.Image](v)
		if err != nil {
			return nil, err
		}
		return im, im.Validate()
	}, poke, log)
	return b
}

func (b *backend) run(ctx context.Context) {
	var wg sync.WaitGroup
	for _, inf := range []*etcdutil.Informer{b.hw.Informer, b.states.Informer, b.imgs} {
		wg.Add(1)
		go func() { defer wg.Done(); inf.Run(ctx) }()
	}
	wg.Wait()
}

func (b *backend) synced(ctx context.Context) error {
	for _, inf := range []*etcdutil.Informer{b.hw.Informer, b.states.Informer, b.imgs} {
		if err := inf.WaitRev(ctx, 0); err != nil {
			return err
		}
	}
	return nil
}

// lookup finds the enrolled hwid of a machine: the record named by its MAC, a record whose mac field
// is its MAC, or one named by or listing its serial number.
func (b *backend) lookup(m httpboot.Machine) (string, *keys.Hardware) {
	if r := b.hw.Get(b.space.Hardware(m.MAC)); r.OK() {
		return m.MAC, r.Value
	}
	var bySerial string
	var bySerialHW *keys.Hardware
	for _, r := range b.hw.List() {
		hwid, ok := keys.ParseLeaf(b.space.HardwarePrefix(), r.Key)
		if !ok || !r.OK() {
			continue
		}
		hw := r.Value
		if hw.MAC == m.MAC {
			return hwid, hw
		}
		if m.Serial != "" && (hwid == m.Serial || hw.Serial == m.Serial) && bySerial == "" {
			bySerial, bySerialHW = hwid, hw
		}
	}
	return bySerial, bySerialHW
}

// version is the image a node boots: its pin, else the current one.
func (b *backend) version(hwid string) (string, error) {
	var ns *keys.NodeState
	var cur *keys.ImageCurrent
	if r := b.states.Get(b.space.NodeState(hwid)); r.OK() {
		ns = r.Value
	}
	if r := etcdutil.Record[keys.ImageCurrent](b.imgs.Get(b.space.ImageCurrent())); r.OK() {
		cur = r.Value
	}
	if v := keys.BootImage(ns, cur); v != "" {
		return v, nil
	}
	return "", fmt.Errorf("no current image: set one with 'herdctl image set-current VERSION'")
}

// Resolve implements httpboot.Backend.
func (b *backend) Resolve(ctx context.Context, m httpboot.Machine) (httpboot.Target, error) {
	hwid, hw := b.lookup(m)
	if hw == nil {
		return httpboot.Target{}, httpboot.ErrUnknown
	}
	v, err := b.version(hwid)
	if err != nil {
		return httpboot.Target{}, err
	}
	im, ok := b.Image(v)
	if !ok {
		return httpboot.Target{}, fmt.Errorf("image %s is not in the catalogue", v)
	}
	if r := b.store.Check(v, im); r != images.OK {
		return httpboot.Target{}, fmt.Errorf("image %s cannot be served here: %s", v, r)
	}
	return httpboot.Target{HWID: hwid, Version: v, Image: im}, nil
}

// Image implements httpboot.Backend.
func (b *backend) Image(version string) (*keys.Image, bool) {
	if keys.ValidateImageVersion(version) != nil {
		return nil, false
	}
	r := etcdutil.Record[keys.Image](b.imgs.Get(b.space.Image(version)))
	if !r.OK() {
		return nil, false
	}
	return r.Value, true
}

// Discovered implements httpboot.Backend: first/last seen and attempts, under a shared lease rotated
// hourly, so a record lives about a day after the last attempt without a lease per attempt.
func (b *backend) Discovered(ctx context.Context, m httpboot.Machine) error {
	key := b.space.Discovered(m.MAC)
	lease, err := b.discoveredLease(ctx)
	if err != nil {
		return err
	}
	for attempt := 0; attempt < 3; attempt++ {
		cctx, cancel := etcdutil.WithTimeout(ctx)
		resp, err := b.client.Get(cctx, key)
		cancel()
		if err != nil {
			return err
		}
		now := time.Now().UTC()
		d := &keys.Discovered{MAC: m.MAC, FirstSeen: now}
		var modRev int64
		if len(resp.Kvs) > 0 {
			modRev = resp.Kvs[0].ModRevision
			if old, err := keys.Decode[keys.Discovered](resp.Kvs[0].Value); err == nil {
				d = old
			}
		}
		d.LastSeen, d.Attempts, d.Bootserver = now, d.Attempts+1, b.name
		if m.Serial != "" {
			d.Serial = m.Serial
		}
		if m.UUID != "" {
			d.UUID = m.UUID
		}
		if m.Arch != "" {
			d.Arch = m.Arch
		}
		cctx, cancel = etcdutil.WithTimeout(ctx)
		tx, err := b.client.Txn(cctx).If(etcdutil.ModRev(key, modRev)).
			Then(clientv3.OpPut(key, keys.MustEncode(d), clientv3.WithLease(lease))).Commit()
		cancel()
		if err != nil {
			b.mu.Lock()
			b.discLease = 0
			b.mu.Unlock()
			return err
		}
		if tx.Succeeded {
			return nil
		}
	}
	return fmt.Errorf("discovered record %s kept changing", key)
}

func (b *backend) discoveredLease(ctx context.Context) (clientv3.LeaseID, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.discLease != 0 && time.Since(b.discAt) < time.Hour {
		return b.discLease, nil
	}
	cctx, cancel := etcdutil.WithTimeout(ctx)
	defer cancel()
	l, err := b.client.Grant(cctx, int64((discoveredTTL+time.Hour)/time.Second))
	if err != nil {
		return 0, fmt.Errorf("grant discovered lease: %w", err)
	}
	b.discLease, b.discAt = l.ID, time.Now()
	return l.ID, nil
}

// verdicts checks every catalogue version against the local image directory.
func (b *backend) verdicts() map[string]string {
	out := map[string]string{}
	for _, kv := range b.imgs.List() {
		v, ok := keys.ParseLeaf(b.space.ImagePrefix(), kv.Key)
		if !ok || v == keys.ImageCurrentName {
			continue
		}
		if kv.Err != nil {
			out[v] = "unreadable catalogue entry: " + kv.Err.Error()
			continue
		}
		if im := etcdutil.Record[keys.Image](kv); im.OK() {
			out[v] = b.store.Check(v, im.Value)
		}
	}
	return out
}

// advertise keeps /herd/bootservers/<name> under a lease, with the verdict on every image, so
// `herdctl image list` shows which bootserver can serve what.
func (b *backend) advertise(ctx context.Context, url string) {
	key := b.space.Bootserver(b.name)
	started := time.Now().UTC()
	bo := etcdutil.Backoff{Min: time.Second, Max: 10 * time.Second}
	for ctx.Err() == nil {
		cctx, cancel := etcdutil.WithTimeout(ctx)
		l, err := b.client.Grant(cctx, 15)
		cancel()
		if err != nil {
			b.log.Warn("bootserver lease", "error", err)
			bo.Wait(ctx)
			continue
		}
		ka, err := b.client.KeepAlive(ctx, l.ID)
		if err != nil {
			bo.Wait(ctx)
			continue
		}
		last := ""
		tick := time.NewTicker(30 * time.Second)
	loop:
		for {
			v := b.verdicts()
			rec := keys.Bootserver{URL: url, Started: started, Images: v}
			val := keys.MustEncode(&rec)
			if val != last {
				cctx, cancel := etcdutil.WithTimeout(ctx)
				_, err := b.client.Put(cctx, key, val, clientv3.WithLease(l.ID))
				cancel()
				if err != nil {
					b.log.Warn("advertise", "error", err)
				} else {
					last = val
					b.logVerdicts(v)
				}
			}
			select {
			case <-ctx.Done():
				tick.Stop()
				rctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				_, _ = b.client.Revoke(rctx, l.ID)
				cancel()
				return
			case r, ok := <-ka:
				if !ok {
					break loop
				}
				for _, inf := range []*etcdutil.Informer{b.hw.Informer, b.states.Informer, b.imgs} {
					inf.CheckRevision(r.Revision)
				}
			case <-b.changed:
			case <-tick.C:
			}
		}
		tick.Stop()
	}
}

func (b *backend) logVerdicts(v map[string]string) {
	names := make([]string, 0, len(v))
	for k := range v {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, n := range names {
		if v[n] == images.OK {
			b.log.Info("image verified", "version", n)
		} else {
			b.log.Warn("image not served", "version", n, "why", v[n])
		}
	}
}

// JoinToken mints the one-time token a booting node joins with.
func (b *backend) JoinToken(ctx context.Context, hwid string) (string, error) {
	return join.Mint(ctx, b.client, b.space, hwid, b.tokenTTL, "bootserver/"+b.name)
}
