#!/usr/bin/env bash
# Builds a small OCI image from Debian's busybox-static with umoci, for the tests, the demo and
# the benchmark: busybox and its applets in /bin, a user `www`, and the entrypoint /bin/serve,
# a web server on $PORT (default 8080) whose page names the task ($MESOS_TASK_ID) and $MODE
# (the image sets MODE=image). Usage: busybox-image.sh LAYOUT_DIR (tag `bb`).
set -euo pipefail
layout=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umoci init --layout "$layout"
umoci new --image "$layout:bb"
umoci unpack --image "$layout:bb" "$work/bundle" >/dev/null
root=$work/bundle/rootfs
mkdir -p "$root/bin" "$root/etc" "$root/www" "$root/tmp"
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
    [[ -e "$root/bin/$applet" ]] || ln -s busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/:/bin/sh\nwww:x:33:33:www:/www:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\nwww:x:33:\n' >"$root/etc/group"
cat >"$root/bin/serve" <<'SERVE'
#!/bin/sh
echo "hello from $MESOS_TASK_ID mode $MODE" > /www/index.html
exec httpd -f -p "${PORT:-8080}" -h /www
SERVE
chmod 755 "$root/bin/serve"
umoci repack --image "$layout:bb" "$work/bundle"
umoci config --image "$layout:bb" --config.entrypoint /bin/serve --config.env MODE=image
