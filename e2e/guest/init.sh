#!/bin/busybox sh
# PID 1 of the test guest: mount the basics, power off on the ACPI power button (libvirt's
# shutdown()), then print a counter on the serial console every 100 ms, as "tick N" lines,
# forever. Live migration must keep N continuous.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

insmod /lib/modules/button.ko
insmod /lib/modules/evdev.ko
power_off_on_first_event() {
    while [ ! -e "$1" ]; do usleep 10000; done
    dd if="$1" of=/dev/null bs=24 count=1 2>/dev/null
    echo "kvmctl-guest powering off"
    poweroff -f
}
for event in /sys/class/input/event*; do
    if [ "$(cat "$event/device/name")" = "Power Button" ]; then
        power_off_on_first_event "/dev/input/${event##*/}" &
    fi
done

echo "kvmctl-guest booted"
n=0
while true; do
    echo "tick $n"
    n=$((n + 1))
    usleep 100000
done
