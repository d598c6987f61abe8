// Package keys owns herd's etcd keyspace: every key builder and parser, every JSON value type and
// its validation. No other package spells a key or decodes a value by hand.
//
// Values are JSON objects carrying a schema version "v" (a missing "v" reads as 1 so that operators
// can write values with etcdctl by hand). Members this version of herd does not know are kept in the
// value's Extra and written back unchanged, so an older daemon or herdctl never erases a field a
// newer one added.
//
// The layout is documented for operators in docs/keyspace.md; keep the two in step.
package keys

//go:generate go run ./internal/jsongen/cmd/jsongen .
