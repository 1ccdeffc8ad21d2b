"""The guest's /init (busybox sh) and the console lines it prints."""

from __future__ import annotations

#: fw_cfg item the VMM passes the starter script in (``-fw_cfg name=...,file=...``).
FW_CFG_STARTER = "opt/vmmgate/starter"
#: Printed on the serial console once the guest's init is running.
UP_LINE = "vmmgate-guest: up"
#: Printed before the starter script runs.
STARTER_BEGIN_LINE = "vmmgate-guest: starter begin"
#: Prefix of the line printed after the starter script: ``... rc=<exit status>``.
STARTER_END_PREFIX = "vmmgate-guest: starter end rc="
#: Prefix of the once-a-second counter line: ``... counter <N>``, N = 1, 2, 3, ...
COUNTER_PREFIX = "vmmgate-guest: counter "
#: Where init loads the kernel modules from inside the guest.
MODULE_DIR = "/lib/modules"
#: Kernel command-line parameter that turns the memory check on: ``vmmgate.memcheck=<MiB>``.
MEMCHECK_PARAM = "vmmgate.memcheck"
#: Largest pattern the memory check accepts, in MiB.
MEMCHECK_MAX_MIB = 512
#: Size of each round's churn file, in MiB.
MEMCHECK_CHURN_MIB = 4
#: The tmpfs (guest RAM) the memory check writes into.
MEMCHECK_DIR = "/run/memcheck"
#: Prefix of the line printed once the pattern is written: ``... <sha256> mib=<MiB>``.
MEMCHECK_PATTERN_PREFIX = "vmmgate-guest: memcheck pattern sha256="
#: Prefix of each round's line: ``... <n> pattern=<sha256> churn=ok|bad``.
MEMCHECK_ROUND_PREFIX = "vmmgate-guest: memcheck round="

_TEMPLATE = r"""#!/bin/sh
# vmmgate demo guest init. Must never exit: PID 1 exiting panics the kernel.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
exec </dev/null >/dev/console 2>&1
echo "@UP_LINE@"
for m in @MODULES@; do
    insmod "@MODULE_DIR@/$m.ko" || echo "vmmgate-guest: insmod $m failed"
done
hostname vmmgate-guest
ip link set lo up
# The memory check (off unless the kernel command line asks for it): random data in
# guest RAM that a snapshot and restore must carry over bit for bit, while a churn
# file is rewritten and re-verified every round so the RAM keeps changing.
memcheck() {
    d=@MEMCHECK_DIR@
    mkdir -p "$d"
    mount -t tmpfs -o "size=$(($1 + 3 * @MEMCHECK_CHURN_MIB@ + 1))m,mode=0700" memcheck "$d" ||
        { echo "vmmgate-guest: memcheck cannot mount $d"; return; }
    dd if=/dev/urandom of="$d/pattern" bs=1M count="$1" 2>/dev/null
    set -- $(sha256sum "$d/pattern")
    echo "@MEMCHECK_PATTERN_PREFIX@$1 mib=$(($(stat -c %s "$d/pattern") >> 20))"
    dd if=/dev/urandom of="$d/churn.0" bs=1M count=@MEMCHECK_CHURN_MIB@ 2>/dev/null
    set -- $(sha256sum "$d/churn.0")
    prev=$1 r=0
    while :; do
        r=$((r + 1))
        dd if=/dev/urandom of="$d/churn.$r" bs=1M count=@MEMCHECK_CHURN_MIB@ 2>/dev/null
        set -- $(sha256sum "$d/churn.$r")
        sum=$1
        set -- $(sha256sum "$d/churn.$((r - 1))")
        if [ "$1" = "$prev" ]; then churn=ok; else churn=bad; fi
        rm -f "$d/churn.$((r - 1))"
        prev=$sum
        set -- $(sha256sum "$d/pattern")
        echo "@MEMCHECK_ROUND_PREFIX@$r pattern=$1 churn=$churn"
    done
}
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    @MEMCHECK_PARAM@=*)
        mib=${arg#*=}
        case "$mib" in
        "" | *[!0-9]*) mib=0 ;;
        esac
        if [ "$mib" -ge 1 ] && [ "$mib" -le @MEMCHECK_MAX_MIB@ ]; then
            memcheck "$mib" </dev/null &
            # Below the counter loop, so the counter keeps its pace while this hashes.
            renice -n 10 -p $! >/dev/null
        else
            echo "vmmgate-guest: memcheck size '${arg#*=}' is not in 1..@MEMCHECK_MAX_MIB@ MiB"
        fi
        ;;
    esac
done
starter=/sys/firmware/qemu_fw_cfg/by_name/@FW_CFG_STARTER@/raw
if [ -e "$starter" ]; then
    cat "$starter" >/run/starter.sh
    echo "@STARTER_BEGIN_LINE@"
    /bin/sh /run/starter.sh </dev/null
    echo "@STARTER_END_PREFIX@$?"
fi
n=0
while :; do
    n=$((n + 1))
    echo "@COUNTER_PREFIX@$n"
    sleep 1
done
"""


def render(modules: list[str]) -> str:
    """Return the /init script that loads ``modules`` in the given order."""
    values = {
        "UP_LINE": UP_LINE,
        "MODULES": " ".join(modules),
        "MODULE_DIR": MODULE_DIR,
        "FW_CFG_STARTER": FW_CFG_STARTER,
        "STARTER_BEGIN_LINE": STARTER_BEGIN_LINE,
        "STARTER_END_PREFIX": STARTER_END_PREFIX,
        "COUNTER_PREFIX": COUNTER_PREFIX,
        "MEMCHECK_PARAM": MEMCHECK_PARAM,
        "MEMCHECK_MAX_MIB": str(MEMCHECK_MAX_MIB),
        "MEMCHECK_CHURN_MIB": str(MEMCHECK_CHURN_MIB),
        "MEMCHECK_DIR": MEMCHECK_DIR,
        "MEMCHECK_PATTERN_PREFIX": MEMCHECK_PATTERN_PREFIX,
        "MEMCHECK_ROUND_PREFIX": MEMCHECK_ROUND_PREFIX,
    }
    text = _TEMPLATE
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text
