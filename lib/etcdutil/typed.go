package etcdutil

import (
	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/herdhq/herd/lib/keys"
)

// Typed is an Informer whose values decode as T: its readers get keys.Record[T], never an
// interface to assert.
type Typed[T any] struct{ *Informer }

// NewTyped prepares an informer of a prefix holding T values.
func NewTyped[T any, P interface {
	*T
	keys.Decodable
}](c *clientv3.Client, prefix string, onChange ChangeFunc, log hclog.Logger) *Typed[T] {
	return typed[T](NewInformer(c, prefix, keys.DecodeAny[T, P], onChange, log))
}

func typed[T any](inf *Informer) *Typed[T] {
	inf.wrap = func(kv *KV) any { return newRecord[T](kv) }
	return &Typed[T]{inf}
}

// WithDecode is a Typed informer with its own decoder (one that must return *T), for a prefix
// whose values are read in part (keys.DecodeAssignmentHead).
func WithDecode[T any](c *clientv3.Client, prefix string, decode func([]byte) (*T, error), onChange ChangeFunc, log hclog.Logger) *Typed[T] {
	return typed[T](NewInformer(c, prefix, func(_ string, v []byte) (any, error) { return decode(v) }, onChange, log))
}

// Record is a cached key as a typed record (nil for nil): the one a Typed informer built when the
// key arrived, else a new one.
func Record[T any](kv *KV) *keys.Record[T] {
	if kv == nil {
		return nil
	}
	if r, ok := kv.rec.(*keys.Record[T]); ok {
		return r
	}
	return newRecord[T](kv)
}

func newRecord[T any](kv *KV) *keys.Record[T] {
	r := &keys.Record[T]{Key: kv.Key, Err: kv.Err, Raw: kv.Value, CreateRevision: kv.CreateRevision, ModRevision: kv.ModRevision, Lease: kv.Lease, Size: kv.Size}
	if kv.Err == nil {
		r.Value, _ = kv.Obj.(*T)
	}
	return r
}

// Get returns the cached key, or nil.
func (t *Typed[T]) Get(key string) *keys.Record[T] { return Record[T](t.Informer.Get(key)) }

// List returns every cached key, sorted.
func (t *Typed[T]) List() []*keys.Record[T] { return records[T](t.Informer.List()) }

// Unsorted returns every cached key in no particular order (Informer.Unsorted).
func (t *Typed[T]) Unsorted() []*keys.Record[T] { return records[T](t.Informer.Unsorted()) }

func records[T any](kvs []*KV) []*keys.Record[T] {
	out := make([]*keys.Record[T], len(kvs))
	for i, kv := range kvs {
		out[i] = Record[T](kv)
	}
	return out
}
