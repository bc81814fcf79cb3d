# Shared helpers for sandboxd's scripts. Source it; do not run it.

# Installs Debian packages that are missing (apt-get update only when something is).
ensure_packages() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing: ${missing[*]}" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# Prints the cgroup directories a daemon started from this shell with --cgroup-parent NAME creates
# (NAME under this shell's own cgroup in each hierarchy sandboxd uses).
cgroup_parent_dirs() {
    local name=$1 line ctrls path c
    while IFS= read -r line; do
        ctrls=${line#*:}; path=${ctrls#*:}; ctrls=${ctrls%%:*}
        if [ -z "$ctrls" ]; then
            [ -f /sys/fs/cgroup/cgroup.controllers ] && echo "/sys/fs/cgroup${path%/}/$name"
            continue
        fi
        for c in ${ctrls//,/ }; do
            case $c in memory|cpu|pids|cpuacct|blkio)
                [ -d "/sys/fs/cgroup/$c" ] && echo "/sys/fs/cgroup/$c${path%/}/$name";;
            esac
        done
    done < /proc/self/cgroup | sort -u
}

# Removes the (empty) cgroup parent directories of a stopped daemon.
remove_cgroup_parent() {
    local d
    for d in $(cgroup_parent_dirs "$1"); do
        [ -d "$d" ] && rmdir "$d" 2>/dev/null || true
    done
}

# Waits until a Unix socket accepts connections (there is no event to wait on; bounded).
wait_for_socket() {
    local sock=$1 i
    for i in $(seq 1 200); do
        curl -sf --unix-socket "$sock" http://localhost/v1/version >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "sandboxd did not come up on $sock" >&2
    return 1
}
