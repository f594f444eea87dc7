#!/usr/bin/env bash
# Install (or upgrade, or remove) gpudeck on one machine of a cluster, as a systemd service.
#
#   On the coordinator's machine:  sudo ./install-node.sh --coordinator-node
#   On every GPU machine:          sudo ./install-node.sh --coordinator HOST:7070 --token-file token
#                                  (or: ... | sudo ./install-node.sh --coordinator HOST:7070, token on stdin)
#   Upgrade:                       run the same command again (the token and settings are kept)
#   Remove:                        sudo ./install-node.sh --uninstall
#
# Read it before you run it: it is meant to be copied to each machine and run there, never piped from
# the internet into a root shell. What it does, in order: checks (root, token, Python, the
# coordinator's certificate against the token's pin) before it changes anything; creates the system
# user gpudeck; creates or upgrades a virtual environment in /opt/gpudeck/venv and installs
# gpudeck[train] there (from the package index, or --from a wheel); writes /etc/gpudeck/ (settings
# and the token, 0600) and the systemd units that the installed package carries; enables and starts
# the service when systemd runs. Run it with --help for every option.

if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail

# Final paths on the machine; --root DIR puts them under DIR (the units name them without DIR).
OPT_DIR=/opt/gpudeck
VENV_DIR=/opt/gpudeck/venv
ETC_DIR=/etc/gpudeck
UNIT_DIR=/etc/systemd/system
STATE_DIR=/var/lib/gpudeck
BIN_LINK=/usr/local/bin/gpudeck
SYSUSERS_FILE=/etc/sysusers.d/gpudeck.conf
TMPFILES_FILE=/etc/tmpfiles.d/gpudeck.conf
SERVICE_USER=gpudeck
DEFAULT_PORT=7070
AGENT_UNIT=gpudeck-agent.service
COORDINATOR_UNIT=gpudeck-coordinator.service
# The same pattern as gpudeck.protocol.auth (tests/test_packaging.py keeps the two equal).
TOKEN_PATTERN='^gd1\.[0-9a-f]{64}\.[A-Za-z0-9_-]{32,128}$'

usage() {
    cat <<'EOF'
Usage: install-node.sh [OPTIONS]

Install gpudeck on this machine and run it as a systemd service (upgrade in place when run again).

A GPU machine (the agent):
  --token-file F         the cluster's join token (print it with `gpudeck token` on the coordinator);
                         without it the token is read from standard input, and on an upgrade the
                         installed token is kept
  --coordinator HOST:PORT
                         the coordinator (default port 7070); without it the agent finds the
                         coordinator over mDNS. The installer checks the coordinator's certificate
                         against the token before it installs anything.
The coordinator's machine:
  --coordinator-node     install and start the coordinator instead, and print the join command
  --port P               the coordinator's port (default 7070; kept on an upgrade)
Both:
  --from WHEEL           install this wheel (offline labs: put the wheels of its dependencies in the
                         same folder, and set PIP_NO_INDEX=1 where there is no package index at all);
                         default: gpudeck[train] from the package index
  --torch-spec SPEC      the torch requirement, e.g. torch==2.5.1 (default: what pip picks, the
                         CUDA build on Linux; for another build point PIP_EXTRA_INDEX_URL at it)
  --python PY            the Python (3.10 or newer, with venv) for /opt/gpudeck/venv (default: python3)
  --root DIR             install into the staging root DIR, for image builders and tests: no user is
                         created and nothing started; the service is enabled for the image's first
                         boot. The environment's scripts name /opt/gpudeck/venv, as in the image,
                         and it runs where the image has this machine's Python at the same path.
  --uninstall            remove the services, units, settings and /opt/gpudeck; keep /var/lib/gpudeck
  -h, --help             this help

Exit status: 0 done, 1 refused (the reason on stderr), 2 usage.
EOF
}

say() { printf '%s\n' "$*"; }
refuse() { printf 'install-node.sh: %s\n' "$*" >&2; exit 1; }
usage_error() { printf 'install-node.sh: %s (see --help)\n' "$*" >&2; exit 2; }

