#!/usr/bin/env bash
# A throwaway single-node Ceph cluster for tests: one mon and one memstore OSD on one address, cephx
# on, pool size 1, every path in DIR. Daemons are stopped by their pid files, never by name.
#
# Usage: scripts/ceph-rig.sh start DIR [ADDR]   (ADDR default 127.0.0.1; ports are Ceph's fixed ones)
#        scripts/ceph-rig.sh stop DIR
# After start: DIR/ceph.conf, DIR/admin.keyring, pool "rbd" ready for RBD.
set -euo pipefail
cmd=${1:?usage: ceph-rig.sh start|stop DIR [ADDR]}
D=$(realpath -m "${2:?usage: ceph-rig.sh start|stop DIR [ADDR]}")
addr=${3:-127.0.0.1}

stop() {
  for p in "$D"/run/*.pid; do
    [ -f "$p" ] || continue
    pid=$(cat "$p" 2>/dev/null || true)
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  for i in $(seq 1 50); do
    alive=0
    for p in "$D"/run/*.pid; do
      [ -f "$p" ] || continue
      pid=$(cat "$p" 2>/dev/null || true)
      [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && alive=1
    done
    [ $alive = 0 ] && return 0
    sleep 0.1
  done
  for p in "$D"/run/*.pid; do
    pid=$(cat "$p" 2>/dev/null || true)
    [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
  done
}

if [ "$cmd" = stop ]; then
  stop
  exit 0
fi

for port in 3300 6789; do
  if (exec 3<>"/dev/tcp/$addr/$port") 2>/dev/null; then
    echo "ceph-rig: $addr:$port is in use: another Ceph (rig) runs here; one at a time" >&2
    exit 1
  fi
done
mkdir -p "$D"/{mon,osd,run,log}
fsid=$(uuidgen)
conf="$D/ceph.conf"
cat >"$conf" <<C
[global]
fsid = $fsid
mon initial members = a
mon host = [v2:$addr:3300,v1:$addr:6789]
public network = $addr/32
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
run dir = $D/run
pid file = $D/run/\$name.pid
log file = $D/log/\$name.log
admin socket = $D/run/\$name.asok
mon data = $D/mon/\$cluster-\$id
osd data = $D/osd/\$cluster-\$id
osd objectstore = memstore
memstore device bytes = 2147483648
[mon]
keyring = $D/mon.keyring
[osd]
keyring = $D/osd/\$cluster-\$id/keyring
[client]
admin socket =
log file = /dev/null
keyring = $D/admin.keyring
C
ceph-authtool --create-keyring "$D/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool --create-keyring "$D/admin.keyring" --gen-key -n client.admin \
  --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
ceph-authtool "$D/mon.keyring" --import-keyring "$D/admin.keyring" >/dev/null
monmaptool --create --addv a "[v2:$addr:3300,v1:$addr:6789]" --fsid "$fsid" "$D/monmap" >/dev/null
ceph-mon -c "$conf" --mkfs -i a --monmap "$D/monmap" --keyring "$D/mon.keyring" --setuser root --setgroup root
ceph-mon -c "$conf" -i a --setuser root --setgroup root
ceph() { command ceph -c "$conf" --connect-timeout 20 "$@"; }
ceph -s >/dev/null
osduuid=$(uuidgen)
id=$(ceph osd new "$osduuid")
mkdir -p "$D/osd/ceph-$id"
ceph-authtool --create-keyring "$D/osd/ceph-$id/keyring" --gen-key -n "osd.$id" >/dev/null
ceph auth add "osd.$id" osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' -i "$D/osd/ceph-$id/keyring" >/dev/null
ceph-osd -c "$conf" -i "$id" --mkfs --osd-uuid "$osduuid" --no-mon-config --setuser root --setgroup root >"$D/log/osd-mkfs.log" 2>&1
ceph-osd -c "$conf" -i "$id" --setuser root --setgroup root
ceph osd pool create rbd 8 8 >/dev/null
for i in $(seq 1 100); do
  ceph osd stat 2>/dev/null | grep -q "1 up" && break
  sleep 0.2
done
rbd -c "$conf" pool init rbd
echo "ceph up: $conf"
