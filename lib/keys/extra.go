package keys

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"sort"
	"strings"
	"sync"
)

// Extra holds the members of a JSON object that this version of herd does not know. Types embed it
// under the json:"-" tag; their MarshalJSON writes it back after the known members.
type Extra map[string]json.RawMessage

// CurrentVersion is the schema version this herd writes. A value with a higher "v" was written by a
// newer herd and is refused rather than half-understood.
const CurrentVersion = 1

// ErrNewerVersion marks a value written by a newer herd.
var ErrNewerVersion = errors.New("keys: value written by a newer herd")

// knownFields caches, per struct type, the JSON member names its fields claim and their indexes.
var knownFields sync.Map // reflect.Type -> map[string]int

func fieldsOf(t reflect.Type) map[string]int {
	if m, ok := knownFields.Load(t); ok {
		return m.(map[string]int)
	}
	m := map[string]int{}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag := f.Tag.Get("json")
		if tag == "-" || !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(tag, ",")
		if name == "" {
			name = f.Name
		}
		m[name] = i
	}
	knownFields.Store(t, m)
	return m
}

// decodeObject fills plain (a pointer to a struct type without custom methods) member by member
// from data and returns the members it did not claim. Member by member, so that an error names its
// field with the full path (disk.size_gib). Member names match case-sensitively, unlike
// encoding/json's default, because herd always writes lower-case names: a case-folded match would
// make "Memory_MiB" silently mean memory_mib while a rewrite dropped the original spelling.
func decodeObject(data []byte, plain any) (Extra, error) {
	return decodeObjectSkipping(data, plain, "")
}

// decodeObjectSkipping is decodeObject that leaves the member skip undecoded, raw in Extra.
func decodeObjectSkipping(data []byte, plain any, skip string) (Extra, error) {
	if skip == "" && fastDecode {
		rv := reflect.ValueOf(plain).Elem()
		if onlyKnownMembers(data, fieldsOf(rv.Type())) {
			// Every member is claimed, spelled exactly, once: encoding/json's one pass over the
			// struct means the same as the member-by-member decode below, at a third of the cost
			// (the leader and herdctl decode every VM's keys). Any error is reported by the slow
			// path, which names the field.
			if err := json.Unmarshal(data, plain); err == nil {
				return nil, nil
			}
			rv.Set(reflect.Zero(rv.Type()))
		}
	}
	return decodeMembers(data, plain, skip)
}

// fastDecode is off only in the test that checks both decodes agree.
var fastDecode = true

// onlyKnownMembers says whether data is a JSON object whose top-level member names are all in
// known, each once, none spelled with an escape. It only looks at the top level and never judges
// validity: false means "decode member by member", and json.Unmarshal still checks the whole.
func onlyKnownMembers(data []byte, known map[string]int) bool {
	i := 0
	for i < len(data) && (data[i] == ' ' || data[i] == '\t' || data[i] == '\n' || data[i] == '\r') {
		i++
	}
	if i == len(data) || data[i] != '{' {
		return false
	}
	var seen uint64
	depth, wantKey := 0, false
	for ; i < len(data); i++ {
		switch c := data[i]; c {
		case '"':
			j := i + 1
			escaped := false
			for j < len(data) && data[j] != '"' {
				if data[j] == '\\' {
					escaped = true
					j++
				}
				j++
			}
			if j >= len(data) {
				return false
			}
			if depth == 1 && wantKey {
				idx, ok := known[string(data[i+1:j])]
				if escaped || !ok || idx >= 64 || seen&(1<<idx) != 0 {
					return false
				}
				seen |= 1 << idx
				wantKey = false
			}
			i = j
		case '{', '[':
			depth++
			wantKey = depth == 1
		case '}', ']':
			depth--
			if depth == 0 {
				return true
			}
		case ',':
			wantKey = depth == 1
		}
	}
	return false
}

// decodeMembers is the member-by-member decode.
func decodeMembers(data []byte, plain any, skip string) (Extra, error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(data, &raw); err != nil {
		return nil, describeJSONError(err)
	}
	if raw == nil {
		return nil, errors.New("value is JSON null, want an object")
	}
	rv := reflect.ValueOf(plain).Elem()
	known := fieldsOf(rv.Type())
	var extra Extra
	var fe FieldErrors
	for k, v := range raw {
		idx, ok := known[k]
		if !ok || k == skip {
			if extra == nil {
				extra = Extra{}
			}
			extra[k] = v
			continue
		}
		if err := json.Unmarshal(v, rv.Field(idx).Addr().Interface()); err != nil {
			fe = append(fe, fieldError(k, err)...)
		}
	}
	if len(fe) > 0 {
		sortFieldErrors(fe)
		return extra, fe
	}
	return extra, nil
}

