#!/usr/bin/env bash
# Install fededge on a device: 64-bit Raspberry Pi OS or Debian arm64, JetPack 6 (Ubuntu 22.04,
# aarch64), or any Debian/Ubuntu host, from that device's startup kit.
#
#   sudo devices/install.sh --kit kits/<device> [options]      # --dry-run first to see the plan
#
# The kit's client.toml names the device's hardware profile, and the profile's can_train picks
# what gets installed into a venv (through the kit's role, which provision derives from it):
#   can_train = true   the training client: torch, then fededge with its `train` extra; the
#                      client and the agent (for deployed models) both run;
#   can_train = false  only the edge agent: fededge with its own (torch-free) dependencies
#   (or role = agent)  (numpy, onnxruntime, paho-mqtt, ...), as `pip install fededge` does.
# The requirement lists are read from fededge's own metadata (devices/install/requirements.py),
# so pyproject.toml stays the only place they are written down.
#
# Then: a system user, the kit copied to /etc/fededge/kit (owned by that user, mode 0700), and
# the systemd unit (devices/install/fededge-{client,agent}.service) installed and started.
# Run it again to upgrade: the venv is reused, fededge is reinstalled, the kit is replaced.
#
# Options (each also read from the environment variable in brackets):
#   --kit DIR          the device kit from `fededge provision` (required)       [FEDEDGE_KIT]
#   --mode MODE        auto (the kit's role / can_train; default), client or agent [FEDEDGE_MODE]
#   --venv DIR         where the venv goes (default /opt/fededge)                [FEDEDGE_VENV]
#   --kit-dest DIR     where the kit is copied (default /etc/fededge/kit)
#   --user NAME        the service user (default fededge)                        [FEDEDGE_USER]
#   --from SPEC        what to install as fededge: a wheel (`make wheel` in a checkout writes
#                      dist/fededge-<version>-py3-none-any.whl), a source directory or a pip
#                      requirement (default: this checkout, else `fededge`)      [FEDEDGE_SOURCE]
#   --wheels DIR       install offline, only from the wheels in DIR             [FEDEDGE_WHEELS]
#   --ort-wheel W      Jetson: NVIDIA's onnxruntime-gpu wheel, a path or URL          [ORT_WHEEL]
#   --torch SPEC       the torch to install for the client (a requirement, wheel path or URL;
#                      default: the torch requirement of fededge's train extra)     [TORCH_SPEC]
#   --no-service       build the venv only: no user, kit copy or systemd unit (no root needed)
#   --dry-run          print the plan and every command, change nothing
# Also: PYTHON (default python3, needs 3.10+), TORCH_INDEX (pip index for torch; on x86_64 it
# defaults to PyTorch's CPU index, since PyPI's x86_64 torch is the multi-GB CUDA build),
# JETSON=auto|yes|no (default auto: /etc/nv_tegra_release or an NVIDIA device-tree model),
# FEDEDGE_DEVICES (a profile catalog to use before the one beside this script).
#
# Jetson: onnxruntime-gpu is not on PyPI for aarch64. Download the wheel for your JetPack and
# Python from NVIDIA's Jetson Zoo (https://elinux.org/Jetson_Zoo#ONNX_Runtime) and pass it with
# ORT_WHEEL; without it the CPU onnxruntime is installed, with a warning. PyPI's aarch64 torch is
# CPU-only too: for CUDA training pass NVIDIA's JetPack torch wheel as TORCH_SPEC.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KIT=${FEDEDGE_KIT:-}
MODE=${FEDEDGE_MODE:-auto}
VENV=${FEDEDGE_VENV:-/opt/fededge}
KIT_DEST=/etc/fededge/kit
SERVICE_USER=${FEDEDGE_USER:-fededge}
SOURCE=${FEDEDGE_SOURCE:-}
WHEELS=${FEDEDGE_WHEELS:-}
ORT_WHEEL=${ORT_WHEEL:-}
TORCH_SPEC=${TORCH_SPEC:-}
PYTHON=${PYTHON:-python3}
JETSON=${JETSON:-auto}
SERVICE=1
DRY_RUN=0
STATE_HOME=/var/lib/fededge
UNIT_DIR=/etc/systemd/system

