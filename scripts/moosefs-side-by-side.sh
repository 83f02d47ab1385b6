#!/usr/bin/env bash
# Runs MooseFS (3 chunkservers on this host, one FUSE mount) and the same phases as
# `dfs-tui --cmd bench`, for a side-by-side comparison on one machine. Needs root (FUSE,
# drop_caches) and the Debian packages:
#   apt-get install moosefs-master moosefs-chunkserver moosefs-client moosefs-cli
# MooseFS refuses loopback addresses for chunkservers, so it uses this host's own address
# (traffic still stays inside the kernel). Everything lives under $DIR; stop with `stop`.
set -euo pipefail
DIR=${DIR:-/tmp/dfs-moosefs}
IP=${IP:-$(hostname -I | awk '{print $1}')}
FILES=${FILES:-2000}

stop() {
    umount "$DIR/mnt" 2>/dev/null || true
    for i in 1 2 3; do mfschunkserver -c "$DIR/cs$i.cfg" stop >/dev/null 2>&1 || true; done
    mfsmaster -c "$DIR/master.cfg" stop >/dev/null 2>&1 || true
}

if [[ "${1:-}" == stop ]]; then
    stop
    exit 0
fi

rm -rf "$DIR"
mkdir -p "$DIR/master" "$DIR/mnt"
cp /var/lib/mfs/metadata.mfs.empty "$DIR/master/metadata.mfs"
printf '*\t/\trw,alldirs,admin,maproot=0:0\n' >"$DIR/exports.cfg"
cat >"$DIR/master.cfg" <<CFG
WORKING_USER = root
WORKING_GROUP = root
DATA_PATH = $DIR/master
EXPORTS_FILENAME = $DIR/exports.cfg
MATOML_LISTEN_HOST = $IP
MATOCS_LISTEN_HOST = $IP
MATOCL_LISTEN_HOST = $IP
CFG
for i in 1 2 3; do
    mkdir -p "$DIR/cs$i" "$DIR/disk$i"
    echo "$DIR/disk$i" >"$DIR/hdd$i.cfg"
    cat >"$DIR/cs$i.cfg" <<CFG
WORKING_USER = root
WORKING_GROUP = root
DATA_PATH = $DIR/cs$i
HDD_CONF_FILENAME = $DIR/hdd$i.cfg
MASTER_HOST = $IP
BIND_HOST = $IP
CSSERV_LISTEN_HOST = $IP
CSSERV_LISTEN_PORT = 94${i}5
HDD_LEAVE_SPACE_DEFAULT = 1GiB
CFG
done
trap stop EXIT
mfsmaster -c "$DIR/master.cfg" start
for i in 1 2 3; do mfschunkserver -c "$DIR/cs$i.cfg" start; done
sleep 4
mfsmount "$DIR/mnt" -H "$IP" -P 9421
sleep 2
python3 "$(dirname "$0")/moosefs_bench.py" "$DIR/mnt" "$FILES" "${@}"
