#!/bin/busybox sh
# PID 1 of the test guest: mount the basics, load the modules /lib/modules/order lists, power off
# on the ACPI power button (libvirt's shutdown()), feed the watchdog device and answer a minimal
# qemu-guest-agent on org.qemu.guest_agent.0 if the domain has them, then print a counter on the
# serial console every 100 ms, as "tick N" lines, forever. Live migration must keep N continuous.
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
# reset by QEMU 2 x 5 s (its two stages) after the guest agent's kvmctl-starve-watchdog.
feeder=
if [ -e /dev/watchdog ]; then
    watchdog -F -T 5 -t 1 /dev/watchdog &
    feeder=$!
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

# One JSON request a line, as libvirt's qemuAgentCommand sends them. Besides guest-sync(-delimited)
# and guest-ping, two commands for the tests: kvmctl-hang-agent (answer it, then never read again,
# the port left open like a hung agent's) and kvmctl-starve-watchdog (SIGKILL the feeder: no magic
# close, so the device keeps counting down).
answer_guest_agent() {
    tries=100
    until port=$(guest_agent_port); do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || return
        usleep 50000
    done
    exec 3<>"$port"
    echo "kvmctl-guest agent listening on $port"
    while true; do
        # End of file while no host side is connected (libvirt connects once the port is open).
        if ! read -r request <&3; then
            usleep 100000
            continue
        fi
        case "$request" in
        *'"guest-sync'*)
            id=${request##*\"id\":}
            id=${id# }
            id=${id%%[!0-9]*}
            case "$request" in
            *'"guest-sync-delimited"'*) printf '\377{"return": %s}\n' "$id" >&3 ;;
            *) echo "{\"return\": $id}" >&3 ;;
            esac
            ;;
        *'"guest-ping"'*)
            echo '{"return": {}}' >&3
            echo "kvmctl-guest answered guest-ping"
            ;;
        *'"kvmctl-hang-agent"'*)
            echo '{"return": {}}' >&3
            echo "kvmctl-guest agent hangs"
            while true; do sleep 3600; done
            ;;
        *'"kvmctl-starve-watchdog"'*)
            if [ -n "$feeder" ] && kill -KILL "$feeder"; then
                echo '{"return": {}}' >&3
                echo "kvmctl-guest stopped feeding the watchdog"
            else
                echo '{"error": {"class": "GenericError", "desc": "no watchdog fed"}}' >&3
            fi
            ;;
        *)
            echo '{"error": {"class": "CommandNotFound", "desc": "not in the test guest"}}' >&3
            ;;
        esac
    done
}

echo "kvmctl-guest booted"  # every line below comes after it (the tests read one boot's lines)
if [ -n "$feeder" ]; then
    echo "kvmctl-guest feeding the watchdog"
fi
set -- /sys/bus/virtio/drivers/virtio_console/virtio*
if [ -e "$1" ]; then
    answer_guest_agent &
fi
n=0
while true; do
    echo "tick $n"
    n=$((n + 1))
    usleep 100000
done
