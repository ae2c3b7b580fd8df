#!/bin/bash
# The scenario `cargo xtask vm-test` runs inside its Debian VM, at every boot, as the unit
# lull-vm-scenario.service. It reports on the console, a line per step:
#   LULL-VM-STEP {"phase":N,"step":"...","ok":true|false,"ms":N,"detail":"..."}
# and `LULL-VM-DONE {"phase":N}` when a phase ends. Phase 1 (first boot) installs lull, deploys
# the fixture app and checks the gate, a restart under load and a watchdog kill, then reboots;
# phase 2 checks the service came back after the reboot, uninstalls and powers off.
set -u
PAYLOAD=/opt/lull-payload
STATE=/var/lib/lull-vm-test
IMAGE=lull.vm/fixture-app:1
HOST=hello.localhost
THROTTLED="1000 1000000"
mkdir -p "$STATE"
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
if [ -e "$STATE/phase1" ]; then PHASE=2; else PHASE=1; fi

now_ms() { date +%s%3N; }
json() { # a JSON string of $1: cut first, control characters dropped, then escaped
    local s
    s=$(printf '%s' "${1:0:3000}" | tr -d '\000-\010\013-\037')
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/ \| }
    s=${s//$'\t'/ }
    printf '"%s"' "$s"
}
STEP_START=$(now_ms)
begin() { STEP_START=$(now_ms); }
# report STEP OK(0|1) DETAIL
report() {
    local ok=false
    [ "$2" = 0 ] && ok=true
    printf 'LULL-VM-STEP {"phase":%s,"step":"%s","ok":%s,"ms":%s,"detail":%s}\n' \
        "$PHASE" "$1" "$ok" "$(( $(now_ms) - STEP_START ))" "$(json "$3")"
}
done_phase() {
    printf 'LULL-VM-DONE {"phase":%s}\n' "$PHASE"
}
# wait_for SECONDS COMMAND...: runs COMMAND until it succeeds; 1 if it never does.
wait_for() {
    local deadline=$(( $(date +%s) + $1 ))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -ge "$deadline" ] && return 1
        sleep 0.2
    done
}
get() { curl -fsS --max-time 30 -H "Host: $HOST" "http://127.0.0.1$1"; }
# The daemon's last log lines, when $1 says a step failed.
journal_tail() { [ "$1" = 0 ] || journalctl -u lull --no-pager -o cat -n 12 2>&1; }
main_pid() { systemctl show -p MainPID --value lull; }
restarts() { systemctl show -p NRestarts --value lull; }
restarted_since() { [ "$(restarts)" -gt "$1" ]; }
unit_cgroup() { systemctl show -p ControlGroup --value lull; }
# The instance's app cgroup (where the gate writes cpu.max) under the unit's subtree.
app_cgroup() {
    local d
    for d in /sys/fs/cgroup"$(unit_cgroup)"/instances/*/app; do
        [ -d "$d" ] && { echo "$d"; return 0; }
    done
    return 1
}
app_pids() { sort -n "$(app_cgroup)/cgroup.procs" 2>/dev/null | tr '\n' ' '; }
cpu_max() { cat "$(app_cgroup)/cpu.max"; }
is_throttled() { [ "$(cpu_max)" = "$THROTTLED" ]; }

phase1() {
    # A shorter watchdog than the unit's 30 s keeps the kill below within TCG's time; it is a
    # drop-in, as an operator would write one, which `lull install` leaves alone.
    mkdir -p /etc/systemd/system/lull.service.d
    printf '[Service]\nWatchdogSec=8s\n' > /etc/systemd/system/lull.service.d/watchdog.conf

    begin
    out=$("$PAYLOAD/lull" install 2>&1)
    rc=$?
    [ $rc = 0 ] && wait_for 120 systemctl is-active --quiet lull
    rc=$(( rc | $? ))
    report install $rc "$out; active=$(systemctl is-active lull); status=$(systemctl show -p StatusText --value lull); uplink: $(ip -4 route show default); $(journal_tail $rc)"

    begin
    out=$("$PAYLOAD/lull" install 2>&1)
    rc=$?
    [ "$(restarts)" = 0 ] || rc=1
    report install-again $rc "$out"

    begin
    props=$(systemctl show lull -p Type -p NotifyAccess -p WatchdogUSec -p Delegate -p KillMode -p LimitNOFILE | tr '\n' ' ')
    cg=$(cat /proc/"$(main_pid)"/cgroup)
    rc=0
    [[ $props == *Type=notify* && $props == *Delegate=yes* && $props == *KillMode=process* ]] || rc=1
    [[ $cg == "0::$(unit_cgroup)/daemon" ]] || rc=1
    report unit $rc "$props; daemon cgroup $cg; $(getent group lull)"

    begin
    out=$(lull image import "$PAYLOAD/layouts/fixture-app" --tag "$IMAGE" 2>&1 &&
          lull service create hello --image "$IMAGE" --concurrency 10 2>&1)
    rc=$?
    [ $rc = 0 ] && wait_for 120 get /healthz
    rc=$(( rc | $? ))
    report deploy $rc "$(echo "$out" | tail -n 4); answer: $(get /env 2>&1 | head -c 80)"

    begin
    unit=/sys/fs/cgroup$(unit_cgroup)
    app=$(app_cgroup)
    rc=$?
    controllers=$(cat "$unit/cgroup.subtree_control" 2>/dev/null)
    for c in cpu memory pids; do [[ " $controllers " == *" $c "* ]] || rc=1; done
    report delegated-cgroup $rc "instance cgroup $app; $unit/cgroup.subtree_control: $controllers; daemon leaf procs: $(wc -l < "$unit/daemon/cgroup.procs")"

    # The revision's image, exported as an OCI layout, is a standard image: umoci unpacks it
    # and crun runs it on cgroup v2, answering inside its own network namespace.
    begin
    rm -rf /tmp/export /tmp/bundle
    out=$(lull image export hello --oci /tmp/export --tag vm 2>&1 &&
          umoci unpack --image /tmp/export:vm /tmp/bundle 2>&1 &&
          sed -i 's/"terminal": *true/"terminal": false/' /tmp/bundle/config.json &&
          crun run -d --bundle /tmp/bundle lull-export-check </dev/null >/tmp/crun.log 2>&1)
    rc=$?
    [ $rc = 0 ] || out="$out $(cat /tmp/crun.log 2>/dev/null)"
    pid=$(crun state lull-export-check 2>/dev/null | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p')
    [ -n "$pid" ] || rc=1
    answer=""
    if [ $rc = 0 ]; then
        wait_for 30 nsenter --net=/proc/"$pid"/ns/net curl -fsS http://127.0.0.1:8080/healthz
        rc=$?
        answer=$(nsenter --net=/proc/"$pid"/ns/net curl -sS http://127.0.0.1:8080/healthz 2>&1)
    fi
    crun delete -f lull-export-check >/dev/null 2>&1
    report export-crun $rc "$(echo "$out" | tail -n 3); crun pid $pid; /healthz inside its namespace: $answer; $(crun --version | head -n 1)"

    # From source: a python app with an apprunner.yaml, built by lull on its python base image
    # (imported under the tag the builder asks for: the guest has no registry), deployed,
    # exported as an OCI layout and run by crun on cgroup v2 from that layout alone.
    begin
    mkdir -p /tmp/pyapp
    cat > /tmp/pyapp/app.py <<'PY'
import http.server, os

class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"built from source\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

http.server.ThreadingHTTPServer(("", int(os.environ.get("PORT", "8080"))), Hello).serve_forever()
PY
    cat > /tmp/pyapp/apprunner.yaml <<'YAML'
version: 1.0
runtime: python3
build:
  commands:
    build:
      - python3 -m py_compile app.py
run:
  command: python3 app.py
  network:
    port: 8080
YAML
    rm -rf /tmp/export-src /tmp/bundle-src
    out=$(lull image import "$PAYLOAD/layouts/python-3.11" --tag 127.0.0.1:5000/lull/base/python:3.11 2>&1 &&
          lull up /tmp/pyapp --name pyapp --check / 2>&1 &&
          lull image export pyapp --oci /tmp/export-src --tag src 2>&1 &&
          umoci unpack --image /tmp/export-src:src /tmp/bundle-src 2>&1 &&
          sed -i 's/"terminal": *true/"terminal": false/' /tmp/bundle-src/config.json &&
          crun run -d --bundle /tmp/bundle-src lull-source-check </dev/null >/tmp/crun-src.log 2>&1)
    rc=$?
    [ $rc = 0 ] || out="$out $(cat /tmp/crun-src.log 2>/dev/null)"
    pid=$(crun state lull-source-check 2>/dev/null | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p')
    answer=""
    if [ $rc = 0 ] && [ -n "$pid" ]; then
        wait_for 60 nsenter --net=/proc/"$pid"/ns/net curl -fsS http://127.0.0.1:8080/
        rc=$?
        answer=$(nsenter --net=/proc/"$pid"/ns/net curl -sS http://127.0.0.1:8080/ 2>&1)
        [ "$answer" = "built from source" ] || rc=1
    else
        rc=1
    fi
    crun delete -f lull-source-check >/dev/null 2>&1
    lull service delete pyapp >/dev/null 2>&1
    report source-export-crun $rc "$(echo "$out" | tail -n 5); crun pid $pid; GET / inside its namespace: $answer"

    # The gate: throttled after the last response, restored before the next request is served
    # (a request burning 300 ms of CPU would take 300 s at 1 ms per second).
    begin
    get /healthz >/dev/null
    t0=$(now_ms)
    wait_for 10 is_throttled
    rc=$?
    throttle_ms=$(( $(now_ms) - t0 ))
    t0=$(now_ms)
    burn=$(get "/burn?ms=300" 2>&1)
    rc=$(( rc | $? ))
    burn_ms=$(( $(now_ms) - t0 ))
    [ "$burn_ms" -lt 20000 ] || rc=1
    wait_for 10 is_throttled
    rc=$(( rc | $? ))
    report gate $rc "cpu.max '$(cpu_max)' ${throttle_ms} ms after the response (polled every 200 ms); /burn?ms=300 answered in ${burn_ms} ms: $burn"

    # What the app reads of its CPU limit at /sys/fs/cgroup/cpu.max (seen through its root
    # from here): the limit group's value (1 vCPU by default), not the gate's state in its own
    # group. Runtimes size themselves from it (Go's GOMAXPROCS, the JVM).
    begin
    app=$(app_cgroup)
    pid=$(head -n 1 "$app/cgroup.procs")
    inside=$(cat /proc/"$pid"/root/sys/fs/cgroup/cpu.max 2>&1)
    limit=$(cat "$(dirname "$app")/cpu.max" 2>&1)
    rc=0
    [ "$inside" = "100000 100000" ] && [ "$inside" = "$limit" ] || rc=1
    report cpu-limit-view $rc "inside the instance: '$inside'; limit group: '$limit'; app group (the gate): '$(cpu_max)'"

    # systemctl restart with a client running across it: no failed request, instances adopted.
    begin
    before=$(app_pids)
    pid_before=$(main_pid)
    : > "$STATE/codes"
    (
        end=$(( $(date +%s) + 25 ))
        while [ "$(date +%s)" -lt "$end" ]; do
            curl -s -o /dev/null -w '%{http_code}\n' --max-time 30 -H "Host: $HOST" \
                http://127.0.0.1/healthz >> "$STATE/codes"
        done
    ) &
    client=$!
    sleep 5
    systemctl restart lull
    restart_rc=$?
    wait $client
    total=$(wc -l < "$STATE/codes")
    failed=$(grep -cv '^200$' "$STATE/codes")
    after=$(app_pids)
    rc=$restart_rc
    [ "$failed" = 0 ] && [ "$total" -gt 0 ] || rc=1
    [ -n "$before" ] && [ "$before" = "$after" ] || rc=1
    [ "$(main_pid)" != "$pid_before" ] || rc=1
    report restart $rc "systemctl restart: $restart_rc; $total requests, $failed failed ($(sort "$STATE/codes" | uniq -c | tr '\n' ' ')); instance pids before '$before' after '$after'; daemon $pid_before -> $(main_pid)"

    # A hung daemon: the watchdog kills it, systemd starts another, which adopts the instance.
    begin
    before=$(app_pids)
    n=$(restarts)
    hung=$(main_pid)
    kill -STOP "$hung"
    wait_for 90 restarted_since "$n"
    rc=$?
    wait_for 120 systemctl is-active --quiet lull
    rc=$(( rc | $? ))
    wait_for 30 get /healthz
    rc=$(( rc | $? ))
    after=$(app_pids)
    [ "$before" = "$after" ] || rc=1
    why=$(journalctl -u lull --no-pager -o cat | grep -i -m1 'watchdog timeout')
    [ -n "$why" ] || rc=1
    report watchdog $rc "$why; restarts $n -> $(restarts); daemon $hung -> $(main_pid); instance pids '$before' -> '$after'"

    begin
    fields=$(journalctl -u lull --no-pager -o verbose | grep -E '^ +F_(SERVICE|INSTANCE)=' | sort -u | head -n 4 | tr '\n' ' ')
    [ -n "$fields" ]
    report journal-fields $? "$fields"

    touch "$STATE/phase1"
    done_phase
    sync
    systemctl reboot
}

phase2() {
    begin
    wait_for 180 systemctl is-active --quiet lull
    rc=$?
    wait_for 180 get /healthz
    rc=$(( rc | $? ))
    report after-reboot $rc "active=$(systemctl is-active lull); answer: $(get /env 2>&1 | head -c 80); $(lull status 2>&1 | head -n 3)"

    begin
    cg=/sys/fs/cgroup$(unit_cgroup)
    pids=$(app_pids)
    out=$(lull uninstall 2>&1)
    rc=$?
    [ ! -e /etc/systemd/system/lull.service ] || rc=1
    systemctl is-active --quiet lull && rc=1
    [ -d /var/lib/lull ] || rc=1
    # Nothing left running or configured: the instance, its cgroups, the bridge, the table.
    left=""
    for pid in $pids; do [ -d "/proc/$pid" ] && left="$left process $pid"; done
    [ -d "$cg" ] && left="$left cgroup $cg"
    ip link show lull0 >/dev/null 2>&1 && left="$left bridge lull0"
    nft list table inet lull >/dev/null 2>&1 && left="$left table inet lull"
    [ -z "$left" ] || rc=1
    report uninstall $rc "$out; state kept: $(ls /var/lib/lull | tr '\n' ' '); instance pids were '$pids'; left:${left:- nothing}"

    # The runtime benchmark on cgroup v2, against crun (lull is uninstalled by now).
    if [ -x "$PAYLOAD/bench/lull-bench" ]; then
        begin
        printf 'LULL-VM-BENCH-INFO kernel %s; %s; systemd %s\n' "$(uname -r)" \
            "$(crun --version | head -n 1)" "$(systemctl --version | head -n 1 | cut -d' ' -f2)"
        # shellcheck disable=SC2046
        out=$("$PAYLOAD/bench/lull-bench" runtime --oci-runtime crun \
            --layouts "$PAYLOAD/layouts" --zygote "$PAYLOAD/bench/lull-test-zygote" \
            --markdown /tmp/bench.md $(cat "$PAYLOAD/bench/args") 2>&1)
        rc=$?
        [ -s /tmp/bench.md ] || rc=1
        [ -s /tmp/bench.md ] && sed 's/^/LULL-VM-BENCH|/' /tmp/bench.md
        report bench $rc "$(echo "$out" | tr '\r' '\n' | grep -v '^cold start\|^gate ' | tail -n 6)"
    fi

    done_phase
    sync
    systemctl poweroff
}

if [ "$PHASE" = 1 ]; then phase1; else phase2; fi
