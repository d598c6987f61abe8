package ctl

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/etcdutil"
	"github.com/herdhq/herd/lib/images"
	"github.com/herdhq/herd/lib/keys"
	"github.com/herdhq/herd/lib/units"
)

func imageCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{Use: "image", Short: "Manage the hypervisor image catalogue"}
	cmd.AddCommand(imageAddCmd(e), imageListCmd(e), imageSetCurrentCmd(e))
	return cmd
}

func imageAddCmd(e *env) *cobra.Command {
	var kernel, initrd, cmdline, copyTo string
	cmd := &cobra.Command{
		Use:   "add VERSION --kernel FILE --initrd FILE",
		Short: "Add an image version to the catalogue (sizes and sha256 recorded; versions are immutable)",
		Long: `add records VERSION's kernel and initrd (name, size, sha256) in /herd/images/VERSION. The files
themselves live in every bootserver's image directory as <dir>/VERSION/<file>: --copy-to puts them
there for a bootserver on this machine or a shared filesystem. A bootserver serves a version only
after checking its copy against the catalogue.`,
		Example: `  herdctl image add 2026.11.1 --kernel build/image/vmlinuz --initrd build/image/initrd.gz \
    --copy-to /var/lib/herd/images
  herdctl image set-current 2026.11.1`,
		Args: exactArgs("VERSION"),
		RunE: func(cmd *cobra.Command, args []string) error {
			version := args[0]
			if err := keys.ValidateImageVersion(version); err != nil {
				return usagef("%v", err)
			}
			if kernel == "" || initrd == "" {
				return usagef("--kernel and --initrd are required")
			}
			im := &keys.Image{Cmdline: cmdline, Created: time.Now().UTC()}
			var err error
			if im.Kernel, err = images.Describe(kernel); err != nil {
				return fmt.Errorf("kernel: %w", err)
			}
			if im.Initrd, err = images.Describe(initrd); err != nil {
				return fmt.Errorf("initrd: %w", err)
			}
			if im.Kernel.Name == im.Initrd.Name {
				return usagef("kernel and initrd must have different file names")
			}
			if err := im.Validate(); err != nil {
				return usagef("%v", err)
			}
			if copyTo != "" {
				for _, f := range []struct{ src, name string }{{kernel, im.Kernel.Name}, {initrd, im.Initrd.Name}} {
					if err := copyFile(f.src, filepath.Join(copyTo, version, f.name)); err != nil {
						return err
					}
				}
			}
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			key := e.space.Image(version)
			resp, err := e.client.Txn(ctx).If(etcdutil.CreateRev(key, 0)).Then(clientv3.OpPut(key, keys.MustEncode(im))).Else(clientv3.OpGet(key)).Commit()
			if err != nil {
				return err
			}
			if !resp.Succeeded {
				old, derr := keys.Decode[keys.Image](resp.Responses[0].GetResponseRange().Kvs[0].Value)
				if derr == nil && old.Kernel.SHA256 == im.Kernel.SHA256 && old.Initrd.SHA256 == im.Initrd.SHA256 && old.Cmdline == im.Cmdline {
					fmt.Fprintf(e.out, "image/%s unchanged\n", version)
					return nil
				}
				return fmt.Errorf("image %s already exists with other content; versions are immutable, add a new version", version)
			}
			_ = e.record(ctx, "image/"+version, "added", fmt.Sprintf("kernel %s, initrd %s", im.Kernel.SHA256[:12], im.Initrd.SHA256[:12]))
			fmt.Fprintf(e.out, "image/%s added (kernel %s, initrd %s)\n", version, units.FormatBytes(im.Kernel.Size), units.FormatBytes(im.Initrd.Size))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&kernel, "kernel", "", "kernel file")
	f.StringVar(&initrd, "initrd", "", "initrd file")
	f.StringVar(&cmdline, "cmdline", "", "extra kernel command line for this image")
	f.StringVar(&copyTo, "copy-to", "", "also copy the files into this image directory as <dir>/VERSION/<file>")
	return cmd
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	tmp := dst + ".tmp"
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	// Rename last: a bootserver never sees a half-written file under the final name.
	return os.Rename(tmp, dst)
}

type imageView struct {
	Version string            `json:"version"`
	Current bool              `json:"current"`
	Image   *keys.Image       `json:"image"`
	Served  map[string]string `json:"served_by"` // bootserver -> ok or why not
}

func imageListCmd(e *env) *cobra.Command {
	var o outputFlag
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List image versions and which bootservers can serve them",
		Example: `  herdctl image list
  herdctl image list -o yaml`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel, err := e.startRead(cmd, &o)
			if err != nil {
				return err
			}
			defer cancel()
			views, err := e.readImages(ctx)
			if err != nil {
				return err
			}
			t := newTable("VERSION", "CURRENT", "KERNEL", "INITRD", "CREATED", "BOOTSERVERS")
			for _, v := range views {
				cur := ""
				if v.Current {
					cur = "*"
				}
				var bs []string
				for name, verdict := range v.Served {
					bs = append(bs, name+"="+verdict)
				}
				sort.Strings(bs)
				kernel, initrd, created := "-", "-", "-"
				if v.Image != nil {
					kernel, initrd, created = units.FormatBytes(v.Image.Kernel.Size), units.FormatBytes(v.Image.Initrd.Size), age(v.Image.Created)
				}
				t.row(v.Version, cur, kernel, initrd, created, orDash(strings.Join(bs, ", ")))
			}
			if len(views) == 0 && o.format == "table" {
				fmt.Fprintln(e.errOut, "no images: add one with 'herdctl image add'")
				return nil
			}
			return o.print(e.out, views, t)
		},
	}
	o.add(cmd)
	return cmd
}