die() { echo "install.sh: error: $*" >&2; exit 2; }
warn() { echo "install.sh: warning: $*" >&2; }

# Print a command (as the shell would quote it); run it unless --dry-run.
run() {
    printf '+'; printf ' %q' "$@"; printf '\n'
    if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case $1 in
        --kit) KIT=${2:?--kit needs a directory}; shift ;;
        --mode) MODE=${2:?--mode needs auto, client or agent}; shift ;;
        --venv) VENV=${2:?--venv needs a directory}; shift ;;
        --kit-dest) KIT_DEST=${2:?--kit-dest needs a directory}; shift ;;
        --user) SERVICE_USER=${2:?--user needs a name}; shift ;;
        --from) SOURCE=${2:?--from needs a wheel, directory or requirement}; shift ;;
        --wheels) WHEELS=${2:?--wheels needs a directory}; shift ;;
        --ort-wheel) ORT_WHEEL=${2:?--ort-wheel needs a path or URL}; shift ;;
        --torch) TORCH_SPEC=${2:?--torch needs a requirement, path or URL}; shift ;;
        --no-service) SERVICE=0 ;;
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option '$1'; see --help" ;;
    esac
    shift
done

# Top-level `key = value` of a flat TOML file (before its first [table]): enough for a kit's
# client.toml and a profile, and needs no Python TOML parser (JetPack's Python 3.10 has none).
toml_top() {
    awk -v key="$1" '
        /^[[:space:]]*\[/ { exit }
        match($0, "^[[:space:]]*" key "[[:space:]]*=[[:space:]]*") {
            v = substr($0, RLENGTH + 1)
            if (substr(v, 1, 1) == "\"") { v = substr(v, 2); sub(/".*/, "", v) }
            else { sub(/[[:space:]#].*/, "", v) }
            print v; exit
        }' "$2"
}

# ------------------------------------------------------------------ the machine
ARCH=$(uname -m)
case $ARCH in
    aarch64|arm64) ARCH=aarch64 ;;
    x86_64) ;;
    armv7l|armv6l|armhf)
        die "this is a 32-bit ARM system ($ARCH): onnxruntime and torch publish no 32-bit ARM" \
            "wheels. Flash the 64-bit Raspberry Pi OS (or another arm64 OS) and run it again" ;;
    *) die "unsupported machine '$ARCH': fededge's devices are aarch64 (Pi, Jetson) or x86_64" ;;
esac
if [ "$JETSON" = auto ]; then
    JETSON=no
    if [ -f /etc/nv_tegra_release ] || grep -qs NVIDIA /proc/device-tree/model; then
        JETSON=yes
    fi
fi
case $JETSON in yes|no) ;; *) die "JETSON must be auto, yes or no, not '$JETSON'" ;; esac

command -v "$PYTHON" >/dev/null 2>&1 \
    || die "no '$PYTHON' on PATH: install python3 (apt-get install python3) or set PYTHON"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())');" \
           "fededge needs 3.10+. On a Jetson that means JetPack 6 (Ubuntu 22.04); elsewhere" \
           "set PYTHON to a python3.10 or newer"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
    || die "$PYTHON cannot create venvs with pip: apt-get install python3-venv"

# ------------------------------------------------------------------ kit → profile → mode
[ -n "$KIT" ] || die "no kit given: pass --kit kits/<device> (a device kit from fededge provision)"
[ -f "$KIT/client.toml" ] || die "$KIT: no client.toml; pass a device kit written by" \
    "\`fededge provision\` (kits/<device>), not the server or broker kit"
DEVICE=$(toml_top device "$KIT/client.toml")
PROFILE=$(toml_top profile "$KIT/client.toml")
[ -n "$PROFILE" ] || die "$KIT/client.toml has no 'profile'; re-provision the kit"
PROFILE_FILE=
for dir in ${FEDEDGE_DEVICES:+"$FEDEDGE_DEVICES"} "$HERE"; do
    if [ -f "$dir/$PROFILE.toml" ]; then PROFILE_FILE=$dir/$PROFILE.toml; break; fi
