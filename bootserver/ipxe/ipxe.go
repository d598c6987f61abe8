// Package ipxe renders the iPXE scripts herd serves. Every value placed in a script is checked
// against a conservative character set first: a script is code, and a hostile hardware record or
// query string must not be able to add commands to it.
package ipxe

import (
	"fmt"
	"net/url"
	"regexp"
	"strings"
	"time"
)

var safeRE = regexp.MustCompile(`^[A-Za-z0-9._:/@,=+%-]*$`)

// Safe reports whether s can be placed in a script or kernel command line as is.
func Safe(s string) bool { return safeRE.MatchString(s) }

// Chain is /boot.ipxe: it asks iPXE to come back with what identifies the machine. ${netX} is the
// interface that booted; ${serial} is the SMBIOS serial (a Dell service tag), which only iPXE can see.
func Chain(base string) string {
	return "#!ipxe\n" +
		"chain " + base + "/ipxe?mac=${netX/mac:hexhyp}&uuid=${uuid}&serial=${serial:uristring}&arch=${buildarch}\n"
}

// Boot is the script of an enrolled machine: its image's kernel and initrd, with a command line
// whose only secret is a one-time join token (bound to the machine, valid minutes, used once).
func Boot(base, version, kernel, initrd string, params []string) (string, error) {
	for _, v := range append([]string{base, version, kernel, initrd}, params...) {
		if !Safe(v) {
			return "", fmt.Errorf("unsafe value %q for an iPXE script", v)
		}
	}
	var b strings.Builder
	b.WriteString("#!ipxe\n")
	fmt.Fprintf(&b, "echo herd: booting image %s\n", version)
	fmt.Fprintf(&b, "kernel %s/images/%s/%s initrd=%s %s\n", base, url.PathEscape(version), url.PathEscape(kernel), initrd, strings.Join(params, " "))
	fmt.Fprintf(&b, "initrd %s/images/%s/%s\n", base, url.PathEscape(version), url.PathEscape(initrd))
	b.WriteString("boot\n")
	return b.String(), nil
}

var (
	queryRE = regexp.MustCompile(`^[A-Za-z0-9._~%=&-]*$`)
	textRE  = regexp.MustCompile(`^[A-Za-z0-9 ,.:()/_-]*$`)
)

// Wait is the script of an unknown (or not yet bootable) machine: say why, wait, ask again with the
// same (url-encoded) query. Approving the machine boots it without a power cycle.
func Wait(base, query, reason string, retry time.Duration) string {
	if !textRE.MatchString(reason) {
		reason = "not bootable yet"
	}
	if !queryRE.MatchString(query) {
		query = ""
	}
	return "#!ipxe\n" +
		"echo herd: " + reason + "\n" +
		fmt.Sprintf("sleep %d\n", int(retry.Seconds())) +
		"chain " + base + "/ipxe?" + query + "\n"
}
