"""Shell versions of busybox ``adduser``/``chpasswd``, which Debian's busybox-static lacks."""

from __future__ import annotations

ADDUSER = r"""#!/bin/sh
# adduser: the busybox applet's options, for Debian's busybox-static (built without it).
usage() {
    echo "usage: adduser [-D] [-H] [-S] [-h DIR] [-g GECOS] [-s SHELL] [-G GROUP] [-u UID] USER" >&2
    exit 1
}
has() { awk -F: -v k="$1" -v v="$2" '$k == v { f = 1 } END { exit !f }' "$3"; }
home= gecos= shell=/bin/sh group= uid= nohome=
while getopts DHSh:g:s:G:u: opt; do
    case $opt in
        D|S) ;;
        H) nohome=1 ;;
        h) home=$OPTARG ;;
        g) gecos=$OPTARG ;;
        s) shell=$OPTARG ;;
        G) group=$OPTARG ;;
        u) uid=$OPTARG ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 1 ] || usage
user=$1
case $user in
    ''|-*|*[!A-Za-z0-9._-]*) echo "adduser: invalid user name '$user'" >&2; exit 1 ;;
esac
if has 1 "$user" /etc/passwd; then echo "adduser: user '$user' in use" >&2; exit 1; fi
if [ -z "$uid" ]; then
    uid=$(awk -F: 'BEGIN { m = 999 } $3 > m && $3 < 60000 { m = $3 } END { print m + 1 }' /etc/passwd)
elif has 3 "$uid" /etc/passwd; then
    echo "adduser: uid $uid in use" >&2; exit 1
fi
if [ -n "$group" ]; then
    gid=$(awk -F: -v g="$group" '$1 == g { print $3 }' /etc/group)
    [ -n "$gid" ] || { echo "adduser: unknown group $group" >&2; exit 1; }
else
    gid=$(awk -F: -v g="$user" '$1 == g { print $3 }' /etc/group)
    if [ -z "$gid" ]; then
        gid=$uid
        while has 3 "$gid" /etc/group; do gid=$((gid + 1)); done
        echo "$user:x:$gid:" >>/etc/group
    fi
fi
home=${home:-/home/$user}
echo "$user:x:$uid:$gid:$gecos:$home:$shell" >>/etc/passwd
echo "$user:!:$(($(date +%s) / 86400)):0:99999:7:::" >>/etc/shadow
if [ -z "$nohome" ]; then
    mkdir -p "$home" && chown "$uid:$gid" "$home" && chmod 755 "$home"
fi
"""

CHPASSWD = r"""#!/bin/sh
# chpasswd: reads USER:PASSWORD lines (busybox options), for Debian's busybox-static.
method=sha512 encrypted=
while getopts emc: opt; do
    case $opt in
        e) encrypted=1 ;;
        m) method=md5 ;;
        c) method=$OPTARG ;;
        *) echo "usage: chpasswd [-e] [-m] [-c ALGO] <USER:PASSWORD lines" >&2; exit 1 ;;
    esac
done
rc=0
while IFS= read -r line || [ -n "$line" ]; do
    user=${line%%:*} pass=${line#*:}
    if [ -z "$user" ] || [ "$user" = "$line" ]; then
        echo "chpasswd: missing new password" >&2; rc=1; continue
    fi
    if ! awk -F: -v u="$user" '$1 == u { f = 1 } END { exit !f }' /etc/shadow; then
        echo "chpasswd: unknown user $user" >&2; rc=1; continue
    fi
    if [ -n "$encrypted" ]; then
        hash=$pass
    else
        hash=$(printf '%s\n' "$pass" | mkpasswd -m "$method") || { rc=1; continue; }
    fi
    tmp=/etc/shadow.chpasswd.$$
    if HASH=$hash DAY=$(($(date +%s) / 86400)) awk -F: -v OFS=: -v u="$user" \
        '$1 == u { $2 = ENVIRON["HASH"]; $3 = ENVIRON["DAY"] } { print }' /etc/shadow >"$tmp" \
        && chmod 640 "$tmp" && mv "$tmp" /etc/shadow; then
        :
    else
        rm -f "$tmp"; rc=1
    fi
done
exit $rc
"""

#: Guest path -> script text.
SHIMS = {"/usr/sbin/adduser": ADDUSER, "/usr/sbin/chpasswd": CHPASSWD}