done
[ -n "$PROFILE_FILE" ] || die "profile '$PROFILE' (named by $KIT/client.toml) is not in" \
    "${FEDEDGE_DEVICES:+$FEDEDGE_DEVICES or }$HERE; set FEDEDGE_DEVICES to the catalog that has it"
CAN_TRAIN=$(toml_top can_train "$PROFILE_FILE")
THREADS=$(toml_top threads "$PROFILE_FILE")
case $CAN_TRAIN in true|false) ;;
    *) die "$PROFILE_FILE: can_train must be true or false, got '${CAN_TRAIN:-nothing}'" ;; esac
case $THREADS in ''|*[!0-9]*) THREADS=$(nproc) ;; esac

# The kit's role is what provision decided from can_train (or an explicit role = "agent");
# kits provisioned before roles existed have none, and then can_train decides here.
ROLE=$(toml_top role "$KIT/client.toml")
case $ROLE in ''|client|agent) ;;
    *) die "$KIT/client.toml: role must be \"client\" or \"agent\", got '$ROLE'; re-provision" ;;
esac
case $MODE in
    auto)
        if [ -n "$ROLE" ]; then
            MODE=$ROLE; WHY="kit role = $ROLE; profile $PROFILE has can_train = $CAN_TRAIN"
        else
            if [ "$CAN_TRAIN" = true ]; then MODE=client; else MODE=agent; fi
            WHY="profile $PROFILE: can_train = $CAN_TRAIN"
        fi ;;
    client|agent) WHY="--mode $MODE; profile $PROFILE has can_train = $CAN_TRAIN" ;;
    *) die "--mode must be auto, client or agent, not '$MODE'" ;;
esac
if [ "$MODE" = client ] && [ "$ROLE" = agent ]; then
    die "--mode client, but $KIT is an agent-only kit (role = \"agent\"): it has no training" \
        "credentials. Drop --mode, or re-provision the device with role = \"client\""
fi
if [ "$MODE" = client ] && [ "$CAN_TRAIN" = false ]; then
    warn "profile $PROFILE says it cannot train (can_train = false); installing the client anyway"
fi
GROUP=base,train
if [ "$MODE" = agent ]; then GROUP=base; fi

# ------------------------------------------------------------------ what to install
if [ -z "$SOURCE" ]; then
    if [ -f "$HERE/../pyproject.toml" ]; then SOURCE=$(cd "$HERE/.." && pwd); else SOURCE=fededge; fi
fi
if [ -f "$SOURCE/pyproject.toml" ]; then META=$SOURCE/pyproject.toml
elif [ "${SOURCE%.whl}" != "$SOURCE" ] && [ -f "$SOURCE" ]; then META=$SOURCE
else META=; fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
OFFLINE=()
if [ -n "$WHEELS" ]; then
    [ -d "$WHEELS" ] || die "--wheels $WHEELS: no such directory"
    OFFLINE=(--no-index --find-links "$WHEELS")
fi
TORCH_INDEX_ARGS=()
if [ "$MODE" = client ]; then
    if [ -z "${TORCH_INDEX+set}" ] && [ "$ARCH" = x86_64 ] && [ -z "$WHEELS" ]; then
        TORCH_INDEX=https://download.pytorch.org/whl/cpu   # not the multi-GB CUDA build
    fi
    if [ -n "${TORCH_INDEX:-}" ]; then TORCH_INDEX_ARGS=(--index-url "$TORCH_INDEX"); fi
fi
WITHOUT=(--without torch)
if [ "$JETSON" = yes ] && [ -z "$ORT_WHEEL" ]; then
    warn "onnxruntime-gpu is not on PyPI for aarch64, so this Jetson gets the CPU onnxruntime" \
         "(no CUDA or TensorRT). Download NVIDIA's wheel for your JetPack and Python from the" \
         "Jetson Zoo (https://elinux.org/Jetson_Zoo#ONNX_Runtime) and re-run with ORT_WHEEL=FILE"
fi
if [ -n "$ORT_WHEEL" ]; then
    WITHOUT+=(--without onnxruntime)
    [ "$JETSON" = yes ] || warn "ORT_WHEEL is set but this is not a Jetson; installing it anyway"
fi

