# A private, real OCI registry (Debian's docker-registry, i.e. CNCF distribution) on loopback for the
# tests. Source it (after scripts/lib/common.sh); do not run it.
#
#   registry_start DIR   # config, storage and log in DIR; exports SANDBOXD_TEST_REGISTRY=127.0.0.1:PORT
#                        # and SANDBOXD_TEST_REGISTRY_LOG=DIR/registry.log (every request is logged there)
#   registry_stop DIR    # stops it (by the pid in DIR/registry.pid) and removes DIR
#
# The registry listens on a free port of 127.0.0.1 of its own: a system instance of the package (port
# 5000, /etc/docker/registry) is neither used nor disturbed.

# Starts the registry; returns non-zero (with the log on stderr) if it does not come up.
registry_start() {
    local dir=$1 port attempt i pid
    [ -n "$dir" ] || { echo "registry_start: DIR missing" >&2; return 2; }
    command -v docker-registry >/dev/null 2>&1 || ensure_packages docker-registry
    command -v curl >/dev/null 2>&1 || ensure_packages curl
    mkdir -p "$dir/storage"
    dir=$(cd "$dir" && pwd)
    for attempt in 1 2 3 4 5 6 7 8; do
        port=$(_registry_free_port) || return 1
        cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$port
  secret: sandboxd-test-$RANDOM$RANDOM
  headers:
    X-Content-Type-Options: [nosniff]
EOF
        # The access log goes to stdout, everything else to stderr: both into the log.
        docker-registry serve "$dir/config.yml" >>"$dir/registry.log" 2>&1 </dev/null &
        pid=$!
        echo "$pid" >"$dir/registry.pid"
        # Up when it answers /v2/ *and* is still alive (not some other server that took the port).
        for i in $(seq 1 200); do
            if ! kill -0 "$pid" 2>/dev/null; then
                break
            fi
            if curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$port/v2/" 2>/dev/null &&
                kill -0 "$pid" 2>/dev/null &&
                grep -q "listening on 127.0.0.1:$port" "$dir/registry.log"; then
                export SANDBOXD_TEST_REGISTRY="127.0.0.1:$port"
                export SANDBOXD_TEST_REGISTRY_LOG="$dir/registry.log"
                echo "registry: $SANDBOXD_TEST_REGISTRY (pid $pid, log $dir/registry.log)" >&2
                return 0
            fi
            sleep 0.05
        done
        # Dead (port taken between the check and the bind) or not answering: stop it and try again.
        _registry_kill "$pid"
        rm -f "$dir/registry.pid"
        echo "registry: no start on port $port (attempt $attempt)" >&2
    done
    echo "registry: could not start; its log:" >&2
    tail -n 30 "$dir/registry.log" >&2 || true
    return 1
}

# Stops the registry started in DIR and removes DIR (nothing happens if there is none).
registry_stop() {
    local dir=$1 pid
    [ -n "$dir" ] && [ -d "$dir" ] || return 0
    if [ -f "$dir/registry.pid" ]; then
        pid=$(cat "$dir/registry.pid")
        # Only if that pid is still our registry (not a recycled pid of something else).
        if [ -n "$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "serve $dir/config.yml"; then
            _registry_kill "$pid"
        else
            wait "$pid" 2>/dev/null || true
        fi
    fi
    rm -rf -- "$dir"
}

# A TCP port of 127.0.0.1 in 20000-40000 that nothing listens on now.
_registry_free_port() {
    local port i used
    # Local ports in use (any state), from the kernel's tables: "sl local_address:PORT rem_address ...".
    used=$(cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | while read -r _ local _; do
        case $local in *:[0-9A-F][0-9A-F][0-9A-F][0-9A-F]) echo $((16#${local##*:})) ;; esac
    done | sort -u)
    for i in $(seq 1 100); do
        port=$((20000 + RANDOM % 20001))
        if ! grep -qx "$port" <<<"$used"; then
            echo "$port"
            return 0
        fi
    done
    echo "registry: no free port found" >&2
    return 1
}

# SIGTERM, then SIGKILL after 5 s; reaps it when it is our child.
_registry_kill() {
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        # A zombie child counts as alive to kill -0: reap it if it is ours.
        if [ "$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null)" = Z ]; then break; fi
        sleep 0.05
    done
    if kill -0 "$pid" 2>/dev/null && [ "$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null)" != Z ]; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    # Not our child (another shell started it): wait until it is gone.
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.05
    done
}
