#!/bin/busybox sh
# PID 1 of the test guest: mount the basics, load the modules /lib/modules/order lists, power off
# on the ACPI power button (libvirt's shutdown()), feed the watchdog device and run Debian's
# qemu-ga on org.qemu.guest_agent.0 if the domain has them, then print a counter on the serial
# console every 100 ms, as "tick N" lines, forever. Live migration must keep N continuous.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

while read -r module; do
    insmod "/lib/modules/$module"
done </lib/modules/order

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

# The i6300esb watchdog (a domain with <watchdog>, a kernel with its driver): fed every second,
# reset by QEMU 2 x 5 s (its two stages) after /bin/kvmctl-starve-watchdog killed the feeder.
feeder=
if [ -e /dev/watchdog ]; then
    watchdog -F -T 5 -t 1 /dev/watchdog &
    feeder=$!
    echo "$feeder" >/run/watchdog-feeder.pid
fi

guest_agent_port() {
    for name in /sys/class/virtio-ports/*/name; do
        if [ "$(cat "$name" 2>/dev/null)" = org.qemu.guest_agent.0 ]; then
            port=${name%/name}
            echo "/dev/${port##*/}"
            return 0
        fi
    done
    return 1
}

has_open() {  # PID PATH: the process has PATH open
    for fd in /proc/"$1"/fd/*; do
        [ "$(readlink "$fd")" = "$2" ] && return 0
    done
    return 1
}

# Debian's qemu-ga on the port; it logs each command it runs ("guest-ping called") to syslog,
# which syslogd copies to the console.
start_guest_agent() {
    tries=100
    until port=$(guest_agent_port); do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || return
        usleep 50000
    done
    syslogd -n -S -O - &
    mkdir -p /run/qemu-ga
    /usr/sbin/qemu-ga -d -m virtio-serial -p "$port" -t /run/qemu-ga -f /run/qemu-ga.pid \
        -l /dev/console || return
    tries=600
    until pid=$(cat /run/qemu-ga.pid 2>/dev/null) && has_open "$pid" "$port"; do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || { echo "kvmctl-guest qemu-ga did not open $port"; return; }
        usleep 50000
    done
    echo "kvmctl-guest qemu-ga $(/usr/sbin/qemu-ga -V | head -n 1) running on $port, pid $pid"
}

echo "kvmctl-guest booted"  # every line below comes after it (the tests read one boot's lines)
if [ -n "$feeder" ]; then
    echo "kvmctl-guest feeding the watchdog"
fi
set -- /sys/bus/virtio/drivers/virtio_console/virtio*
if [ -e "$1" ]; then
    start_guest_agent &
fi
n=0
while true; do
    echo "tick $n"
    n=$((n + 1))
    usleep 100000
done