# --- checks: nothing on the machine changes before all of them pass -------------------------------

require_root() {  # $1: the effective user id
    if [ "$1" != 0 ]; then
        refuse "this installer must run as root, because it creates the gpudeck user and writes /opt/gpudeck, /etc/gpudeck and systemd units: run it again with sudo."
    fi
}

strip() {  # leading and trailing white space off $1
    local text="$1"
    text="${text#"${text%%[![:space:]]*}"}"
    printf '%s' "${text%"${text##*[![:space:]]}"}"
}

check_token() {  # $1: the token text; $2: where it came from
    if [ -z "$1" ]; then
        refuse "no join token: give --token-file F, or the token on standard input (print it with \`gpudeck token\` on the coordinator's machine)."
    fi
    if ! printf '%s\n' "$1" | grep -Eq "$TOKEN_PATTERN"; then
        refuse "$2 is not a gpudeck join token (expected gd1.<64 hex digits>.<secret>; print the right one with \`gpudeck token\` on the coordinator's machine)."
    fi
}

split_host_port() {  # $1: HOST or HOST:PORT or [V6]:PORT -> sets HOST and PORT
    local address="$1"
    if [[ "$address" =~ ^\[([^]]+)\](:([0-9]+))?$ ]]; then
        HOST="${BASH_REMATCH[1]}"; PORT="${BASH_REMATCH[3]:-$DEFAULT_PORT}"
    elif [[ "$address" =~ ^([^:]+)(:([0-9]+))?$ ]]; then
        HOST="${BASH_REMATCH[1]}"; PORT="${BASH_REMATCH[3]:-$DEFAULT_PORT}"
    else
        usage_error "--coordinator $address is not HOST:PORT (for example 192.168.1.10:7070)"
    fi
    if [ "$PORT" -lt 1 ] || [ "$PORT" -gt 65535 ]; then
        usage_error "--coordinator $address: the port must be between 1 and 65535"
    fi
}

