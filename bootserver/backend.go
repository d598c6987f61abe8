package bootserver

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/bootserver/httpboot"
	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/events"
	"github.com/herdhq/herd/lib/images"
	"github.com/herdhq/herd/lib/join"
	"github.com/herdhq/herd/lib/keys"
)

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

	disc   *discovery
	events *events.Recorder
	// rehash: every verified image is hashed again at least this often.
	rehash  time.Duration
	changed chan struct{}
}

// backendConfig is what a backend needs besides etcd.
type backendConfig struct {
	name     string
	user     string
	store    *images.Store
	tokenTTL time.Duration
	rehash   time.Duration
	limits   DiscoveryLimits
	log      hclog.Logger
	registry prometheus.Registerer
}

func newBackend(c *clientv3.Client, s keys.Space, bc backendConfig) *backend {
	if bc.tokenTTL == 0 {
		bc.tokenTTL = join.DefaultTokenTTL
	}
	if bc.rehash == 0 {
		bc.rehash = time.Hour
	}
	log := bc.log
	b := &backend{rehash: bc.rehash, client: c, space: s, name: bc.name, store: bc.store, log: log, tokenTTL: bc.tokenTTL, changed: make(chan struct{}, 1)}
	b.events = events.New(c, s, keys.EventsByBootserver, "bootserver/"+bc.name, bc.user, log)
	b.disc = newDiscovery(c, s, bc.name, bc.limits, b.events, log, bc.registry)
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
	for _, inf := range []*etcdutil.Informer{b.hw.Informer, b.states.Informer, b.imgs, b.disc.inf.Informer} {
		wg.Add(1)
		go func() { defer wg.Done(); inf.Run(ctx) }()
	}
	wg.Add(1)
	go func() { defer wg.Done(); b.events.Run(ctx) }()
	wg.Wait()
}

func (b *backend) synced(ctx context.Context) error {
	for _, inf := range []*etcdutil.Informer{b.hw.Informer, b.states.Informer, b.imgs, b.disc.inf.Informer} {
		if err := inf.WaitRev(ctx, 0); err != nil {
			return err
		}
	}
	return nil
}

// lookup finds the enrolled hwid of a machine. Its MAC comes first: the record named by it, or a
// record whose mac field is it. A serial number identifies a machine only when it can: not a
// firmware placeholder, named by exactly one record, and that record bound to no other MAC;
// white-box machines share placeholder serials, and a shared serial must never lend one machine
// another's identity. When the serial cannot identify the machine, reason says why.
func (b *backend) lookup(m httpboot.Machine) (hwid string, hw *keys.Hardware, reason string) {
	if r := b.hw.Get(b.space.Hardware(m.MAC)); r.OK() {
		return m.MAC, r.Value, ""
	}
	type match struct {
		hwid string
		hw   *keys.Hardware
	}
	var bySerial []match
	for _, r := range b.hw.List() {
		id, ok := keys.ParseLeaf(b.space.HardwarePrefix(), r.Key)
		if !ok || !r.OK() {
			continue
		}
		if r.Value.MAC == m.MAC {
			return id, r.Value, ""
		}
		if m.Serial != "" && (id == m.Serial || r.Value.Serial == m.Serial) {
			bySerial = append(bySerial, match{id, r.Value})
		}
	}
	if len(bySerial) == 0 {
		return "", nil, ""
	}
	if why := keys.PlaceholderSerial(m.Serial); why != "" {
		return "", nil, fmt.Sprintf("its serial number %s; enrol it by MAC: herdctl hw add %s", why, m.MAC)
	}
	if len(bySerial) > 1 {
		ids := make([]string, len(bySerial))
		for i, x := range bySerial {
			ids[i] = x.hwid
		}
		return "", nil, fmt.Sprintf("its serial number %q is enrolled %d times (%s): enrol it by MAC", m.Serial, len(ids), strings.Join(ids, ", "))
	}
	if x := bySerial[0]; x.hw.MAC != "" && x.hw.MAC != m.MAC {
		return "", nil, fmt.Sprintf("its serial number %q is enrolled as %s with MAC %s, not this machine's %s", m.Serial, x.hwid, x.hw.MAC, m.MAC)
	}
	return bySerial[0].hwid, bySerial[0].hw, ""
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
	hwid, hw, why := b.lookup(m)
	if hw == nil {
		return httpboot.Target{}, httpboot.Unknown(why)
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

// Discovered implements httpboot.Backend.
func (b *backend) Discovered(ctx context.Context, m httpboot.Machine, why string) error {
	return b.disc.record(ctx, m, why)
}

// verdicts checks every catalogue version against the local image directory, hashing again those
// verified longer than rehash ago.
func (b *backend) verdicts() map[string]string {
	out := map[string]string{}
	all := map[string]*keys.Image{}
	for _, kv := range b.imgs.List() {
		v, ok := keys.ParseLeaf(b.space.ImagePrefix(), kv.Key)
		if im := etcdutil.Record[keys.Image](kv); ok && v != keys.ImageCurrentName && im.OK() {
			all[v] = im.Value
		}
	}
	b.store.Reverify(all, b.rehash)
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
		caches := []*etcdutil.Informer{b.hw.Informer, b.states.Informer, b.imgs}
		floor := etcdutil.MaxRev(caches)
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
				etcdutil.CheckAnswer(ctx, b.client, caches, floor, r.Revision)
				floor = etcdutil.MaxRev(caches)
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

// JoinToken mints the one-time token a booting node joins with, bound to its boot NIC.
func (b *backend) JoinToken(ctx context.Context, hwid, mac string) (string, error) {
	return join.Mint(ctx, b.client, b.space, join.Grant{HWID: hwid, MAC: mac, TTL: b.tokenTTL, IssuedBy: "bootserver/" + b.name})
}
