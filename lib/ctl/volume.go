package ctl

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/keys"
)

type volumeView struct {
	Pool   string             `json:"pool"`
	Image  string             `json:"image"`
	Record *keys.VolumeRecord `json:"record"`
	// Owner: "in use" by its VM, or "orphan" (its VM is gone; kept until purged).
	Owner string `json:"owner"`
	// Purging: an operator asked the leader to delete it.
	Purging bool `json:"purging,omitempty"`

	rev int64 // the record's CreateRevision, which a purge request names
}

func (e *env) readVolumes(ctx context.Context) ([]volumeView, error) {
	resp, err := e.client.Txn(ctx).Then(
		clientv3.OpGet(e.space.VolumeRoot(), clientv3.WithPrefix()),
		clientv3.OpGet(e.space.VMPrefix(), clientv3.WithPrefix(), clientv3.WithKeysOnly()),
		clientv3.OpGet(e.space.PurgeRequestPrefix(), clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		return nil, err
	}
	live := map[string]int64{} // vm -> uid
	for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
		if name, part, ok := e.space.ParseVM(string(kv.Key)); ok && part == keys.VMPartSpec {
			live[name] = kv.CreateRevision
		}
	}
	purges := map[string]int64{} // pool/image -> the record revision a purge request names
	for _, kv := range resp.Responses[2].GetResponseRange().Kvs {
		if pool, image, ok := keys.ParseNodeScoped(e.space.PurgeRequestPrefix(), string(kv.Key)); ok {
			if r, err := keys.Decode[keys.Request](kv.Value); err == nil {
				purges[pool+"/"+image] = r.Of
			}
		}
	}
	var out []volumeView
	for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
		pool, image, ok := keys.ParseNodeScoped(e.space.VolumeRoot(), string(kv.Key))
		if !ok {
			continue
		}
		rec, err := keys.Decode[keys.VolumeRecord](kv.Value)
		if err != nil {
			continue
		}
		v := volumeView{Pool: pool, Image: image, Record: rec, Owner: "orphan", rev: kv.CreateRevision}
		if live[rec.VM] == rec.UID {
			v.Owner = "in use"
		}
		v.Purging = purges[pool+"/"+image] == kv.CreateRevision
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Pool+"/"+out[i].Image < out[j].Pool+"/"+out[j].Image })
	return out, nil
}

func volumeCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{Use: "volume", Short: "VM disks and the images they clone: import images, list disks, purge orphans"}
	cmd.AddCommand(volumeListCmd(e), volumeRmCmd(e), volumeImportCmd(e), volumeImagesCmd(e), volumeImageRmCmd(e))
	return cmd
}

func volumeListCmd(e *env) *cobra.Command {
	var o outputFlag
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List disks with their VM; orphans are disks whose VM is gone",
		Example: `  herdctl volume list
  herdctl volume list -o json | jq '.[] | select(.owner == "orphan")'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel, err := e.startRead(cmd, &o)
			if err != nil {
				return err
			}
			defer cancel()
			vols, err := e.readVolumes(ctx)
			if err != nil {
				return err
			}
			t := newTable("POOL", "IMAGE", "VM", "UID", "DISK", "SIZE", "STATE", "OWNER")
			for _, v := range vols {
				state := v.Record.State
				if v.Purging {
					state += ",purging"
				}
				if v.Record.Error != "" {
					state += ": " + truncate(v.Record.Error, 60)
				}
				disk := v.Record.Disk
				if disk == "" {
					disk = keys.RootDisk
				}
				t.row(v.Pool, v.Image, v.Record.VM, fmt.Sprint(v.Record.UID), disk, fmt.Sprintf("%dGiB", v.Record.SizeGiB), state, v.Owner)
			}
			if len(vols) == 0 && o.format == "table" {
				fmt.Fprintln(e.errOut, "no disk records (directory disks without a coordinator backend are not recorded)")
				return nil
			}
			return o.print(e.out, vols, t)
		},
	}
	o.add(cmd)
	return cmd
}

func volumeRmCmd(e *env) *cobra.Command {
	return &cobra.Command{
		Use:     "rm POOL/IMAGE",
		Short:   "Purge an orphaned disk: the leader deletes it from storage",
		Example: `  herdctl volume rm rbd/web1.16`,
		Args:    exactArgs("POOL/IMAGE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			pool, image, ok := strings.Cut(args[0], "/")
			if !ok || pool == "" || image == "" {
				return usagef("want POOL/IMAGE, e.g. rbd/web1.16")
			}
			if err := e.connect(); err != nil {
				return err
			}
			ctx, cancel := e.ctx(cmd.Context())
			defer cancel()
			vols, err := e.readVolumes(ctx)
			if err != nil {
				return err
			}
			for _, v := range vols {
				if v.Pool == pool && v.Image == image {
					if v.Owner != "orphan" {
						return fmt.Errorf("disk %s belongs to the live VM %s; delete the VM with --purge instead", args[0], v.Record.VM)
					}
					return e.markPurge(ctx, v)
				}
			}
			return fmt.Errorf("disk %s: %w", args[0], ErrNotFound)
		},
	}
}

// markPurge asks the leader to delete a disk (a request naming the disk record's incarnation).
func (e *env) markPurge(ctx context.Context, v volumeView) error {
	created, err := e.request(ctx, e.space.PurgeRequest(v.Pool, v.Image), v.rev)
	if err != nil {
		return err
	}
	if !created {
		fmt.Fprintf(e.out, "volume/%s/%s already being purged\n", v.Pool, v.Image)
		return nil
	}
	_ = e.record(ctx, "vm/"+v.Record.VM, "purge-requested", v.Pool+"/"+v.Image)
	fmt.Fprintf(e.out, "volume/%s/%s will be deleted\n", v.Pool, v.Image)
	return nil
}