# List the requirements now when the source is readable without installing it.
list_requirements() {  # GROUP [requirements.py options...]
    if [ -z "$META" ]; then echo "(read from the installed fededge's metadata)"; return; fi
    "$PYTHON" "$HERE/install/requirements.py" "$META" "$@" \
        || echo "(not readable here; read from the installed fededge's metadata)"
}

OS=
if [ -r /etc/os-release ]; then
    # shellcheck source=/dev/null
    OS=$(. /etc/os-release && echo "${PRETTY_NAME:-}")
fi
cat <<EOF
fededge install plan
  device:      ${DEVICE:-?} (kit $KIT)
  profile:     $PROFILE ($PROFILE_FILE)
  mode:        $MODE ($WHY)
  machine:     $ARCH, ${OS:-unknown OS}, Jetson: $JETSON
  python:      $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')
  venv:        $VENV
  fededge:     $SOURCE (pip install --no-deps)
  wheels:      ${WHEELS:-the package index}
  onnxruntime: ${ORT_WHEEL:-onnxruntime (CPU) from ${WHEELS:-the index}}
EOF
if [ "$MODE" = client ]; then
    echo "  torch:       ${TORCH_SPEC:-$(list_requirements train --only torch)}${TORCH_INDEX:+ (index $TORCH_INDEX)}"
fi
echo "  requirements ($GROUP):"
list_requirements "$GROUP" "${WITHOUT[@]}" | sed 's/^/    /'
if [ "$SERVICE" = 1 ]; then
    echo "  service:     fededge-$MODE.service as user $SERVICE_USER, kit copied to $KIT_DEST"
else
    echo "  service:     none (--no-service)"
fi
if [ "$DRY_RUN" = 1 ]; then echo "dry run: the commands below are printed, not run"; fi

if [ "$DRY_RUN" = 0 ] && [ "$SERVICE" = 1 ] && [ "$(id -u)" != 0 ]; then
    die "installing the service needs root: run it with sudo, or pass --no-service to build" \
        "only the venv"