// fieldError places err, from decoding member k, under k's path.
func fieldError(k string, err error) FieldErrors {
	var nested FieldErrors
	if errors.As(err, &nested) {
		out := make(FieldErrors, len(nested))
		for i, e := range nested {
			out[i] = FieldError{Field: k + "." + e.Field, Message: e.Message}
		}
		return out
	}
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		field := k
		if te.Field != "" {
			field += "." + te.Field
		}
		return FieldErrors{{Field: field, Message: fmt.Sprintf("must be %s, not %s", jsonKind(te.Type), te.Value)}}
	}
	return FieldErrors{{Field: k, Message: err.Error()}}
}

func sortFieldErrors(fe FieldErrors) {
	sort.Slice(fe, func(i, j int) bool { return fe[i].Field < fe[j].Field })
}

// encodeObject marshals plain and appends the extra members (sorted, for stable output) that plain
// does not itself carry.
func encodeObject(plain any, extra Extra) ([]byte, error) {
	b, err := json.Marshal(plain)
	if err != nil {
		return nil, err
	}
	if len(extra) == 0 {
		return b, nil
	}
	known := fieldsOf(reflect.TypeOf(plain))
	names := make([]string, 0, len(extra))
	for k := range extra {
		if _, ok := known[k]; !ok {
			names = append(names, k)
		}
	}
	if len(names) == 0 {
		return b, nil
	}
	sort.Strings(names)
	var buf bytes.Buffer
	buf.Write(b[:len(b)-1]) // drop the closing brace
	first := len(b) == 2    // "{}"
	for _, k := range names {
		if !first {
			buf.WriteByte(',')
		}
		first = false
		kb, _ := json.Marshal(k)
		buf.Write(kb)
		buf.WriteByte(':')
		buf.Write(extra[k])
	}
	buf.WriteByte('}')
	return buf.Bytes(), nil
}

// describeJSONError turns encoding/json's errors into messages that name the field, because an
// operator fixing a value by hand needs to know which member is wrong.
func describeJSONError(err error) error {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		if te.Field == "" {
			return fmt.Errorf("invalid JSON: want %s, got %s", jsonKind(te.Type), te.Value)
		}
		return FieldErrors{{Field: te.Field, Message: fmt.Sprintf("must be %s, not %s", jsonKind(te.Type), te.Value)}}
	}
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Errorf("invalid JSON at byte %d: %v", se.Offset, err)
	}
	return fmt.Errorf("invalid JSON: %w", err)
}

func jsonKind(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "an integer"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "true or false"
	case reflect.Map, reflect.Struct:
		return "an object"
	case reflect.Slice, reflect.Array:
		return "a list"
	}
	return t.String()
}

// checkVersion enforces the "v" rule shared by every value type.
func checkVersion(v *int) error {
	switch {
	case *v == 0:
		*v = CurrentVersion
	case *v < 0:
		return FieldErrors{{Field: "v", Message: "must be a positive schema version"}}
	case *v > CurrentVersion:
		return fmt.Errorf("%w: v=%d, this herd understands v<=%d; upgrade herd", ErrNewerVersion, *v, CurrentVersion)
	}
	return nil
}

// Decode parses a value of any keyspace type: JSON syntax, member types and the version. It does not
// validate field contents; call the type's Validate for that.
func Decode[T any, P interface {
	*T
	json.Unmarshaler
	versioned
}](data []byte) (*T, error) {
	p := P(new(T))
	if err := p.UnmarshalJSON(data); err != nil {
		return nil, err
	}
	if err := checkVersion(p.version()); err != nil {
		return nil, err
	}
	return (*T)(p), nil
}

// Encode is json.Marshal with the version stamped.
func Encode[P interface {
	json.Marshaler
	versioned
}](v P) ([]byte, error) {
	if *v.version() == 0 {
		*v.version() = CurrentVersion
	}
	return v.MarshalJSON()
}

// MustEncode is Encode for values built in code, whose encoding cannot fail.
func MustEncode[P interface {
	json.Marshaler
	versioned
}](v P) string {
	b, err := Encode(v)
	if err != nil {
		panic(err)
	}
	return string(b)
}

type versioned interface{ version() *int }

// Decodable is what pointers to every versioned keyspace type satisfy: a constraint for generic
// helpers outside this package (func f[T any, P interface{ *T; keys.Decodable }]).
type Decodable interface {
	json.Unmarshaler
	versioned
}

// DecodeAny is Decode shaped as an informer's decode hook: etcdutil.NewInformer(c, prefix,
// keys.DecodeAny[keys.Node], ...).
func DecodeAny[T any, P interface {
	*T
	json.Unmarshaler
	versioned
}](_ string, data []byte) (any, error) {
	return Decode[T, P](data)
}

// Record is one key as a cache holds it: its value decoded (Value) or why not (Err), with the
// revisions, lease and size etcd gave it. Value is shared by every reader: never modify it.
type Record[T any] struct {
	Key   string
	Value *T
	Err   error
	// Raw is the value as etcd holds it: decode it again for a private copy to modify.
	Raw            []byte
	CreateRevision int64
	ModRevision    int64
	Lease          int64
	Size           int
}

// OK says whether the record decoded.
func (r *Record[T]) OK() bool { return r != nil && r.Err == nil && r.Value != nil }
