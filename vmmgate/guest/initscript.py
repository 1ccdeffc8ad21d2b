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
    }
    text = _TEMPLATE
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text