fi
for path in "$VENV" "$KIT_DEST"; do
    case $path in /*) ;; *) die "'$path' must be an absolute path" ;; esac
    case $path in *[\#\&\ ]*) die "'$path': pick a path without spaces, '#' or '&'" ;; esac
done

# ------------------------------------------------------------------ the venv
if [ ! -x "$VENV/bin/python" ] || [ "$DRY_RUN" = 1 ]; then
    run "$PYTHON" -m venv "$VENV"
fi
# --no-deps, then the listed requirements: torch comes from TORCH_INDEX first, and a Jetson's
# onnxruntime-gpu wheel replaces onnxruntime (pip check then names onnxruntime as missing:
# the two provide the same module under different names).
run "${PIP[@]}" install "${OFFLINE[@]}" --no-deps --force-reinstall "$SOURCE"
REQS=$VENV/fededge-requirements.txt
printf '+ %q %q installed %s %s > %q\n' "$VENV/bin/python" "$HERE/install/requirements.py" \
    "$GROUP" "${WITHOUT[*]}" "$REQS"
if [ "$DRY_RUN" = 0 ]; then
    "$VENV/bin/python" "$HERE/install/requirements.py" installed "$GROUP" "${WITHOUT[@]}" > "$REQS"
fi
if [ "$MODE" = client ]; then
    if [ -z "$TORCH_SPEC" ]; then
        if [ "$DRY_RUN" = 0 ]; then
            TORCH_SPEC=$("$VENV/bin/python" "$HERE/install/requirements.py" installed train --only torch)
        else
            TORCH_SPEC=$(list_requirements train --only torch)
        fi
    fi
    run "${PIP[@]}" install "${OFFLINE[@]}" "${TORCH_INDEX_ARGS[@]}" "$TORCH_SPEC"
fi
if [ -n "$ORT_WHEEL" ]; then run "${PIP[@]}" install "${OFFLINE[@]}" "$ORT_WHEEL"; fi
run "${PIP[@]}" install "${OFFLINE[@]}" -r "$REQS"

if [ "$DRY_RUN" = 0 ]; then
    PROVIDERS=$("$VENV/bin/python" -c 'import onnxruntime as o; print(" ".join(o.get_available_providers()))') \
        || die "onnxruntime does not import in $VENV; see the pip output above"
    echo "onnxruntime providers: $PROVIDERS"
    if [ "$JETSON" = yes ] && [[ $PROVIDERS != *CUDAExecutionProvider* ]]; then
        warn "no CUDAExecutionProvider: models run on the CPU (see ORT_WHEEL above)"
    fi
    if [ "$MODE" = agent ] && "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
        warn "$VENV has torch from an earlier install; the agent does not use it"
    fi
fi
if [ "$SERVICE" = 0 ]; then
    echo "done: $VENV (run $VENV/bin/fededge $MODE --kit $KIT)"
    exit 0
fi

# ------------------------------------------------------------------ user, kit, unit
if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
    run useradd --system --user-group --home-dir "$STATE_HOME" --shell /usr/sbin/nologin \
        "$SERVICE_USER"
fi
if [ "$JETSON" = yes ]; then  # CUDA opens /dev/nvhost-* and /dev/nvmap, group video (and render)
    for group in video render; do
        if getent group "$group" >/dev/null; then run usermod -a -G "$group" "$SERVICE_USER"; fi
    done
fi
run install -d -o "$SERVICE_USER" -g "$SERVICE_USER" -m 0700 "$STATE_HOME"

SRC_KIT=$(cd "$KIT" && pwd)
if [ "$SRC_KIT" != "$KIT_DEST" ]; then
    if [ -e "$KIT_DEST" ] && [ ! -f "$KIT_DEST/client.toml" ] \
        && [ -n "$(ls -A "$KIT_DEST" 2>/dev/null)" ]; then
        die "$KIT_DEST exists and is not a fededge kit; refusing to replace it (pick --kit-dest)"
    fi
    run rm -rf "$KIT_DEST"
    run mkdir -p "$(dirname "$KIT_DEST")"
    run cp -a "$SRC_KIT" "$KIT_DEST"
fi
run install -d -m 0700 "$KIT_DEST/state"  # the agent's installed models (and nothing else)
run chown -R "$SERVICE_USER:$SERVICE_USER" "$KIT_DEST"
run chmod 0700 "$KIT_DEST"
run "$VENV/bin/fededge" verify-kit "$KIT_DEST"

# A training device runs both: the client trains, the agent receives deployed models (they log
# in as different MQTT users, so they do not disconnect each other).
UNITS=(agent)
if [ "$MODE" = client ]; then UNITS=(client agent); fi
JETSON_EDIT=()
if [ "$JETSON" = yes ]; then JETSON_EDIT=(-e '/^PrivateDevices=/d'); fi
for unit in "${UNITS[@]}"; do
    printf '+ render %q > %q\n' "$HERE/install/fededge-$unit.service" "$UNIT_DIR/fededge-$unit.service"
    [ "$DRY_RUN" = 1 ] && continue
    mkdir -p "$UNIT_DIR"
    sed -e "s#/opt/fededge/bin/fededge#$VENV/bin/fededge#" \
        -e "s#/etc/fededge/kit#$KIT_DEST#g" \
        -e "s#^User=fededge\$#User=$SERVICE_USER#" -e "s#^Group=fededge\$#Group=$SERVICE_USER#" \
        -e "s#^Environment=OMP_NUM_THREADS=.*#Environment=OMP_NUM_THREADS=$THREADS#" \
        "${JETSON_EDIT[@]}" \
        "$HERE/install/fededge-$unit.service" > "$UNIT_DIR/fededge-$unit.service"
done
SERVICES=("${UNITS[@]/#/fededge-}")
if [ -d /run/systemd/system ]; then
    run systemctl daemon-reload
    run systemctl enable --now "${SERVICES[@]/%/.service}"
    START="journalctl -fu ${SERVICES[0]} follows it"
else
    START="systemd is not running here; start with:"
    for unit in "${UNITS[@]}"; do
        START+=" runuser -u $SERVICE_USER -- $VENV/bin/fededge $unit --kit $KIT_DEST;"
    done
fi
if [ "$DRY_RUN" = 1 ]; then echo "dry run: nothing was changed"; else echo "done: $START"; fi
