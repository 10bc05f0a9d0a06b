#!/bin/busybox sh
# PID 1 of the test guest: mount the basics, then print a counter on the serial console
# every 100 ms, as "tick N" lines, forever. Live migration must keep N continuous.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "kvmctl-guest booted"
n=0
while true; do
    echo "tick $n"
    n=$((n + 1))
    usleep 100000
done
