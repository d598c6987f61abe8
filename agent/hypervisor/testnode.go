package hypervisor

import (
	"fmt"
	"os"
	"path/filepath"
)

// WriteTestNode writes a libvirt test-driver node file with the given capacity and returns its URI.
// Each simulated node needs its own file: every connection to a file URI has private state, while
// test:///default is shared by a whole process and starts with a domain named "test".
func WriteTestNode(dir, name string, cpus int, memoryMiB int64) (string, error) {
	p, err := filepath.Abs(filepath.Join(dir, name+".xml"))
	if err != nil {
		return "", err
	}
	x := fmt.Sprintf(`<node>
  <cpu>
    <mhz>2000</mhz>
    <model>herd-simulated</model>
    <active>%[1]d</active>
    <total>%[1]d</total>
    <nodes>1</nodes>
    <sockets>1</sockets>
    <cores>%[1]d</cores>
    <threads>1</threads>
  </cpu>
  <memory>%[2]d</memory>
</node>
`, cpus, memoryMiB*1024)
	if err := os.WriteFile(p, []byte(x), 0o644); err != nil {
		return "", err
	}
	return "test://" + p, nil
}
