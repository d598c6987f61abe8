package keys

import (
	"fmt"
	"strings"
)

// placeholderSerials are the serial numbers firmware reports when the vendor never set one: many
// white-box machines share each of them, so none identifies a machine.
var placeholderSerials = map[string]bool{
	"to be filled by o.e.m.": true, "to be filled by oem": true, "default string": true,
	"system serial number": true, "chassis serial number": true, "base board serial number": true,
	"not specified": true, "not applicable": true, "not available": true, "n/a": true, "na": true,
	"none": true, "null": true, "unknown": true, "invalid": true, "empty": true, "serial": true,
	"0123456789": true, "123456789": true, "1234567890": true, "12345678": true, "abcdefg": true,
	"o.e.m.": true, "oem": true, "xxxxxxxx": true, "filled by o.e.m.": true, "type1sku0": true,
}

// PlaceholderSerial says why a serial number cannot identify a machine ("" when it can): empty or
// blank, a vendor placeholder, one character repeated (00000000, FFFFFFFF), or too short to be
// unique.
func PlaceholderSerial(s string) string {
	t := strings.ToLower(strings.TrimSpace(s))
	switch {
	case t == "":
		return "the serial number is empty"
	case placeholderSerials[t]:
		return fmt.Sprintf("%q is a placeholder firmware reports when the vendor set no serial number", s)
	case len(t) < 4:
		return fmt.Sprintf("%q is too short to tell machines apart", s)
	case strings.Count(t, t[:1]) == len(t):
		return fmt.Sprintf("%q is one character repeated, a placeholder", s)
	}
	return ""
}