check_python() {  # $1: the interpreter
    if ! command -v "$1" >/dev/null 2>&1; then
        refuse "no Python interpreter $1 on this machine: install Python 3.10 or newer, or give one with --python."
    fi
    if ! "$1" -I -c 'import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 10) else 1)' >/dev/null 2>&1; then
        refuse "$1 is not Python 3.10 or newer with the venv module (on Debian and Ubuntu: apt-get install python3-venv); give another with --python."
    fi
    # The venv runs this interpreter as the service user: a Python under a private home (pyenv in
    # /root, for one) would start for root and fail for gpudeck.
    local base path
    base="$("$1" -I -c 'import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))')"
    path="$base"
    while [ "$path" != / ] && [ -n "$path" ]; do
        if (( (8#$(stat -L -c %a "$path") & 1) == 0 )); then
            say "warning: $path is not open to other users, so the $SERVICE_USER user cannot run $base, the Python the environment is made from; give a system-wide one with --python (for example /usr/bin/python3)"
            break
        fi
        path="$(dirname "$path")"
    done
}

coordinator_fingerprint() {  # $1 host, $2 port: print the SHA-256 of the certificate it presents
    "$PYTHON" -I - "$1" "$2" <<'PY'
import hashlib, socket, ssl, sys

host, port = sys.argv[1], int(sys.argv[2])
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE  # identity is the pin in the token, compared by the caller
try:
    with socket.create_connection((host, port), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
except OSError as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
print(hashlib.sha256(der).hexdigest())
PY
}

check_pin() {  # $1 host, $2 port, $3 token: refuse when the coordinator is another one
    local pinned fingerprint reason
    pinned="$(printf '%s' "$3" | cut -d. -f2)"
    if fingerprint="$(coordinator_fingerprint "$1" "$2" 2>"$WORK/pin.err")"; then
        if [ "$fingerprint" != "$pinned" ]; then
            refuse "the coordinator at $1:$2 presents a certificate (sha256 $fingerprint) other than the one the token pins (sha256 $pinned): the token belongs to another coordinator, or something is in the middle. Nothing was installed."
        fi
        say "checked: the coordinator at $1:$2 presents the certificate the token pins"
    else
        reason="$(tr '\n' ' ' <"$WORK/pin.err")"
        say "warning: could not reach the coordinator at $1:$2 to check its certificate (${reason% }); installing anyway: the agent checks the certificate on every connection and retries until the coordinator answers"
    fi
}

# --- small helpers for idempotent writes -----------------------------------------------------------

CHANGES=()
note_change() { CHANGES+=("$1"); say "  $1"; }

user_ids() {  # print "uid:gid" of the service user in the target root, or nothing
    if [ -z "$ROOT" ]; then
        getent passwd "$SERVICE_USER" | cut -d: -f3,4 || true
    elif [ -f "$ROOT/etc/passwd" ]; then
        awk -F: -v u="$SERVICE_USER" '$1 == u { print $3 ":" $4 }' "$ROOT/etc/passwd"
    fi
}

put_file() {  # put_file SRC DEST MODE [OWNER]: install SRC as DEST unless it is already that
    local src="$1" dest="$2" mode="$3" owner="${4:-0:0}" what="${5:-$2}"
    if [ -f "$dest" ] && cmp -s "$src" "$dest" && [ "$(stat -c '%a %u:%g' "$dest")" = "${mode#0} $owner" ]; then
        return
    fi
    mkdir -p "$(dirname "$dest")"
    install -m "$mode" -o "${owner%:*}" -g "${owner#*:}" "$src" "$dest.gpudeck-new"
    mv -f "$dest.gpudeck-new" "$dest"
    note_change "wrote $what"
}

put_text() {  # put_text DEST MODE OWNER TEXT
    printf '%s' "$4" >"$WORK/text"
    put_file "$WORK/text" "$1" "$2" "$3" "${1#"$ROOT"}"
}

put_link() {  # put_link TARGET LINK
    if [ "$(readlink "$2" 2>/dev/null)" = "$1" ]; then return; fi
    mkdir -p "$(dirname "$2")"
    ln -sfn "$1" "$2"
    note_change "linked ${2#"$ROOT"} -> $1"
}

env_value() {  # env_value FILE KEY: the value a previous run (or the admin) left, or nothing
    if [ -f "$1" ]; then sed -n "s/^$2=//p" "$1" | tail -n 1; fi
}

systemd_running() { [ -z "$ROOT" ] && [ -d /run/systemd/system ]; }

# --- the steps --------------------------------------------------------------------------------------

ensure_user() {
    if [ -n "$ROOT" ]; then
        if [ -z "$(user_ids)" ]; then
            say "  the user $SERVICE_USER is not in $ROOT/etc/passwd: files stay owned by root until systemd-sysusers and systemd-tmpfiles create the user and fix the owners at first boot ($SYSUSERS_FILE, $TMPFILES_FILE)"
        fi
        return
    fi
    if ! getent passwd "$SERVICE_USER" >/dev/null; then
        useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
            --shell "$(command -v nologin || echo /usr/sbin/nologin)" --comment "gpudeck agent and coordinator" "$SERVICE_USER"
        note_change "created the system user $SERVICE_USER"
    fi
    local group
    for group in video render; do
        if getent group "$group" >/dev/null && ! id -nG "$SERVICE_USER" | tr ' ' '\n' | grep -qx "$group"; then
            usermod -a -G "$group" "$SERVICE_USER"
            note_change "added $SERVICE_USER to the group $group (GPU device access)"
        fi
    done
}

install_package() {
    local venv="$ROOT$VENV_DIR" before after forced=""
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c '' 2>/dev/null; then
        say "  upgrading gpudeck in $VENV_DIR"
    else
        rm -rf "$venv"
        mkdir -p "$ROOT$OPT_DIR"
        "$PYTHON" -I -m venv "$venv"
        note_change "created the virtual environment $VENV_DIR"
    fi
    before="$("$venv/bin/python" -I -m pip freeze --all 2>/dev/null || true)"
    local requirements=() options=(--upgrade --upgrade-strategy only-if-needed --disable-pip-version-check)
    if [ -n "$TORCH_SPEC" ]; then requirements+=("$TORCH_SPEC"); fi
    if [ -n "$FROM" ]; then
        requirements+=("${FROM}[train]")
        options+=(--find-links "$(dirname "$FROM")")
    else
        requirements+=("gpudeck[train]")
    fi
    say "  pip install ${requirements[*]}"
    if ! "$venv/bin/python" -I -m pip install --quiet "${options[@]}" "${requirements[@]}"; then
        refuse "pip could not install ${requirements[*]} into $VENV_DIR (its messages are above)."
    fi
    if [ -n "$FROM" ] && ! wheel_is_installed "$venv"; then
        # pip keeps an installed gpudeck of the wheel's version; a wheel rebuilt at that version wins.
        "$venv/bin/python" -I -m pip install --quiet --force-reinstall --no-deps --disable-pip-version-check "$FROM"
        forced=1
    fi
    if [ -n "$ROOT" ]; then relocate_scripts "$venv"; fi
    after="$("$venv/bin/python" -I -m pip freeze --all 2>/dev/null || true)"
    if [ "$before" != "$after" ] || [ -n "$forced" ]; then
        note_change "installed $("$venv/bin/python" -I -m gpudeck --version) and its dependencies"
    fi
    PACKAGE_SHARE="$venv/share/gpudeck"
    if [ ! -f "$PACKAGE_SHARE/systemd/$AGENT_UNIT" ]; then
        refuse "the installed gpudeck carries no systemd units (looked in $VENV_DIR/share/gpudeck/systemd): install a wheel built from a version that has packaging/."
    fi
}

wheel_is_installed() {  # $1 venv: is the installed gpudeck the content of the wheel $FROM?
    "$1/bin/python" -I - "$FROM" <<'PY'
import sys, zipfile
from importlib.metadata import distribution

try:
    with zipfile.ZipFile(sys.argv[1]) as wheel:
        record = next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))
        wanted = dict(line.split(",")[:2] for line in wheel.read(record).decode().splitlines() if line)
except (OSError, zipfile.BadZipFile, StopIteration):
    sys.exit(0)  # not a wheel (an sdist): leave it to pip
def key(path):  # the package's modules, and its data files (the units) wherever pip put them
    path = str(path).split(".data/data/", 1)[-1]
    return path[path.index("share/gpudeck/"):] if "share/gpudeck/" in path else path

installed = {key(f): f"{f.hash.mode}={f.hash.value}" for f in distribution("gpudeck").files or [] if f.hash}
sys.exit(any(digest and key(path).startswith(("gpudeck/", "share/gpudeck/")) and installed.get(key(path)) != digest
             for path, digest in wanted.items()))
PY
}

relocate_scripts() {  # $1 venv under --root: make its scripts name the final path, as in the image
    local script
    for script in "$1"/bin/*; do
        if [ -f "$script" ] && [ ! -L "$script" ] && grep -qF "$ROOT$VENV_DIR" "$script" 2>/dev/null; then
            sed -i "s#$ROOT$VENV_DIR#$VENV_DIR#g" "$script"
        fi
    done
}

write_config() {
    local owner="0:0" ids
    ids="$(user_ids)"
    if [ -n "$ids" ]; then owner="$ids"; fi
    mkdir -p "$ROOT$ETC_DIR"
    chmod 0755 "$ROOT$ETC_DIR"
    if [ "$ROLE" = agent ]; then
        printf '%s\n' "$TOKEN" >"$WORK/token"
        put_file "$WORK/token" "$ROOT$ETC_DIR/token" 0600 "$owner" "$ETC_DIR/token (the join token, mode 0600)"
        put_text "$ROOT$ETC_DIR/agent.env" 0644 0:0 "# Settings of gpudeck-agent.service, written by install-node.sh, which keeps these values when it
# runs again (an upgrade). After an edit: systemctl restart gpudeck-agent
#
# The coordinator, HOST:PORT. Empty: find it over mDNS (works within one network segment).
GPUDECK_COORDINATOR=$COORDINATOR
# The join token (gd1.<sha256 of the coordinator's certificate>.<secret>): mode 0600, owner $SERVICE_USER.
GPUDECK_TOKEN_FILE=$ETC_DIR/token
# More flags for \`gpudeck agent\`, for example --name NAME or --mdns-interface IP.
GPUDECK_AGENT_ARGS=$AGENT_ARGS
"
    else
        put_text "$ROOT$ETC_DIR/coordinator.env" 0644 0:0 "# Settings of gpudeck-coordinator.service, written by install-node.sh, which keeps these values
# when it runs again (an upgrade). After an edit: systemctl restart gpudeck-coordinator
#
# Flags for \`gpudeck coordinator\`: where to listen (agents, the TUI and the command line connect to
# this TCP port: open it in the firewall to the cluster's machines), and for example --no-mdns or
# --mdns-interface IP. The state (database, certificate, join token) is in $STATE_DIR/coordinator.
GPUDECK_COORDINATOR_ARGS=$COORDINATOR_ARGS
"
    fi
}

write_units() {
    local unit
    for unit in "$AGENT_UNIT" "$COORDINATOR_UNIT"; do
        if [ "$unit" = "$(role_unit)" ] || [ -f "$ROOT$UNIT_DIR/$unit" ]; then
            # A unit installed earlier (the other role on this machine) is upgraded too.
            put_file "$PACKAGE_SHARE/systemd/$unit" "$ROOT$UNIT_DIR/$unit" 0644 0:0 "$UNIT_DIR/$unit"
        fi
    done
    put_file "$PACKAGE_SHARE/systemd/gpudeck.sysusers" "$ROOT$SYSUSERS_FILE" 0644 0:0 "$SYSUSERS_FILE"
    put_file "$PACKAGE_SHARE/systemd/gpudeck.tmpfiles" "$ROOT$TMPFILES_FILE" 0644 0:0 "$TMPFILES_FILE"
    if [ ! -e "$ROOT$BIN_LINK" ] || [[ "$(readlink "$ROOT$BIN_LINK" 2>/dev/null)" == "$VENV_DIR/"* ]]; then
        put_link "$VENV_DIR/bin/gpudeck" "$ROOT$BIN_LINK"
    fi
}

make_state_dir() {
    local owner="0:0" ids dir
    ids="$(user_ids)"
    if [ -n "$ids" ]; then owner="$ids"; fi
    for dir in "$STATE_DIR" "$STATE_DIR/$ROLE"; do
        if [ ! -d "$ROOT$dir" ]; then
            install -d -m 0750 -o "${owner%:*}" -g "${owner#*:}" "$ROOT$dir"
            note_change "created $dir (state)"
        fi
    done
}

role_unit() { if [ "$ROLE" = agent ]; then echo "$AGENT_UNIT"; else echo "$COORDINATOR_UNIT"; fi; }

start_service() {
    local unit changed="${#CHANGES[@]}"  # what this run changed before it got here
    unit="$(role_unit)"
    if systemd_running; then
        systemctl daemon-reload
        systemctl enable --quiet "$unit"
        if ! systemctl is-active --quiet "$unit"; then
            systemctl start "$unit"
            note_change "enabled and started $unit"
        elif [ "$changed" -gt 0 ]; then
            systemctl restart "$unit"   # the agent's jobs keep running (KillMode=process)
            note_change "restarted $unit"
        fi
        local other
        for other in "$AGENT_UNIT" "$COORDINATOR_UNIT"; do
            # The other service of this machine runs from the same environment: restart it on an upgrade.
            if [ "$other" != "$unit" ] && [ "$changed" -gt 0 ] && systemctl is-active --quiet "$other"; then
                systemctl restart "$other"
                note_change "restarted $other"
            fi
        done
        STARTED=1
    else
        put_link "$UNIT_DIR/$unit" "$ROOT$UNIT_DIR/multi-user.target.wants/$unit"
        if [ -n "$ROOT" ]; then
            say "  the service is enabled in $ROOT (it starts when a machine boots from it); nothing was started"
        else
            say "  systemd is not running on this machine (no /run/systemd/system), so $unit is enabled but was not started"
        fi
        STARTED=""
    fi
}

# How the service of role $1 (agent or coordinator) runs now, or how to start it where systemd does not.
print_how_it_runs() {
    local role="$1" args_var
    args_var="GPUDECK_$(printf '%s' "$role" | tr '[:lower:]' '[:upper:]')_ARGS"
    if [ -n "$STARTED" ]; then
        say "gpudeck-$role is running. Follow it with: journalctl -u gpudeck-$role -f"
    elif [ -z "$ROOT" ]; then
        say "Start the $role by hand (as $SERVICE_USER, with the service's settings):"
        say "  runuser -u $SERVICE_USER -- sh -c 'set -a; . $ETC_DIR/$role.env; exec $VENV_DIR/bin/gpudeck $role --state-dir $STATE_DIR/$role \$$args_var'"
    fi
}

print_agent_next_steps() {
    say ""
    print_how_it_runs agent
    say "Next: this machine appears in \`gpudeck nodes\` (or the dashboard, \`gpudeck\`) on any machine that has the token."
    if [ -z "$COORDINATOR" ]; then
        say "No --coordinator: the agent looks for the coordinator over mDNS. Where multicast does not pass (VLANs, VPNs), run this again with --coordinator HOST:PORT."
    fi
}

print_coordinator_next_steps() {
    local token_file="$ROOT$STATE_DIR/coordinator/token" token="" host port
    if [ -n "$STARTED" ]; then
        for _ in $(seq 1 60); do
            [ -s "$token_file" ] && break
            sleep 0.5
        done
    fi
    if [ -s "$token_file" ]; then token="$(strip "$(cat "$token_file")")"; fi
    port="$(printf '%s\n' "$COORDINATOR_ARGS" | sed -n 's/.*--port[= ]\([0-9]*\).*/\1/p')"
    host="$( (hostname -I 2>/dev/null || true) | awk '{ print $1 }')"
    host="${host:-$(uname -n)}"
    say ""
    print_how_it_runs coordinator
    local from_flag=""
    if [ -n "$FROM" ]; then from_flag=" --from $(basename "$FROM")"; fi
    if [ -n "$token" ]; then
        say "Join each GPU machine to the cluster: copy install-node.sh there$([ -n "$FROM" ] && echo " with $(basename "$FROM")") and run, as root"
        say "(the token is a secret: whoever holds it can run code on the cluster's machines):"
        say ""
        say "  echo '$token' | sudo ./install-node.sh --coordinator $host:${port:-$DEFAULT_PORT}$from_flag"
    else
        say "Once the coordinator has started, print the join token with"
        say "  sudo $VENV_DIR/bin/gpudeck token --state-dir $STATE_DIR/coordinator"
        say "and join each GPU machine with"
        say "  echo 'TOKEN' | sudo ./install-node.sh --coordinator $host:${port:-$DEFAULT_PORT}$from_flag"
    fi
    say ""
    say "The installed copy of install-node.sh is $VENV_DIR/share/gpudeck/install-node.sh. Open TCP port ${port:-$DEFAULT_PORT} to the cluster's machines and to the machines you run the dashboard from."
}

uninstall() {
    local unit removed=() path
    for unit in "$AGENT_UNIT" "$COORDINATOR_UNIT"; do
        if systemd_running && [ -f "$UNIT_DIR/$unit" ]; then
            if [ "$unit" = "$AGENT_UNIT" ] && systemctl is-active --quiet "$unit"; then
                # The job ranks run from /opt/gpudeck/venv, which goes away: end them with the agent.
                systemctl kill "$unit" || true
                sleep 2
            fi
            systemctl disable --now --quiet "$unit" || true
        fi
        for path in "$UNIT_DIR/$unit" "$UNIT_DIR/multi-user.target.wants/$unit"; do
            if [ -e "$ROOT$path" ] || [ -L "$ROOT$path" ]; then rm -f "$ROOT$path"; removed+=("$path"); fi
        done
    done
    if systemd_running; then systemctl daemon-reload; fi
    rmdir "$ROOT$UNIT_DIR/multi-user.target.wants" 2>/dev/null || true
    for path in "$SYSUSERS_FILE" "$TMPFILES_FILE"; do
        if [ -e "$ROOT$path" ]; then rm -f "$ROOT$path"; removed+=("$path"); fi
    done
    if [[ "$(readlink "$ROOT$BIN_LINK" 2>/dev/null)" == "$VENV_DIR/"* ]]; then rm -f "$ROOT$BIN_LINK"; removed+=("$BIN_LINK"); fi
    for path in "$ETC_DIR" "$OPT_DIR"; do
        if [ -e "$ROOT$path" ]; then rm -rf -- "$ROOT$path"; removed+=("$path"); fi
    done
    if [ "${#removed[@]}" -eq 0 ]; then
        say "gpudeck is not installed${ROOT:+ in $ROOT}: nothing to remove"
    else
        say "removed:"
        printf '  %s\n' "${removed[@]/#/$ROOT}"
    fi
    if [ -d "$ROOT$STATE_DIR" ]; then
        say "kept the state dir $ROOT$STATE_DIR (job logs and checkpoints, the coordinator's database, certificate and join token); remove it with: rm -rf $ROOT$STATE_DIR"
    fi
    if [ -z "$ROOT" ] && getent passwd "$SERVICE_USER" >/dev/null; then
        say "kept the user $SERVICE_USER, which owns the state dir; remove both with: userdel $SERVICE_USER && rm -rf $STATE_DIR"
    fi
}

# --- main ---------------------------------------------------------------------------------------------

main() {
    ROLE=agent ROOT="" FROM="" TORCH_SPEC="" PYTHON=python3 TOKEN_FILE="" COORDINATOR_GIVEN="" PORT_GIVEN=""
    local uninstall_only="" coordinator_flag="" token_file_given=""
    while [ $# -gt 0 ]; do
        case "$1" in
            -h|--help) usage; exit 0 ;;
            --token-file) [ $# -ge 2 ] || usage_error "--token-file needs a file"; TOKEN_FILE="$2"; token_file_given=1; shift 2 ;;
            --token-file=*) TOKEN_FILE="${1#*=}"; token_file_given=1; shift ;;
            --coordinator) [ $# -ge 2 ] || usage_error "--coordinator needs HOST:PORT"; coordinator_flag="$2"; COORDINATOR_GIVEN=1; shift 2 ;;
            --coordinator=*) coordinator_flag="${1#*=}"; COORDINATOR_GIVEN=1; shift ;;
            --coordinator-node) ROLE=coordinator; shift ;;
            --port) [ $# -ge 2 ] || usage_error "--port needs a number"; PORT_GIVEN="$2"; shift 2 ;;
            --port=*) PORT_GIVEN="${1#*=}"; shift ;;
            --from) [ $# -ge 2 ] || usage_error "--from needs a wheel"; FROM="$2"; shift 2 ;;
            --from=*) FROM="${1#*=}"; shift ;;
            --torch-spec) [ $# -ge 2 ] || usage_error "--torch-spec needs a requirement"; TORCH_SPEC="$2"; shift 2 ;;
            --torch-spec=*) TORCH_SPEC="${1#*=}"; shift ;;
            --python) [ $# -ge 2 ] || usage_error "--python needs an interpreter"; PYTHON="$2"; shift 2 ;;
            --python=*) PYTHON="${1#*=}"; shift ;;
            --root) [ $# -ge 2 ] || usage_error "--root needs a directory"; ROOT="$2"; shift 2 ;;
            --root=*) ROOT="${1#*=}"; shift ;;
            --uninstall) uninstall_only=1; shift ;;
            *) usage_error "unknown option $1" ;;
        esac
    done

    require_root "$(id -u)"
    if [ -n "$ROOT" ]; then
        ROOT="$(realpath -m "$ROOT")"
        if [ "$ROOT" = / ]; then ROOT=""; fi
    fi
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT

    if [ -n "$uninstall_only" ]; then
        uninstall
        return 0
    fi
    if [ "$ROLE" = coordinator ] && { [ -n "$token_file_given" ] || [ -n "$COORDINATOR_GIVEN" ]; }; then
        usage_error "--coordinator-node makes the token itself: it takes neither --token-file nor --coordinator"
    fi
    if [ "$ROLE" = agent ] && [ -n "$PORT_GIVEN" ]; then
        usage_error "--port is the coordinator's own port, for --coordinator-node; an agent takes --coordinator HOST:PORT"
    fi
    if [ -n "$PORT_GIVEN" ] && ! [[ "$PORT_GIVEN" =~ ^[0-9]+$ && "$PORT_GIVEN" -ge 1 && "$PORT_GIVEN" -le 65535 ]]; then
        usage_error "--port $PORT_GIVEN is not a port number"
    fi
    if [ -n "$FROM" ]; then
        [ -f "$FROM" ] || refuse "--from $FROM: no such file."
        FROM="$(cd "$(dirname "$FROM")" && pwd)/$(basename "$FROM")"
    fi

    # The token (agent): --token-file, else standard input, else the one installed before (upgrade).
    TOKEN=""
    if [ "$ROLE" = agent ]; then
        local installed_token="$ROOT$ETC_DIR/token" source=""
        if [ -n "$token_file_given" ] && [ "$TOKEN_FILE" != - ]; then
            [ -r "$TOKEN_FILE" ] || refuse "cannot read the token file $TOKEN_FILE."
            TOKEN="$(strip "$(cat "$TOKEN_FILE")")"; source="the token in $TOKEN_FILE"
            [ -n "$TOKEN" ] || refuse "the token file $TOKEN_FILE is empty."
        elif [ -n "$token_file_given" ] || [ ! -t 0 ]; then
            TOKEN="$(strip "$(cat)")"; source="the token on standard input"
        fi
        if [ -z "$TOKEN" ] && [ -z "$token_file_given" ] && [ -s "$installed_token" ]; then
            TOKEN="$(strip "$(cat "$installed_token")")"; source="the installed token ($ETC_DIR/token)"
        fi
        check_token "$TOKEN" "$source"
        COORDINATOR="$coordinator_flag"
        if [ -z "$COORDINATOR_GIVEN" ]; then COORDINATOR="$(env_value "$ROOT$ETC_DIR/agent.env" GPUDECK_COORDINATOR)"; fi
        AGENT_ARGS="$(env_value "$ROOT$ETC_DIR/agent.env" GPUDECK_AGENT_ARGS)"
        if [ -n "$COORDINATOR" ]; then split_host_port "$COORDINATOR"; fi
    else
        COORDINATOR_ARGS="$(env_value "$ROOT$ETC_DIR/coordinator.env" GPUDECK_COORDINATOR_ARGS)"
        if [ -z "$COORDINATOR_ARGS" ] || [ -n "$PORT_GIVEN" ]; then
            COORDINATOR_ARGS="--host 0.0.0.0 --port ${PORT_GIVEN:-$DEFAULT_PORT}"
        fi
    fi

    check_python "$PYTHON"
    if [ "$ROLE" = agent ] && [ -n "$COORDINATOR" ]; then
        check_pin "$HOST" "$PORT" "$TOKEN"
    fi

    say "gpudeck $ROLE${ROOT:+ into the staging root $ROOT}:"
    ensure_user
    install_package
    write_config
    write_units
    make_state_dir
    start_service
    if [ "${#CHANGES[@]}" -eq 0 ]; then
        say "  nothing to change: already installed and up to date"
    fi
    if [ "$ROLE" = agent ]; then print_agent_next_steps; else print_coordinator_next_steps; fi
}

# Sourced (by tests), it only defines the functions above.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
