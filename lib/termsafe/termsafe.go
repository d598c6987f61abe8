// Package termsafe keeps text that came from etcd (names, messages, labels: anyone with write access
// may have put escape sequences there) from driving the terminal that prints it. Control characters
// other than newline and tab, DEL, the C1 controls and bytes that are not UTF-8 are written as
// visible escapes: \u001b, \u009b, \xff. The escapes are also valid inside JSON strings, so the
// same filter serves every output format.
package termsafe

import (
	"io"
	"strings"
	"unicode/utf8"
)

// String returns s with every unsafe character escaped.
func String(s string) string {
	if safe(s) {
		return s
	}
	var b strings.Builder
	escape(&b, []byte(s), true)
	return b.String()
}

func safe(s string) bool {
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		if unsafeRune(r, n) {
			return false
		}
		i += n
	}
	return true
}

func unsafeRune(r rune, size int) bool {
	switch {
	case r == utf8.RuneError && size <= 1:
		return true
	case r == '\n' || r == '\t':
		return false
	case r < 0x20, r == 0x7f, r >= 0x80 && r <= 0x9f:
		return true
	}
	return false
}

const hexDigits = "0123456789abcdef"

// escape writes p to b with unsafe characters escaped. With final false, an incomplete UTF-8
// sequence at the end is left unwritten and its length returned, for the next write to complete.
func escape(b *strings.Builder, p []byte, final bool) (pending int) {
	for i := 0; i < len(p); {
		r, n := utf8.DecodeRune(p[i:])
		if r == utf8.RuneError && n <= 1 && !final && !utf8.FullRune(p[i:]) {
			return len(p) - i
		}
		switch {
		case r == utf8.RuneError && n <= 1:
			b.WriteString(`\x`)
			b.WriteByte(hexDigits[p[i]>>4])
			b.WriteByte(hexDigits[p[i]&0xf])
		case unsafeRune(r, n):
			b.WriteString(`\u00`)
			b.WriteByte(hexDigits[r>>4])
			b.WriteByte(hexDigits[r&0xf])
		default:
			b.Write(p[i : i+n])
		}
		i += n
	}
	return 0
}

// Writer filters everything written through it. It is not safe for concurrent use.
type Writer struct {
	w    io.Writer
	tail []byte // the start of a UTF-8 sequence the next write completes
}

// NewWriter wraps w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// Write escapes p and writes it; it reports len(p) when the escaped form was written.
func (t *Writer) Write(p []byte) (int, error) {
	buf := append(t.tail, p...)
	var b strings.Builder
	pending := escape(&b, buf, false)
	t.tail = append([]byte(nil), buf[len(buf)-pending:]...)
	if _, err := io.WriteString(t.w, b.String()); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Unwrap returns the writer underneath, for what may drive the terminal on purpose (a progress
// bar) and for checking whether it is one.
func (t *Writer) Unwrap() io.Writer { return t.w }
