// Package bootserver is herd's network boot service: DHCP (proxy or full), TFTP for the iPXE
// binaries, and HTTP for iPXE scripts and hypervisor images. It boots only hardware listed in etcd,
// records unknown hardware for approval, and serves an image version only after verifying its files
// against the catalogue.
//
// One package per protocol (dhcp, tftp, httpboot) with the decisions kept apart from the sockets;
// this package wires them to etcd (the backend, the shared DHCP pool) and runs them.
package bootserver