func (e *env) readImages(ctx context.Context) ([]*imageView, error) {
	resp, err := e.client.Txn(ctx).Then(
		clientv3.OpGet(e.space.ImagePrefix(), clientv3.WithPrefix()),
		clientv3.OpGet(e.space.BootserverPrefix(), clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		return nil, err
	}
	return e.imagesOf(resp.Responses[0].GetResponseRange().Kvs, resp.Responses[1].GetResponseRange().Kvs), nil
}

// imagesOf is the catalogue from the image and bootserver keys: every version, the current one,
// and each bootserver's verdict on serving it.
func (e *env) imagesOf(images, bootservers []*mvccpb.KeyValue) []*imageView {
	byVersion := map[string]*imageView{}
	current := ""
	for _, kv := range images {
		v, ok := keys.ParseLeaf(e.space.ImagePrefix(), string(kv.Key))
		if !ok {
			continue
		}
		if v == keys.ImageCurrentName {
			if c, err := keys.Decode[keys.ImageCurrent](kv.Value); err == nil {
				current = c.Version
			}
			continue
		}
		im, _ := keys.Decode[keys.Image](kv.Value)
		byVersion[v] = &imageView{Version: v, Image: im, Served: map[string]string{}}
	}
	for _, kv := range bootservers {
		name, ok := keys.ParseLeaf(e.space.BootserverPrefix(), string(kv.Key))
		if !ok {
			continue
		}
		bs, err := keys.Decode[keys.Bootserver](kv.Value)
		if err != nil {
			continue
		}
		for v, verdict := range bs.Images {
			if iv := byVersion[v]; iv != nil {
				iv.Served[name] = verdict
			}
		}
	}
	var out []*imageView
	for _, v := range byVersion {
		v.Current = v.Version == current
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Version < out[j].Version })
	return out
}

func imageSetCurrentCmd(e *env) *cobra.Command {
	return &cobra.Command{
		Use:     "set-current VERSION",
		Short:   "Make VERSION the image nodes without a pin boot next",
		Example: `  herdctl image set-current 2026.11.1`,
		Args:    exactArgs("VERSION"),
		RunE: func(cmd *cobra.Command, args []string) error {
			version := args[0]
			if err := keys.ValidateImageVersion(version); err != nil {
				return usagef("%v", err)
			}
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			cur := keys.ImageCurrent{Version: version}
			resp, err := e.client.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(e.space.Image(version)), ">", 0)).
				Then(clientv3.OpPut(e.space.ImageCurrent(), keys.MustEncode(&cur))).Commit()
			if err != nil {
				return err
			}
			if !resp.Succeeded {
				return fmt.Errorf("image %s: %w (add it first with 'herdctl image add')", version, ErrNotFound)
			}
			_ = e.record(ctx, "image/"+version, "set-current", "")
			fmt.Fprintf(e.out, "image/%s is current\n", version)
			return nil
		},
	}
}
