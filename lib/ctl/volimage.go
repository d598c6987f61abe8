package ctl

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/units"
)

// vmImageView is a VM image as herdctl shows it: the operator's record, the leader's status, and the
// disks cloned from it.
type vmImageView struct {
	Name   string              `json:"name"`
	Image  *keys.VMImage       `json:"image,omitempty"`
	Status *keys.VMImageStatus `json:"status,omitempty"`
	// Error: the record cannot be read.
	Error string `json:"error,omitempty"`
	// Clones are the disks (pool/image) made from it.
	Clones []string `json:"clones,omitempty"`

	rev, uid int64
}

// state is the image's state in words: the status of this incarnation of the record.
func (v vmImageView) state() string {
	switch {
	case v.Error != "":
		return "unreadable: " + v.Error
	case v.Image == nil && v.Status != nil:
		if v.Status.Error != "" {
			return "deleting: " + v.Status.Error
		}
		return "deleting"
	case v.Status == nil || v.Status.UID != v.uid:
		return "waiting for the leader"
	case v.Status.State == keys.ImageImporting:
		return "importing: " + v.Status.Progress()
	case v.Status.State == keys.ImageError:
		return "error: " + v.Status.Error
	}
	return v.Status.State
}

func (e *env) readVMImages(ctx context.Context) ([]vmImageView, error) {
	resp, err := e.client.Txn(ctx).Then(
		clientv3.OpGet(e.space.VMImagePrefix(), clientv3.WithPrefix()),
		clientv3.OpGet(e.space.VMImageStatusPrefix(), clientv3.WithPrefix()),
		clientv3.OpGet(e.space.VolumeRoot(), clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		return nil, err
	}
	byName := map[string]*vmImageView{}
	get := func(name string) *vmImageView {
		if byName[name] == nil {
			byName[name] = &vmImageView{Name: name}
		}
		return byName[name]
	}
	for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
		if name, ok := keys.ParseLeaf(e.space.VMImagePrefix(), string(kv.Key)); ok {
			v := get(name)
			v.rev, v.uid = kv.ModRevision, kv.CreateRevision
			if v.Image, err = keys.Decode[keys.VMImage](kv.Value); err != nil {
				v.Error = err.Error()
			}
		}
	}
	for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
		if name, ok := keys.ParseLeaf(e.space.VMImageStatusPrefix(), string(kv.Key)); ok {
			if st, err := keys.Decode[keys.VMImageStatus](kv.Value); err == nil {
				get(name).Status = st
			}
		}
	}
	from := map[string]*vmImageView{}
	for _, v := range byName {
		if v.Status != nil && v.Status.From != "" {
			from[v.Status.From] = v
		}
	}
	for _, kv := range resp.Responses[2].GetResponseRange().Kvs {
		pool, image, ok := keys.ParseNodeScoped(e.space.VolumeRoot(), string(kv.Key))
		if !ok {
			continue
		}
		if rec, err := keys.Decode[keys.VolumeRecord](kv.Value); err == nil && from[rec.From] != nil {
			v := from[rec.From]
			v.Clones = append(v.Clones, pool+"/"+image)
		}
	}
	out := make([]vmImageView, 0, len(byName))
	for _, v := range byName {
		sort.Strings(v.Clones)
		out = append(out, *v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func volumeImportCmd(e *env) *cobra.Command {
	var (
		img       keys.VMImage
		from      string
		noWait    bool
		waitFor   time.Duration
		serveAddr string
	)
	cmd := &cobra.Command{
		Use:   "import NAME --from FILE|URL",
		Short: "Import a raw or qcow2 disk image that VMs clone (vm create --image NAME)",
		Long: `Import a raw or qcow2 disk image that VM disks clone.

The leader fetches the image, converts a qcow2 to raw (qemu-img) and stores it in the pool as a
protected snapshot (RBD) or a file (a directory backend); a disk made with --image NAME is a
copy-on-write clone of it. Progress is in /herd/vmimagestatus/NAME; this command draws it.

--from is an http://, https:// or file:// URL the coordinators can read, or a file here: then this
command serves it to the leader over HTTP while the import runs (on --serve-addr; the leader must
reach this machine there) and waits until it is done.

Idempotent: importing a name that exists from the same source changes nothing.`,
		Example: `  herdctl volume import debian-12 --from debian-12-genericcloud-amd64.qcow2
  herdctl volume import debian-12 --from https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2
  herdctl volume import alpine --from file:///srv/images/alpine.raw --pool rbd --no-wait
  etcdctl put /herd/vmimages/debian-12 '{"v":1,"source":"https://.../debian-12.qcow2","pool":"rbd"}'   # the same`,
		Args: exactArgs("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if err := keys.ValidateName(name); err != nil {
				return usagef("image name: %v", err)
			}
			if from == "" {
				return usagef("--from is required: a file, or an http://, https:// or file:// URL")
			}
			local := !strings.Contains(from, "://")
			if local && noWait {
				return usagef("--no-wait with a local file: this command serves the file to the leader, so it must wait (or give a URL the coordinators can read)")
			}
			if err := e.connect(); err != nil {
				return err
			}
			// The serving address is known once there is a listener; the record names it.
			var srv *http.Server
			img.Source = from
			if local {
				var err error
				srv, img.Source, err = e.serveFile(from, serveAddr)
				if err != nil {
					return err
				}
				defer srv.Close()
			}
			if err := img.Validate(); err != nil {
				return usagef("image %s: %v", name, err)
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			if local {
				// The record names the URL this run serves: one left by an earlier run that did
				// not finish names a server that is gone, so it is replaced (a new uid: the
				// import starts over). A finished one stays.
				done, err := e.replaceUnfinished(ctx, name)
				if err != nil || done {
					return err
				}
			}
			want := keys.MustEncode(&img)
			result, err := e.casPut(ctx, e.space.VMImage(name), func(old []byte) (string, bool, error) {
				if old == nil {
					return want, true, nil
				}
				cur, err := keys.Decode[keys.VMImage](old)
				if err != nil {
					return "", false, fmt.Errorf("image %s exists but is unreadable (%v): delete it first (herdctl volume image-rm %s)", name, err, name)
				}
				if cur.Source != img.Source || cur.Pool != img.Pool {
					return "", false, fmt.Errorf("image %s exists, from %s in pool %s: delete it first (herdctl volume image-rm %s) to import another", name, cur.Source, cur.Pool, name)
				}
				return "", false, nil
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(e.out, "image/%s %s\n", name, result)
			if noWait {
				return nil
			}
			return e.waitImported(cmd.Context(), name, waitFor)
		},
	}
	f := cmd.Flags()
	f.StringVar(&from, "from", "", "the image: a local file, or an http://, https:// or file:// URL the coordinators can read (required)")
	f.StringVar(&img.Pool, "pool", "default", "the pool it is stored in (clones are made in their disk's pool)")
	f.StringVar(&img.Format, "format", "", "raw or qcow2 (default: found out from the file)")
	f.StringVar(&img.SHA256, "sha256", "", "the file's sha256: an import whose bytes differ fails")
	f.BoolVar(&noWait, "no-wait", false, "return once the record is written (not with a local file)")
	f.DurationVar(&waitFor, "wait-timeout", 2*time.Hour, "how long to wait for the import")
	f.StringVar(&serveAddr, "serve-addr", "", "where to serve a local file to the leader, HOST:PORT (default: this machine's address towards etcd, any port)")
	return cmd
}

// replaceUnfinished deletes image name's record unless its import finished; done says it did (the
// image exists: nothing to do).
func (e *env) replaceUnfinished(ctx context.Context, name string) (bool, error) {
	v, err := e.readVMImage(ctx, name)
	if err != nil || v == nil || (v.Image == nil && v.Error == "") {
		return false, err
	}
	if v.Status != nil && v.Status.UID == v.uid && v.Status.State == keys.ImageReady {
		fmt.Fprintf(e.out, "image/%s exists (imported %s)\n", name, v.Status.Updated.Local().Format(time.DateTime))
		return true, nil
	}
	if err := e.deleteVMImage(ctx, v, "importing it again"); err != nil {
		return false, err
	}
	fmt.Fprintf(e.errOut, "image/%s: an import that did not finish is started over\n", name)
	return false, nil
}

// readVMImage is one image as readVMImages shows it; nil if it has neither record nor status.
func (e *env) readVMImage(ctx context.Context, name string) (*vmImageView, error) {
	imgs, err := e.readVMImages(ctx)
	if err != nil {
		return nil, err
	}
	for i := range imgs {
		if imgs[i].Name == name {
			return &imgs[i], nil
		}
	}
	return nil, nil
}

// deleteVMImage deletes the image's record as v read it; doing says what for, if it changed since.
func (e *env) deleteVMImage(ctx context.Context, v *vmImageView, doing string) error {
	key := e.space.VMImage(v.Name)
	tx, err := e.client.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", v.rev)).Then(clientv3.OpDelete(key)).Commit()
	if err != nil {
		return err
	}
	if !tx.Succeeded {
		return fmt.Errorf("image %s changed while %s; try again", v.Name, doing)
	}
	return nil
}

// serveFile serves one file over HTTP under a random path, for the leader to fetch; it returns the
// server and the URL. The address advertised is the one this machine reaches etcd from, which the
// coordinators (etcd's other clients) are likeliest to reach too; --serve-addr overrides it.
func (e *env) serveFile(path, addr string) (*http.Server, string, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, "", err
	}
	fi, err := os.Stat(abs)
	if err != nil {
		return nil, "", usagef("--from: %v", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, "", usagef("--from %s: not a regular file", path)
	}
	if addr == "" {
		host, err := e.hostTowardsEtcd()
		if err != nil {
			return nil, "", fmt.Errorf("cannot tell this machine's address for the leader to fetch from (%v): give --serve-addr HOST:PORT, or an http:// URL", err)
		}
		addr = net.JoinHostPort(host, "0")
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, "", fmt.Errorf("serve %s: %w", path, err)
	}
	token := make([]byte, 16)
	_, _ = rand.Read(token)
	route := "/" + hex.EncodeToString(token) + "/" + url.PathEscape(filepath.Base(abs))
	mux := http.NewServeMux()
	mux.HandleFunc(route, func(w http.ResponseWriter, r *http.Request) { http.ServeFile(w, r, abs) })
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	return srv, "http://" + ln.Addr().String() + route, nil
}

// hostTowardsEtcd is the local address of a connection to the first etcd endpoint.
func (e *env) hostTowardsEtcd() (string, error) {
	eps := e.client.Endpoints()
	if len(eps) == 0 {
		return "", errors.New("no etcd endpoint")
	}
	hostport := eps[0]
	if u, err := url.Parse(eps[0]); err == nil && u.Host != "" {
		hostport = u.Host
	}
	c, err := net.DialTimeout("tcp", hostport, 3*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	host, _, err := net.SplitHostPort(c.LocalAddr().String())
	return host, err
}

// waitImported draws the import's progress until the image is ready or failed.
func (e *env) waitImported(parent context.Context, name string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(parent, timeout)
	defer cancel()
	bar := e.newBar(100, "image "+name)
	phase, start, hinted := "", time.Now(), false
	for {
		v, err := e.readVMImage(ctx, name)
		if err == nil {
			switch {
			case v == nil || v.Image == nil:
				e.endBar()
				return fmt.Errorf("image %s was deleted while importing", name)
			case (v.Status == nil || v.Status.UID != v.uid) && time.Since(start) > 15*time.Second && !hinted:
				hinted = true
				e.clearLine()
				fmt.Fprintf(e.errOut, "image/%s: no leader has taken the import up yet: is a coordinator with a volume backend (Ceph; herd dev's directory) running? (herdctl cluster show)\n", name)
			case v.Status != nil && v.Status.UID == v.uid:
				st := v.Status
				switch st.State {
				case keys.ImageReady:
					_ = bar.Finish()
					e.endBar()
					fmt.Fprintf(e.errOut, "image/%s ready: %s, %s (sha256 %s)\n", name, st.Format, units.FormatBytes(st.SizeBytes), st.SHA256)
					return nil
				case keys.ImageError:
					if st.Updated.After(start) {
						e.endBar()
						return fmt.Errorf("image %s: %s", name, st.Error)
					}
					// A failure from before this command: the leader tries again within a minute.
					if !hinted {
						hinted = true
						e.clearLine()
						fmt.Fprintf(e.errOut, "image/%s: the last try failed (%s); waiting for the leader's next one\n", name, st.Error)
					}
				case keys.ImageImporting:
					if st.Phase != phase {
						phase = st.Phase
						e.clearLine()
						fmt.Fprintf(e.errOut, "image/%s: %s\n", name, phase)
					}
					bar.Describe("image " + name + ": " + phase)
					if st.Total > 0 {
						_ = bar.Set(int(st.Bytes * 100 / st.Total))
					}
				}
			}
		}
		select {
		case <-ctx.Done():
			e.endBar()
			return fmt.Errorf("image %s not imported after %s (herdctl volume images; herdctl events --object image/%s)", name, timeout, name)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func volumeImagesCmd(e *env) *cobra.Command {
	var o outputFlag
	cmd := &cobra.Command{
		Use:   "images",
		Short: "List VM images, how their import went and the disks cloned from them",
		Example: `  herdctl volume images
  herdctl volume images -o json | jq '.[] | select(.status.state != "ready")'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel, err := e.startRead(cmd, &o)
			if err != nil {
				return err
			}
			defer cancel()
			imgs, err := e.readVMImages(ctx)
			if err != nil {
				return err
			}
			t := newTable("NAME", "POOL", "STATE", "SIZE", "FORMAT", "CLONES", "SOURCE")
			for _, v := range imgs {
				pool, source, size, format := "", "", "", ""
				if v.Image != nil {
					pool, source = v.Image.Pool, v.Image.Source
				}
				if v.Status != nil && v.Status.State == keys.ImageReady {
					size, format = units.FormatBytes(v.Status.SizeBytes), v.Status.Format
				}
				t.row(v.Name, pool, truncate(v.state(), 60), size, format, fmt.Sprint(len(v.Clones)), truncate(source, 70))
			}
			if len(imgs) == 0 && o.format == "table" {
				fmt.Fprintln(e.errOut, "no images (herdctl volume import NAME --from FILE)")
				return nil
			}
			return o.print(e.out, imgs, t)
		},
	}
	o.add(cmd)
	return cmd
}

func volumeImageRmCmd(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "image-rm NAME",
		Short: "Delete a VM image (refused while disks are cloned from it)",
		Long: `Delete a VM image: its record goes now, the leader removes it from storage after.
Refused while disks are cloned from it (RBD clones need their parent): purge those first
(herdctl vm delete VM --purge). VMs whose disks are not made yet then wait with a problem.`,
		Example: `  herdctl volume image-rm debian-12`,
		Args:    exactArgs("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			v, err := e.readVMImage(ctx, name)
			if err != nil {
				return err
			}
			if v != nil {
				if len(v.Clones) > 0 {
					return fmt.Errorf("image %s is cloned by %d disks (%s): purge them first (herdctl vm delete VM --purge)", name, len(v.Clones), strings.Join(firstN(v.Clones, 5), ", "))
				}
				if v.Image == nil && v.Error == "" {
					fmt.Fprintf(e.out, "image/%s already being deleted\n", name)
					return nil
				}
				if err := e.deleteVMImage(ctx, v, "deleting it"); err != nil {
					return err
				}
				_ = e.record(ctx, "image/"+name, "delete-requested", "")
				fmt.Fprintf(e.out, "image/%s deleted (the leader removes it from storage)\n", name)
				return nil
			}
			return fmt.Errorf("image %s: %w", name, ErrNotFound)
		},
	}
}

func firstN(s []string, n int) []string {
	if len(s) > n {
		return append(s[:n:n], "...")
	}
	return s
}
