#!/usr/bin/env bash
# Checks the runtime stages of the Dockerfile without a container engine: builds each stage's
# root filesystem with debootstrap (the Debian release the Dockerfile names), replays the
# stage's RUN lines in a chroot, copies the binaries the stage copies, and runs each image's
# ENTRYPOINT as the image's USER: `--help` of every program, `fusermount3`, the CA bundle,
# and `clip keeper` serving its socket. What it cannot check: the builder stage (the
# binaries come from this machine's cargo build, same Debian release and glibc) and BuildKit
# syntax.
#
#   cargo build --release -p clip-driver -p clip-controller
#   sudo scripts/check-image-runtime.sh [BINARY_DIR]      # default target/release
#
# Needs root, debootstrap and a Debian mirror (MIRROR, default deb.debian.org).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
for b in clip clip-controller; do
    [ -x "$BIN/$b" ] || { echo "missing $BIN/$b (cargo build --release first)"; exit 2; }
done
command -v debootstrap >/dev/null || { echo "needs debootstrap (apt-get install debootstrap)"; exit 2; }

RELEASE=$(sed -n 's/^ARG DEBIAN_RELEASE=//p' Dockerfile)
ROOT=$(mktemp -d /tmp/clip-image-XXXXXX)
chmod 0755 "$ROOT"   # an image's / is world-readable; mktemp's is not
cleanup() {
    pkill -f "$ROOT/usr/local/bin/clip keeper" 2>/dev/null || true
    umount "$ROOT/proc" 2>/dev/null || true
    rm -rf "$ROOT"
}
trap cleanup EXIT

# The stages' instructions, as JSON: {stage: {"from": parent, "run": [...], "copy": [[src,
# dst]], "user": ..., "entrypoint": [...]}}.
python3 - Dockerfile > "$ROOT.json" <<'PY'
import json, re, sys
stages, cur, lines, buf = {}, None, open(sys.argv[1]).read().splitlines(), ""
joined = []
for l in lines:
    if l.lstrip().startswith("#") and not buf:
        continue
    if l.endswith("\\"):
        buf += l[:-1] + " "
        continue
    joined.append(buf + l)
    buf = ""
for l in joined:
    m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", l)
    if m:
        cur = m.group(2)
        stages[cur] = {"from": m.group(1), "run": [], "copy": [], "user": "0:0", "entrypoint": []}
        continue
    if cur is None:
        continue
    s = stages[cur]
    if l.startswith("RUN "):
        s["run"].append(l[4:].strip())
    elif l.startswith("COPY --from=builder "):
        src, dst = l.split()[2:4]
        s["copy"].append([src, dst])
    elif l.startswith("USER "):
        s["user"] = l.split()[1]
    elif l.startswith("ENTRYPOINT "):
        s["entrypoint"] = json.loads(l[len("ENTRYPOINT "):])
print(json.dumps(stages))
PY
stage() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]][sys.argv[3]] if sys.argv[3] in ("from","user") else "\n".join(x if isinstance(x,str) else " ".join(x) for x in json.load(open(sys.argv[1]))[sys.argv[2]][sys.argv[3]]))' "$ROOT.json" "$1" "$2"; }

echo "== debootstrap $RELEASE (minbase) into $ROOT"
debootstrap --variant=minbase "$RELEASE" "$ROOT" "$MIRROR" >"$ROOT.debootstrap.log" 2>&1 \
    || { tail -20 "$ROOT.debootstrap.log"; exit 1; }
mount -t proc proc "$ROOT/proc"
# base, then fuse: the chain of the node and cli images (the controller's is base alone).
for s in base fuse; do
    while IFS= read -r cmd; do
        [ -n "$cmd" ] || continue
        echo "== $s: RUN ${cmd:0:100}..."
        chroot "$ROOT" sh -ec "$cmd" >"$ROOT.run.log" 2>&1 || { tail -20 "$ROOT.run.log"; exit 1; }
    done < <(stage "$s" run)
done
for s in node controller cli; do
    while read -r src dst; do
        install -D -m 0755 "$BIN/$(basename "$src")" "$ROOT$dst"
    done < <(stage "$s" copy)
done

fail=0
check() { if "$@" >/dev/null 2>&1; then echo "ok    $*"; else echo "FAIL  $*"; fail=1; fi; }
for s in node controller cli; do
    user=$(stage "$s" user)
    entry=$(stage "$s" entrypoint)
    check chroot --userspec="$user" "$ROOT" $entry --help
done
check chroot "$ROOT" fusermount3 -V
check chroot "$ROOT" grep -q '^user_allow_other' /etc/fuse.conf
check chroot "$ROOT" test -s /etc/ssl/certs/ca-certificates.crt
check chroot "$ROOT" getent passwd 65532
# The keeper, as the chart runs it (root, the node image), serves its socket.
mkdir -p "$ROOT/var/lib/clip"
chroot "$ROOT" /usr/local/bin/clip keeper --socket /var/lib/clip/keeper.sock --hold-seconds 5 &
for _ in $(seq 50); do [ -S "$ROOT/var/lib/clip/keeper.sock" ] && break; sleep 0.1; done
check test -S "$ROOT/var/lib/clip/keeper.sock"
kill %1 2>/dev/null || true
wait 2>/dev/null || true
rm -f "$ROOT.json" "$ROOT.debootstrap.log" "$ROOT.run.log"
[ $fail = 0 ] && echo "the Dockerfile's runtime stages run clip's programs" || exit 1
