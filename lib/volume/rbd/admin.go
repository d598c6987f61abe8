package rbd

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"
)

// The cluster-administration side of the backend, used by the coordinator's ceph fencer and by
// agents waiting for an osdmap. Every call goes through call(), so it is bounded like the rest.

// monCommand runs one monitor command given as a JSON-able map.
func (b *Backend) monCommand(ctx context.Context, cmd map[string]any) ([]byte, string, error) {
	args, err := json.Marshal(cmd)
	if err != nil {
		return nil, "", err
	}
	var out []byte
	var status string
	err = b.call(ctx, fmt.Sprint(cmd["prefix"]), func(conn *rados.Conn) error {
		var err error
		out, status, err = conn.MonCommand(args)
		if err != nil {
			return fmt.Errorf("ceph %s: %w (%s)", cmd["prefix"], err, status)
		}
		return nil
	})
	return out, status, err
}

// Blocklist adds addr (ip:port/nonce; ip:0/0 is the whole address) to the OSD blocklist for expire.
func (b *Backend) Blocklist(ctx context.Context, addr string, expire time.Duration) error {
	// The monitor wants a float and rejects 3600 where it accepts 3600.0.
	secs := json.RawMessage(strconv.FormatFloat(expire.Seconds(), 'f', 1, 64))
	_, _, err := b.monCommand(ctx, map[string]any{"prefix": "osd blocklist", "blocklistop": "add", "addr": addr, "expire": secs})
	return err
}

// Unblocklist removes addr from the blocklist; an absent entry is not an error.
func (b *Backend) Unblocklist(ctx context.Context, addr string) error {
	_, status, err := b.monCommand(ctx, map[string]any{"prefix": "osd blocklist", "blocklistop": "rm", "addr": addr})
	if err != nil && strings.Contains(status, "isn't blocklisted") {
		return nil
	}
	return err
}

// BlocklistEntry is one `osd blocklist ls` entry.
type BlocklistEntry struct {
	Addr  string `json:"addr"`
	Until string `json:"until"`
}

// ParseBlocklist decodes `osd blocklist ls --format json`, which on Pacific is two JSON arrays one
// after the other (addresses, then ranges): a stream, not one document.
func ParseBlocklist(out []byte) ([]BlocklistEntry, error) {
	var all []BlocklistEntry
	dec := json.NewDecoder(bytes.NewReader(out))
	for {
		var part []BlocklistEntry
		err := dec.Decode(&part)
		if errors.Is(err, io.EOF) {
			return all, nil
		}
		if err != nil {
			return nil, fmt.Errorf("osd blocklist ls: %w", err)
		}
		all = append(all, part...)
	}
}

// BlocklistAddrs is the set of blocklisted addresses.
func (b *Backend) BlocklistAddrs(ctx context.Context) (map[string]bool, error) {
	list, err := b.BlocklistLs(ctx)
	if err != nil {
		return nil, err
	}
	out := map[string]bool{}
	for _, e := range list {
		out[e.Addr] = true
	}
	return out, nil
}

// BlocklistLs lists the blocklist.
func (b *Backend) BlocklistLs(ctx context.Context) ([]BlocklistEntry, error) {
	out, _, err := b.monCommand(ctx, map[string]any{"prefix": "osd blocklist ls", "format": "json"})
	if err != nil {
		return nil, err
	}
	return ParseBlocklist(out)
}

// OSDMapEpoch is the cluster's current osdmap epoch.
func (b *Backend) OSDMapEpoch(ctx context.Context) (int64, error) {
	out, _, err := b.monCommand(ctx, map[string]any{"prefix": "osd dump", "format": "json"})
	if err != nil {
		return 0, err
	}
	var d struct {
		Epoch int64 `json:"epoch"`
	}
	if err := json.Unmarshal(out, &d); err != nil {
		return 0, fmt.Errorf("osd dump: %w", err)
	}
	return d.Epoch, nil
}

// WaitOSDMap returns once the cluster's osdmap is at least epoch and this client has caught up
// with it: a blocklist entry recorded at epoch is then in force for everything this node starts.
func (b *Backend) WaitOSDMap(ctx context.Context, epoch int64) error {
	for {
		e, err := b.OSDMapEpoch(ctx)
		if err != nil {
			return err
		}
		if e >= epoch {
			return b.call(ctx, "wait for osdmap", func(conn *rados.Conn) error { return conn.WaitForLatestOSDMap() })
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// ImageClients lists the addresses of the lock owners and watchers of an image: the clients that
// hold it open.
func (b *Backend) ImageClients(ctx context.Context, pool, image string) ([]string, error) {
	var out []string
	err := b.call(ctx, "image clients "+pool+"/"+image, func(conn *rados.Conn) error {
		io, err := conn.OpenIOContext(pool)
		if err != nil {
			return err
		}
		defer io.Destroy()
		img, err := rbd.OpenImageReadOnly(io, image, rbd.NoSnapshot)
		if errors.Is(err, rbd.ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		defer img.Close()
		_, lockers, err := img.ListLockers()
		if err != nil {
			return err
		}
		for _, l := range lockers {
			out = append(out, l.Addr)
		}
		watchers, err := img.ListWatchers()
		if err != nil {
			return err
		}
		for _, w := range watchers {
			out = append(out, w.Addr)
		}
		return nil
	})
	return out, err
}

// AddrIP returns the IP of an entity address (v1:10.0.0.1:6800/123, 10.0.0.1:0/456, [::1]:0/0).
func AddrIP(addr string) string {
	a := strings.TrimPrefix(strings.TrimPrefix(addr, "v1:"), "v2:")
	if i := strings.LastIndexByte(a, '/'); i >= 0 {
		a = a[:i]
	}
	host, _, err := net.SplitHostPort(a)
	if err != nil {
		return a
	}
	return host
}

// FormatEpoch prints an epoch for fence details.
func FormatEpoch(e int64) string { return strconv.FormatInt(e, 10) }
